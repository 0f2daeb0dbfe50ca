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
    StepOutput,
    __version__,
)
from flashpage.llm import LLM
from flashpage.outputs import CompletionOutput, RequestOutput
from flashpage.platform import cuda_available, platform_info
from flashpage.sampling_params import SamplingParams

__all__ = [
    "BlockManager",
    "BlockTable",
    "CompletionOutput",
    "Engine",
    "LLM",
    "RequestOutput",
    "SamplingParams",
    "RequestRejected",
    "Scheduler",
    "SchedulerConfig",
    "StepOutput",
    "__version__",
    "cuda_available",
    "platform_info",
]
