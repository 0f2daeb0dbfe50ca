"""A server's limits, one definition each (the `flashpage serve` flags take their defaults
from here). Per request: every multiplier of one request's work bounded, the same over HTTP and
gRPC; a request over a limit is refused (HTTP 400, gRPC INVALID_ARGUMENT) with a message naming
the field, the value and the limit (and the flag that raises it). Per connection: how many, and
how long a client may take (serving.http_guard enforces them)."""

from __future__ import annotations

from dataclasses import dataclass

from flashpage.sampling_params import SamplingParams

# A text prompt longer than this many characters per token of context cannot fit: refused
# before it is tokenized (byte-level BPE averages ~4 characters a token; 32 leaves room for long
# runs of whitespace or punctuation that one token covers).
CHARS_PER_TOKEN_BOUND = 32


class LimitExceeded(ValueError):
    """A request over one of the server's limits; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RequestLimits:
    max_model_len: int
    max_n: int = 128  # OpenAI's bound on n
    max_prompts: int = 64  # prompts in one /v1/completions request
    max_sequences: int = 256  # n x prompts of one request
    max_logprobs: int = 20  # OpenAI's bound on top logprobs
    max_prompt_logprobs: int = 20
    max_stop: int = 16  # stop strings
    max_stop_chars: int = 256  # characters of one stop string
    max_stop_token_ids: int = 256
    max_logit_bias: int = 1024  # entries of logit_bias
    max_tokens: int | None = None  # None: whatever the context leaves
    max_chat_messages: int = 4096

    @property
    def max_prompt_chars(self) -> int:
        return self.max_model_len * CHARS_PER_TOKEN_BOUND

    def check_prompt_count(self, prompts: int, n: int) -> None:
        _at_most("prompt", prompts, self.max_prompts, "prompts in one request", None)
        _at_most("n", prompts * n, self.max_sequences, "sequences (n x prompts) in one request", None)

    def check_text(self, field: str, text: str) -> None:
        """Before tokenizing: a text that cannot fit the context, or that is not valid Unicode
        (a lone surrogate from JSON's \\ud800), is refused here."""
        if len(text) > self.max_prompt_chars:
            raise LimitExceeded(field, f"{field}: {len(text)} characters cannot fit this model's context of "
                                       f"{self.max_model_len} tokens (at most {self.max_prompt_chars} characters)")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise LimitExceeded(field, f"{field}: not valid Unicode text ({e.reason} at position {e.start})") from None

    def check_params(self, p: SamplingParams) -> None:
        _at_most("n", p.n, self.max_n, "sequences (n)", "--max-n")
        if p.logprobs is not None:
            _at_most("logprobs", p.logprobs, self.max_logprobs, "top logprobs", "--max-logprobs")
        if p.prompt_logprobs is not None:
            _at_most("prompt_logprobs", p.prompt_logprobs, self.max_prompt_logprobs, "prompt logprobs",
                     "--max-logprobs")
        _at_most("stop", len(p.stop), self.max_stop, "stop strings", None)
        longest = max((len(s) for s in p.stop), default=0)
        _at_most("stop", longest, self.max_stop_chars, "characters in a stop string", None)
        _at_most("stop_token_ids", len(p.stop_token_ids), self.max_stop_token_ids, "stop token ids", None)
        _at_most("logit_bias", len(p.logit_bias or ()), self.max_logit_bias, "logit_bias entries", None)
        if self.max_tokens is not None and p.max_tokens is not None:
            _at_most("max_tokens", p.max_tokens, self.max_tokens, "max_tokens", "--max-tokens-limit")


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1000  # open HTTP connections; more are answered 503 and closed
    header_timeout: float = 10.0  # a connection must deliver a request's headers within this
    body_timeout: float = 30.0  # ... and its whole body within this after the headers
    keep_alive_timeout: float = 5.0  # idle between requests (uvicorn's timeout_keep_alive)


def _at_most(field: str, value: int, limit: int, what: str, flag: str | None) -> None:
    if value > limit:
        hint = f" (the server's {flag})" if flag else ""
        raise LimitExceeded(field, f"{field}: {value} {what} exceeds this server's limit of {limit}{hint}")
