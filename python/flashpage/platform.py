"""What this process runs on: the CPU ISA the kernels use and whether the CUDA backend loaded."""

from __future__ import annotations

from typing import Any

from flashpage import _core


def cuda_available() -> bool:
    """True when libflashpage_cuda is loaded and sees at least one GPU."""
    return bool(_core.cuda_info()["available"])


def platform_info() -> dict[str, Any]:
    return {
        "version": _core.__version__,
        "cpu_isa": _core.cpu_isa(),
        "cpu_best_isa": _core.cpu_best_isa(),
        "cpu_supported_isas": _core.cpu_supported_isas(),
        "cpu_features": _core.cpu_features(),
        "cuda": _core.cuda_info(),
    }
