"""flashpage: an LLM inference and serving engine (paged KV cache, continuous batching).

The C++ core lives in ``flashpage._core``; this package re-exports what Python users need.
"""

from flashpage._core import (
    BlockManager,
    Engine,
    BlockTable,
    RequestRejected,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
    __version__,
)
from flashpage.outputs import CompletionOutput, RequestOutput
from flashpage.platform import cuda_available, platform_info
from flashpage.sampling_params import SamplingParams

# LLM and LLMEngine import torch (the sampler): loaded on first use, so that `import flashpage`
# (the CLI, the scheduler) stays fast.
_LAZY = {"LLM": "flashpage.llm", "LLMEngine": "flashpage.engine"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flashpage' has no attribute {name!r}")


__all__ = [
    "BlockManager",
    "BlockTable",
    "CompletionOutput",
    "Engine",
    "LLM",
    "LLMEngine",
    "RequestOutput",
    "SamplingParams",
    "RequestRejected",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "__version__",
    "cuda_available",
    "platform_info",
]
