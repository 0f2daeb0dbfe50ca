"""A deterministic stand-in for a model, for scheduler tests: the next token depends only on the
tokens so far, so a request's output is the same however it is batched, chunked, preempted or
recomputed. Tests compare what the scheduler produces with what one request alone produces."""

from __future__ import annotations

from collections.abc import Sequence

VOCAB = 61
EOS = 0


def next_token(tokens: Sequence[int]) -> int:
    h = len(tokens) * 0x9E3779B1
    for t in tokens[-3:]:
        h = ((h ^ (int(t) + 1)) * 0x85EBCA6B) & 0xFFFFFFFF
    return h % VOCAB


def fork_token(tokens: Sequence[int], k: int) -> int:
    """The first token of fork k (1-based) of a request."""
    return (next_token(tokens) + 7 * k) % VOCAB


def expected_output(
    prompt: Sequence[int],
    max_tokens: int,
    max_model_len: int,
    *,
    min_tokens: int = 0,
    stop_ids: Sequence[int] = (EOS,),
    first: int | None = None,
) -> tuple[list[int], str]:
    """What the scheduler should return for one request run alone: (output, finish reason)."""
    tokens = [int(t) for t in prompt]
    out: list[int] = []
    while True:
        tok = first if (first is not None and not out) else next_token(tokens)
        tokens.append(tok)
        out.append(tok)
        if tok in stop_ids and len(out) >= min_tokens:
            return out, "stop"
        if len(out) >= max_tokens or len(tokens) >= max_model_len:
            return out, "length"
