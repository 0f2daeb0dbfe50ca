"""flashpage: an LLM inference and serving engine (paged KV cache, continuous batching).

The C++ core lives in ``flashpage._core``; this package re-exports what Python users need.
"""

from flashpage._core import (
    BlockManager,
    BlockTable,
    RequestRejected,
    Scheduler,
    SchedulerConfig,
    StepOutput,
    __version__,
)
from flashpage.platform import cuda_available, platform_info

__all__ = [
    "BlockManager",
    "BlockTable",
    "RequestRejected",
    "Scheduler",
    "SchedulerConfig",
    "StepOutput",
    "__version__",
    "cuda_available",
    "platform_info",
]
