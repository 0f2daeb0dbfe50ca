"""The engine end to end on the GPU (device="cuda"): greedy continuations against transformers,
a batch against each prompt alone, the OpenAI server on --device cuda, and the defined error
for a model the CUDA attention kernels cannot run. Needs a CUDA GPU, torch with CUDA and
transformers; skipped elsewhere (tools/gpu_check.sh runs it on the device machine).

SmolLM2-135M's weights (a 98 MB GGUF in ../shared) do not travel to the device machine, so the
model here is SmolLM2-135M's architecture with random weights written by transformers: the same
shapes (576 hidden, 9 query / 3 KV heads of 64, 30 layers, 49152 vocabulary), the same code
paths, and a reference that computes the same function."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from flashpage import LLM, SamplingParams, _core

pytestmark = pytest.mark.skipif(not _core.cuda_info()["available"], reason="needs a CUDA GPU")

SMOLLM2_SHAPE = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=2048,
                     rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1,
                     eos_token_id=2, initializer_range=0.1)
STEPS = 64
# Our engine computes in bf16 (as vLLM does); the reference is transformers in fp32. How far
# bf16 may drift is measured, not guessed: transformers itself in bf16, teacher-forced along
# the fp32 path, gives the drift of its logits (delta). Our logprobs may differ from fp32's by a
# few times that, and our greedy path may part from fp32's only where fp32's best two tokens
# were closer than that (a near tie that rounding can flip). A wrong kernel misses both by far.
DRIFT_FACTOR = 4.0
NEAR_TIE_FLOOR = 0.05


@pytest.fixture(scope="module")
def smol_random(tmp_path_factory):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMOLLM2_SHAPE)).to(torch.bfloat16)
    out = str(tmp_path_factory.mktemp("smol-random"))
    model.save_pretrained(out)
    # A word-level tokenizer over the same ids ("t0" ... "t49151"), for the server's text side.
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(SMOLLM2_SHAPE["vocab_size"])}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(out, "tokenizer.json"))
    return out


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, SMOLLM2_SHAPE["vocab_size"], size=int(rng.integers(4, 40))).tolist() for _ in range(n)]


class Reference:
    """transformers on the GPU: the fp32 greedy path and its logits, and the bf16 model's
    logits teacher-forced along that path (the drift that bf16 arithmetic alone causes)."""

    def __init__(self, path: str):
        import torch
        import transformers
        load = lambda dt: transformers.AutoModelForCausalLM.from_pretrained(  # noqa: E731
            path, dtype=dt, attn_implementation="eager").cuda().eval()
        self.fp32, self.bf16 = load(torch.float32), load(torch.bfloat16)

    def greedy(self, prompt: list[int]) -> tuple[list[int], np.ndarray, float]:
        """The fp32 greedy tokens, their log-softmax rows [STEPS, V], and bf16's largest drift."""
        import torch
        tokens, rows = [], []
        with torch.no_grad():
            out = self.fp32(torch.tensor([prompt], device="cuda"), use_cache=True)
            for _ in range(STEPS):
                row = out.logits[0, -1].float()
                rows.append(torch.log_softmax(row, -1).cpu().numpy())
                tokens.append(int(row.argmax()))
                out = self.fp32(torch.tensor([[tokens[-1]]], device="cuda"), past_key_values=out.past_key_values,
                                use_cache=True)
            forced = self.bf16(torch.tensor([prompt + tokens[:-1]], device="cuda")).logits[0, len(prompt) - 1:]
            forced = torch.log_softmax(forced.float(), -1).cpu().numpy()
        logprobs = np.stack(rows)
        return tokens, logprobs, float(np.abs(forced - logprobs).max())


def _path_problems(got_tokens: list[int], got_logprobs: list[float], want: list[int], want_logprobs: np.ndarray,
                   drift: float, what: str) -> list[str]:
    """Where our greedy path and logprobs leave fp32's by more than bf16 explains (empty: none)."""
    tie, tol = max(NEAR_TIE_FLOOR, 2 * DRIFT_FACTOR * drift), DRIFT_FACTOR * drift + 1e-3
    for i, (g, w) in enumerate(zip(got_tokens, want)):
        err = abs(got_logprobs[i] - float(want_logprobs[i][g]))
        if g != w:
            gap = float(want_logprobs[i][w] - want_logprobs[i][g])
            return [] if gap < tie else [f"{what}: token {i} is {g}, fp32 chose {w} by {gap:.3f} (near tie: < {tie:.3f}; "
                                         f"bf16 transformers drifts {drift:.3f})"]
        if err > tol:
            return [f"{what}: token {i}'s logprob {got_logprobs[i]:.4f}, fp32 {want_logprobs[i][g]:.4f} (tolerance "
                    f"{tol:.4f}: {DRIFT_FACTOR} x bf16 transformers' drift {drift:.4f})"]
    return [] if len(got_tokens) == len(want) else [f"{what}: {len(got_tokens)} tokens, want {len(want)}"]


def _generate(llm: LLM, prompts: list[list[int]]) -> list[tuple[list[int], list[float]]]:
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True, logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [lp[t].logprob for t, lp in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)])
            for o in outs]


@pytest.mark.parametrize("graphs", [0, 16], ids=["eager", "cuda-graphs"])
def test_greedy_continuations_follow_transformers_and_a_batch_equals_each_alone(smol_random, graphs):
    llm = LLM(smol_random, device="cuda", max_model_len=512, max_num_seqs=16, gpu_memory_utilization=0.3,
              cuda_graph_max_batch=graphs)
    assert llm.model_info["backend"].startswith("cuda:")
    assert llm.model_info["cuda_graphs"] == (graphs > 0)
    prompts = _prompts(16)
    batched = _generate(llm, prompts)
    ref = Reference(smol_random)
    problems, differ = [], []
    for k, p in enumerate(prompts):
        want, want_logprobs, drift = ref.greedy(p)
        alone = _generate(llm, [p])[0]
        problems += _path_problems(*alone, want, want_logprobs, drift, f"prompt {k} alone")
        problems += _path_problems(*batched[k], want, want_logprobs, drift, f"prompt {k} in a batch of 16")
        if batched[k][0] != alone[0]:
            differ.append(k)
    # Bit-equal batches are asked of every backend that says it is batch-invariant; cuBLASLt
    # picks its algorithm by M, so on the GPU both must only follow fp32 as closely as bf16 can.
    if llm.model_info.get("batch_invariant", False) and differ:
        problems.append(f"prompts {differ}: batched tokens differ from each prompt alone")
    print(f"batched != alone for prompts {differ}")
    assert not problems, "\n".join(problems)


def test_the_openai_server_answers_on_the_gpu(smol_random):
    httpx = pytest.importorskip("httpx")
    from test_openai_server import _free_port, wait_healthy
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "flashpage.cli", "serve", smol_random, "--device", "cuda",
                             "--port", str(port), "--grpc-port", "0", "--max-model-len", "512",
                             "--gpu-memory-utilization", "0.3", "--served-model-name", "smol"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_healthy(url, timeout=120)
        r = httpx.post(f"{url}/v1/completions", json={"model": "smol", "prompt": "t5 t6 t7 t8", "max_tokens": 8,
                                                      "temperature": 0, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 8
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out[-2000:]


def test_a_model_the_attention_kernels_cannot_run_is_refused_by_name():
    from model_fixtures import STORIES
    if not os.path.isdir(STORIES):
        pytest.skip("stories260K is not present")
    # stories260K has head_dim 8; the CUDA attention kernels take 64 or 128.
    with pytest.raises(RuntimeError, match="CUDA attention does not support head_dim 8"):
        LLM(STORIES, device="cuda", gpu_memory_utilization=0.3)
