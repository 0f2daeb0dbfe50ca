"""The batched sampler, in torch, on the device the logits live on.

One step samples every scheduled sequence at once: penalties, temperature, min-p, top-k and
top-p are whole-batch tensor operations, with a greedy fast path. Top-k/top-p never sort a whole
vocabulary row: they work on the row's `torch.topk` candidates (the largest top_k, or
`TOP_P_CANDIDATES` for top-p alone), which hold the whole nucleus whenever the candidates' mass
reaches top_p; only rows whose nucleus is wider fall back to a full sort.

Drawing uses the exponential-race trick, argmax(p / E) with E ~ Exp(1), so each seeded request
draws its noise from its own generator and gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from flashpage.sampling_params import SamplingParams

TOP_P_CANDIDATES = 1024  # candidates per row for top-p without top-k


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] the sampled tokens' log-probabilities
    top_logprobs: torch.Tensor | None = None  # [B, k]
    top_ids: torch.Tensor | None = None  # [B, k]


def _column(values: Sequence[float], logits: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=logits.device)


def apply_penalties(logits: torch.Tensor, prompt_tokens: Sequence[Sequence[int]],
                    output_tokens: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> None:
    """In place, as vLLM: repetition (tokens of prompt or output: positive logits divided by it,
    negative multiplied), then frequency (times the output count) and presence (once if the
    output has it) subtracted."""
    B, V = logits.shape
    rep = [p.repetition_penalty for p in params]
    freq = [p.frequency_penalty for p in params]
    pres = [p.presence_penalty for p in params]
    if all(r == 1 for r in rep) and not any(freq) and not any(pres):
        return
    counts = torch.zeros(B, V, dtype=torch.float32, device=logits.device)
    seen = torch.zeros(B, V, dtype=torch.bool, device=logits.device)
    for i in range(B):  # building the count tensors: O(tokens), not O(vocab)
        if output_tokens[i]:
            ids = torch.as_tensor(output_tokens[i], dtype=torch.int64, device=logits.device)
            counts[i].index_add_(0, ids, torch.ones(len(ids), device=logits.device))
        if prompt_tokens[i]:
            seen[i, torch.as_tensor(prompt_tokens[i], dtype=torch.int64, device=logits.device)] = True
    seen |= counts > 0
    r = _column(rep, logits)[:, None]
    penalised = torch.where(logits > 0, logits / r, logits * r)
    logits.copy_(torch.where(seen, penalised, logits))
    logits -= _column(freq, logits)[:, None] * counts
    logits -= _column(pres, logits)[:, None] * (counts > 0).float()


def _exponential(shape: tuple[int, int], generators: Sequence[torch.Generator | None],
                 device: torch.device) -> torch.Tensor:
    """Exp(1) noise; row i from generators[i] when it has one (its own stream), the rest from
    the default generator in one call."""
    q = torch.empty(shape, dtype=torch.float32, device=device)
    seeded = [i for i, g in enumerate(generators) if g is not None]
    if len(seeded) < len(generators):
        unseeded = [i for i, g in enumerate(generators) if g is None]
        q[unseeded] = torch.empty((len(unseeded), shape[1]), dtype=torch.float32, device=device).exponential_()
    for i in seeded:
        q[i].exponential_(generator=generators[i])
    return q


def _takes_prompt(proc) -> bool:
    """vLLM's two processor signatures: (prompt ids, output ids, logits) or (output ids, logits)."""
    try:
        return len(inspect.signature(proc).parameters) == 3
    except (TypeError, ValueError):  # no introspectable signature: the two-argument form
        return False


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None,
           prompt_tokens: Sequence[Sequence[int]] | None = None,
           output_tokens: Sequence[Sequence[int]] | None = None) -> SamplerOutput:
    """Samples one token per row of logits [B, V] (float32) under params[i]. logits is modified
    in place (penalties, processors). Log-probabilities, when any request asks for them, are
    those of the model's distribution (log_softmax of the logits after processors and
    penalties, before temperature and truncation)."""
    B, V = logits.shape
    generators = generators if generators is not None else [None] * B
    prompt_tokens = prompt_tokens if prompt_tokens is not None else [[]] * B
    output_tokens = output_tokens if output_tokens is not None else [[]] * B
    for i, p in enumerate(params):
        for proc in p.logits_processors or ():
            if _takes_prompt(proc):
                logits[i] = proc(prompt_tokens[i], output_tokens[i], logits[i])
            else:
                logits[i] = proc(output_tokens[i], logits[i])
    apply_penalties(logits, prompt_tokens, output_tokens, params)

    out = SamplerOutput(tokens=torch.empty(B, dtype=torch.int64, device=logits.device))
    want_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None

    greedy = [i for i, p in enumerate(params) if p.greedy]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if len(greedy) == B:
        out.tokens[:] = logits.argmax(dim=-1)
    elif greedy:
        out.tokens[greedy] = logits[greedy].argmax(dim=-1)
    if drawn:
        out.tokens[drawn] = _sample_rows(logits[drawn], [params[i] for i in drawn], [generators[i] for i in drawn])

    if logprobs is not None:
        out.logprobs = logprobs.gather(1, out.tokens[:, None]).squeeze(1)
        k = max(want_logprobs)
        if k > 0:
            out.top_logprobs, out.top_ids = torch.topk(logprobs, min(k, V), dim=-1)
    return out


def _sample_rows(logits: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    B, V = logits.shape
    logits = logits / _column([p.temperature for p in params], logits)[:, None]
    min_p = _column([p.min_p for p in params], logits)
    if bool((min_p > 0).any()):  # p < min_p * p_max  <=>  logit < max_logit + log(min_p)
        cut = logits.max(dim=-1, keepdim=True).values + torch.log(min_p.clamp_min(1e-30))[:, None]
        logits = logits.masked_fill((logits < cut) & (min_p[:, None] > 0), float("-inf"))
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [p.top_p for p in params]
    truncated = [k < V or tp < 1 for k, tp in zip(top_k, top_p)]
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)

    full = [i for i in range(B) if not truncated[i]]
    if full:
        idx = torch.tensor(full, device=logits.device)
        probs = torch.softmax(logits[idx], dim=-1)
        q = _exponential(tuple(probs.shape), [generators[i] for i in full], logits.device)
        tokens[idx] = (probs / q).argmax(dim=-1)
    part = [i for i in range(B) if truncated[i]]
    if part:
        tokens[torch.tensor(part, device=logits.device)] = _sample_truncated(
            logits[part], [top_k[i] for i in part], [top_p[i] for i in part], [generators[i] for i in part])
    return tokens


def _sample_truncated(logits: torch.Tensor, top_k: list[int], top_p: list[float],
                      generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """Top-k then top-p (renormalised after top-k, as vLLM) over each row's candidates."""
    B, V = logits.shape
    cand = min(V, max(max(k for k in top_k if k < V) if any(k < V for k in top_k) else 0,
                      TOP_P_CANDIDATES if any(k == V and p < 1 for k, p in zip(top_k, top_p)) else 0))
    values, ids = torch.topk(logits, cand, dim=-1)  # sorted, largest first
    k = torch.tensor(top_k, device=logits.device)
    pos = torch.arange(cand, device=logits.device)[None, :]
    values = values.masked_fill(pos >= k[:, None], float("-inf"))
    # Probabilities of the candidates within the row's distribution after top-k.
    lse = torch.logsumexp(values, dim=-1)
    whole = [i for i, kk in enumerate(top_k) if kk >= V]  # top-p alone: the full row's normaliser
    if whole:
        lse[whole] = torch.logsumexp(logits[whole], dim=-1)
    probs = torch.exp(values - lse[:, None])
    before = torch.cumsum(probs, dim=-1) - probs  # mass of the candidates ranked higher
    p = torch.tensor(top_p, device=logits.device)
    # The nucleus: the smallest prefix reaching top_p (the first always; all for top_p = 1).
    keep = (before < p[:, None]) | (p[:, None] >= 1)
    covered = (probs.sum(dim=-1) >= p) | (k <= cand)
    probs = probs.masked_fill(~keep, 0.0)
    q = _exponential((B, cand), generators, logits.device)
    tokens = ids.gather(1, (probs / q).argmax(dim=-1, keepdim=True)).squeeze(1)
    for i in torch.nonzero(~covered).flatten().tolist():  # nucleus wider than the candidates
        tokens[i] = _sample_sorted(logits[i], top_p[i], generators[i])
    return tokens


def _sample_sorted(row: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(row, dim=-1)
    sorted_probs, order = torch.sort(probs, descending=True)
    before = torch.cumsum(sorted_probs, dim=0) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    q = torch.empty_like(sorted_probs).exponential_(generator=generator)
    return order[(sorted_probs / q).argmax()]
