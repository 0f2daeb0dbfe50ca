"""The engine's options, defined once (vLLM's EngineArgs): `LLM(...)` takes them as keyword
arguments, `flashpage serve` / `flashpage generate` as flags (the same names, dashed), and
`core_kwargs()` hands them to the C++ engine binding. A new option is one field here."""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from flashpage import _core
from flashpage.models import checkpoint_quantization


# The CUDA executor (cpp/src/backends/cuda): device="cuda" runs on it where a GPU and
# libflashpage_cuda are present. device="auto" picks it since tools/gpu_check.sh verified it end
# to end on an H200 (greedy paths against transformers, the OpenAI server on --device cuda).
CUDA_EXECUTOR_AVAILABLE = True
CUDA_EXECUTOR_VERIFIED = True
# Decode steps as CUDA graphs (cuda_graph_max_batch): built and tested on the CPU's side (padded
# steps), not yet run on a GPU, so off unless asked for; tools/gpu_check.sh's end-to-end test asks.
CUDA_GRAPHS_VERIFIED = False


# dtype names as vLLM takes them; half/float16 keep float16 weights' exact values (widened).
DTYPES = ("auto", "bfloat16", "float32", "float", "float16", "half")
# vLLM's --quantization value -> the checkpoint kind it must match (checkpoint_quantization)
QUANTIZATION_METHODS = {None: None, "auto": None, "none": None, "awq": "awq", "awq_marlin": "awq",
                        "gptq": "gptq", "gptq_marlin": "gptq", "gguf": "gguf", "fp8": "fp8", "w4a16": "w4a16",
                        "w8a8-int8": "w8a8-int8"}


def _opt(default: Any, help: str, choices: tuple | None = None, flag: str | None = None) -> Any:
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


@dataclass
class EngineArgs:
    model: str = field(default="", metadata={"help": "a local Hugging Face model directory or a .gguf file (default: "
                                                     "stories260K, the tiny story model in the wheel)",
                                             "positional": True})
    tokenizer: str | None = _opt(None, "tokenizer directory (default: the model's)")
    device: str = _opt("auto", "where the model runs: auto (the GPU once the CUDA executor is verified there, else "
                               "the CPU), cpu or cuda", ("auto", "cpu", "cuda"))
    dtype: str = _opt("auto", "weights in memory: auto (the checkpoint's), bfloat16, float32 (float), or float16 "
                              "(half): the CPU has no float16 kernels, so float16 weights run exactly, widened to "
                              "float32 (bfloat16 halves their memory)", DTYPES)
    compute_dtype: str = _opt("auto", "CPU arithmetic: auto = bf16 for bf16 weights where the CPU has bf16 dot "
                                      "products (AVX512-BF16, AMX), float32 always fp32", ("auto", "bfloat16", "float32"))
    load_format: str = _opt("auto", "auto (a .gguf file as GGUF, else safetensors), gguf, or dummy (random weights "
                                    "of the config's shape)",
                            ("auto", "gguf", "dummy"))
    quantization: str | None = _opt(
        None, "the checkpoint's quantization, detected when not given (None or auto); a method given is checked "
              "against the checkpoint (awq, gptq, gguf, fp8, w4a16, w8a8-int8; vLLM's awq_marlin / gptq_marlin "
              "mean awq / gptq); none runs a GGUF's weights dequantized to dtype", tuple(q for q in QUANTIZATION_METHODS if q))
    tensor_parallel_size: int = _opt(1, "devices one model is split across: 1 (tensor parallelism is not "
                                        "implemented; larger values are refused)", flag="-tp")
    pipeline_parallel_size: int = _opt(1, "pipeline stages: 1 (larger values are refused)", flag="-pp")
    enforce_eager: bool = _opt(False, "launch every GPU step op by op: no CUDA graphs (vLLM's meaning)")
    cuda_graph_max_batch: int | None = _opt(
        None, "on a GPU, decode steps of up to this many sequences replay CUDA graphs (padded to 1, 2, 4, 8 or a "
              "multiple of 8 rows; default: max_num_seqs once graphs are verified on a GPU, until then 0; "
              "0: none)")
    trust_remote_code: bool = _opt(False, "accepted for vLLM's scripts: flashpage never runs code from a model "
                                          "directory; it runs the architectures it implements (Llama, Mistral, "
                                          "Qwen2/3) and refuses others by name")
    max_model_len: int | None = _opt(None, "context length (default: the model's)")
    block_size: int = _opt(16, "tokens per KV-cache block")
    max_num_seqs: int = _opt(256, "sequences in one step at most")
    max_num_batched_tokens: int | None = _opt(
        None, "tokens per step (default: on a CPU room for max_num_seqs decodes + ~0.1 s of prefill at this "
              "machine's speed, at most 2048; on a GPU 8192, as vLLM)")
    enable_prefix_caching: bool = _opt(True, "reuse the KV blocks of shared prompt prefixes",
                                       flag="--no-enable-prefix-caching")
    scheduling_policy: str = _opt("fcfs", "fcfs (arrival order) or priority (lower value first, then arrival; "
                                          "a request's priority comes with it)", ("fcfs", "priority"))
    kv_cache_memory_bytes: int | None = _opt(None, "KV-cache size in bytes (default: a fraction of available memory)")
    kv_cache_memory_fraction: float = _opt(0.25, "fraction of available memory for the KV cache when no size is given")
    gpu_memory_utilization: float = _opt(0.9, "on a GPU: the fraction of its memory the engine may use (weights, "
                                              "workspace and the KV cache, which gets the rest)")
    seed: int = _opt(0, "seed of requests that bring none of their own")
    skip_tokenizer_init: bool = _opt(False, "no tokenizer: prompts are token ids, outputs have no text",
                                     flag="--skip-tokenizer-init")
    verbose: bool = _opt(True, "print the start-up report (weights, KV-cache sizing) to stderr", flag="--quiet")

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, *, positional_model: bool = True) -> None:
        """Every option as a flag of the same name, dashed (vLLM's flags); booleans whose
        default is True get a --no-... or --quiet flag that turns them off."""
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            meta = f.metadata
            if meta.get("positional"):
                if positional_model:
                    parser.add_argument(f.name, help=meta["help"])
                continue
            if isinstance(f.default, bool):
                flag = meta.get("flag") or f"--{f.name.replace('_', '-')}"
                action = "store_false" if f.default else "store_true"
                group.add_argument(flag, dest=f.name, action=action,
                                   help=("turns off: " if f.default else "") + meta["help"])
                continue
            kind = {"int": int, "int | None": int, "float": float}.get(str(f.type), str)
            default = f.default if f.default is not MISSING else None
            names = [f"--{f.name.replace('_', '-')}"] + ([meta["flag"]] if meta.get("flag") else [])
            group.add_argument(*names, dest=f.name, type=kind, default=default,
                               choices=meta.get("choices"), help=meta["help"])

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        return cls(**{n: getattr(ns, n) for n in cls.names() if hasattr(ns, n)})

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineArgs:
        """LLM(model, **kwargs): an unknown name is a TypeError that lists the known ones."""
        unknown = sorted(set(kwargs) - set(cls.names()))
        if unknown:
            raise TypeError(f"LLM() got an unexpected keyword argument {unknown[0]!r}; engine options are: "
                            + ", ".join(n for n in cls.names() if n != "model"))
        args = cls(model=model, **kwargs)
        args.validate()
        return args

    def validate(self) -> None:
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices and not (value is None and f.default is None):
                raise ValueError(f"{f.name} must be one of {', '.join(choices)}; got {getattr(self, f.name)!r}")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(self, name) != 1:
                raise ValueError(f"{name}={getattr(self, name)}: flashpage runs a model on one device (this CPU, or "
                                 f"one GPU); splitting it across devices is not implemented yet: use {name}=1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1]; got {self.gpu_memory_utilization}")
        if self.device == "cuda":
            info = _core.cuda_info()
            if not info["available"]:
                raise ValueError(f"device='cuda': the CUDA backend is not available here ({info['reason']}); "
                                 "use device='cpu' (or 'auto')")

    def check_quantization(self, model: str) -> None:
        """A quantization method given by name must be what the checkpoint at `model` holds."""
        wanted = QUANTIZATION_METHODS[self.quantization]
        if wanted is None and self.quantization != "none":
            return
        held = checkpoint_quantization(model)
        if self.quantization == "none":
            if held not in (None, "gguf"):
                raise ValueError(f"quantization='none': {model} holds {held}-quantized weights, which run only "
                                 "quantized (none applies to GGUF files, whose weights it dequantizes)")
        elif held != wanted:
            raise ValueError(f"quantization={self.quantization!r}, but {model} "
                             + (f"holds {held}-quantized weights" if held else "is not quantized")
                             + ": leave quantization unset and it is detected")

    def resolved_device(self) -> str:
        """The device the engine gets. "auto": the GPU where the CUDA backend is present and runs the
        checkpoint's weights as they are (float weights, or a GGUF file with quantization="none",
        dequantized); quantized weights stay on the CPU, whose int8 / 4-bit kernels run them."""
        if self.device != "auto":
            return self.device
        if not (CUDA_EXECUTOR_VERIFIED and _core.cuda_info()["available"]):
            return "cpu"
        quantized = checkpoint_quantization(self.model) is not None and self.quantization != "none"
        return "cpu" if quantized else "cuda"

    def core_kwargs(self) -> dict[str, Any]:
        """The C++ engine's constructor arguments (its names; 0 means "choose")."""
        return dict(dtype=self.dtype, compute_dtype=self.compute_dtype, load_format=self.load_format,
                    quantization="none" if self.quantization == "none" else "auto",
                    max_model_len=self.max_model_len or 0, block_size=self.block_size, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens or 0,
                    enable_prefix_caching=self.enable_prefix_caching, policy=self.scheduling_policy,
                    kv_cache_bytes=self.kv_cache_memory_bytes or 0,
                    kv_cache_memory_fraction=self.kv_cache_memory_fraction, seed=self.seed, verbose=self.verbose,
                    device=self.resolved_device(), gpu_memory_utilization=self.gpu_memory_utilization,
                    cuda_graph_max_batch=self.resolved_graph_max_batch())

    def resolved_graph_max_batch(self) -> int:
        """Decode steps of up to this many sequences run as CUDA graphs (0: none)."""
        if self.enforce_eager:
            return 0
        if self.cuda_graph_max_batch is not None:
            return self.cuda_graph_max_batch
        return self.max_num_seqs if CUDA_GRAPHS_VERIFIED and self.resolved_device() == "cuda" else 0
