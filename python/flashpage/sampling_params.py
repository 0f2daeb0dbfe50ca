"""SamplingParams with vLLM's names and defaults (the subset the engine implements so far)."""

from __future__ import annotations

from dataclasses import dataclass, field

_GREEDY_EPS = 1e-5  # as vLLM: temperatures below this sample greedily


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.n != 1:
            raise ValueError(f"n must be 1 for now (parallel sampling comes with the full sampler), got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disable), 0 (disable) or at least 1, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise ValueError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def engine_kwargs(self, max_new_tokens: int) -> dict:
        """Keyword arguments of the core's Engine.add_request."""
        return dict(
            temperature=float(self.temperature), top_k=int(self.top_k), top_p=float(self.top_p),
            min_p=float(self.min_p), seed=-1 if self.seed is None else int(self.seed),
            max_tokens=int(max_new_tokens if self.max_tokens is None else self.max_tokens),
            min_tokens=int(self.min_tokens), stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos))
