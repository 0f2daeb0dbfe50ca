"""The one percentile helper the benchmarks share (standard library only, no numpy needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence

PERCENTILES = (50, 90, 95, 99)


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between the closest ranks, as
    numpy.percentile's default (and vLLM's benchmark) computes it; NaN for no data."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    if not xs:
        return math.nan
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(xs: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """mean, p50, p90, p95, p99 of xs, each times `scale` (e.g. 1e3 for seconds -> ms)."""
    out = {"mean": (sum(xs) / len(xs)) * scale if xs else math.nan}
    for q in PERCENTILES:
        out[f"p{q}"] = percentile(xs, q) * scale
    return out
