"""SamplingParams with vLLM's names, defaults and validation."""

from __future__ import annotations

from collections.abc import Callable
import math
from dataclasses import dataclass, field
from typing import Any

from flashpage.structured_outputs import StructuredOutputsParams

_GREEDY_EPS = 1e-5  # as vLLM: temperatures below this sample greedily

# A logits processor, as vLLM's: (output token ids, logits row) -> logits row, or with the
# prompt's ids first: (prompt ids, output ids, logits row) -> logits row.
LogitsProcessor = Callable[..., Any]


_INT32_MAX = 2**31 - 1  # the core's token ids and counts are int32
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's bound on a logit_bias value


def _check_range(name: str, value: float, lo: float | None, hi: float | None, *, lo_open: bool = False) -> None:
    # Finite always: an infinite temperature or penalty turns every logit into NaN.
    ok = (isinstance(value, (int, float)) and math.isfinite(value)
          and (lo is None or (value > lo if lo_open else value >= lo)) and (hi is None or value <= hi))
    if not ok:
        left = "(" if lo_open else "["
        where = f"{left}{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}" + (
            "]" if hi is not None else ")")
        raise ValueError(f"{name} must be a finite number in {where}, got {value}")


@dataclass
class SamplingParams:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    logits_processors: list[LogitsProcessor] | None = None
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice, grammar
    guided_decoding: StructuredOutputsParams | None = None  # vLLM's name before 0.10: the same
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.structured_outputs is None:
            self.structured_outputs, self.guided_decoding = self.guided_decoding, None
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None and not isinstance(self.structured_outputs, StructuredOutputsParams):
            raise ValueError("structured_outputs must be a StructuredOutputsParams (or a dict of its fields)")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.logits_processors = list(self.logits_processors or [])
        self.logit_bias = {int(t): float(v) for t, v in (self.logit_bias or {}).items()} or None
        if not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be an integer >= 1, got {self.n}")
        _check_range("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_range("repetition_penalty", self.repetition_penalty, 0.0, None, lo_open=True)
        _check_range("temperature", self.temperature, 0.0, None)
        _check_range("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if not isinstance(self.top_k, int) or not -1 <= self.top_k <= _INT32_MAX:
            raise ValueError(f"top_k must be -1 or 0 (disabled) or an integer >= 1, got {self.top_k}")
        _check_range("min_p", self.min_p, 0.0, 1.0)
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int)
                                            or not 1 <= self.max_tokens <= _INT32_MAX):
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens}")
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= _INT32_MAX:
            raise ValueError(f"min_tokens must be an integer >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= _INT32_MAX):
                raise ValueError(f"{name} must be None or an integer >= 0, got {v}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        bad = next((t for t in self.stop_token_ids if not 0 <= t <= _INT32_MAX), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids: {bad} is not a token id")
        for t, v in (self.logit_bias or {}).items():
            if not 0 <= t <= _INT32_MAX:
                raise ValueError(f"logit_bias: {t} is not a token id")
            _check_range(f"logit_bias[{t}]", v, -LOGIT_BIAS_LIMIT, LOGIT_BIAS_LIMIT)
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be None or a 64-bit integer, got {self.seed!r}")
        if any(not callable(p) for p in self.logits_processors):
            raise ValueError("logits_processors must be callables")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS
