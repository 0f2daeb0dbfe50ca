"""The batched sampler, in torch, on the device the logits live on.

One step samples every scheduled sequence at once: penalties, temperature, min-p, top-k and
top-p are whole-batch tensor operations, with a greedy fast path. Nothing sorts a vocabulary
row, and few operations touch all of it (on a CPU a pass over a batch of 32 x 128k logits costs
about 2 ms):

- Row maxima, argmax and top-k go through chunk maxima: the rows viewed as [n, CHUNK] chunks,
  one `amax` pass, then top-k over the chunk maxima picks the k chunks that hold the k largest
  values, and a top-k over just those finishes the job. torch.topk over the whole row is 8x
  slower on a CPU.
- Top-k/top-p work on each row's largest candidates (its top_k, or for top-p alone 64, and for
  top_p < 0.5 then TOP_P_CANDIDATES), which hold the whole nucleus whenever their mass reaches
  top_p.
- Rows without truncation, and top-p rows whose nucleus is wider than the candidates, draw by
  inverse CDF over chunk sums of the full row; for top-p the draw is accepted when it falls in
  the nucleus (the mass of the strictly more probable tokens is below top_p), else redrawn:
  rejection sampling, exact, and the nucleus holds at least top_p of the mass.

Each draw is one uniform per row, from the request's own generator when it has a seed, so a
seeded request gets the same tokens whatever else is in the batch.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from flashpage.sampling_params import SamplingParams

CHUNK = 64  # values per chunk for the chunk-maxima passes
TOP_P_CANDIDATES = 1024  # the wider candidate set for top-p alone
FIRST_CANDIDATES = 64  # tried first: most nuclei of a trained model are this narrow
REJECTION_ROUNDS = 16  # then the rare row left falls back to a full sort
# exp's vectorised path is ~4x slower on inputs whose result underflows (-inf included: the
# tokens a grammar or min_p bans). Rows that hold them are floored at EXP_FLOOR, where exp is
# still a normal float, and results below EXP_ZERO (exp(-87) = 1.6e-38: only floored ones, and
# tokens ~1e-38 as likely as the best, which no float CDF can draw) set back to exactly 0.
EXP_FLOOR, EXP_ZERO = -87.0, 2e-38

TokenIds = Sequence[int] | torch.Tensor


@dataclass
class TokenLogprobs:
    logprobs: torch.Tensor  # [B] the chosen tokens' log-probabilities
    ranks: torch.Tensor  # [B] their ranks (1: the most probable)
    top_logprobs: torch.Tensor | None = None  # [B, k], largest first
    top_ids: torch.Tensor | None = None  # [B, k]


@dataclass
class SamplerOutput:
    tokens: torch.Tensor  # [B] int64
    logprobs: TokenLogprobs | None = None  # when any request asked for them
    # Rows whose logits processor raised: the error (the row was sampled without it). The
    # caller ends those requests; the rest of the batch is unaffected.
    errors: dict[int, Exception] = field(default_factory=dict)


def token_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> TokenLogprobs:
    """From log-probabilities [B, V] (log_softmax of the logits): those of tokens [B], their
    ranks, and the top k of each row."""
    chosen = logprobs.gather(1, tokens[:, None])
    # Counted in float (sign of the positive part): summing a bool mask is 4x slower on a CPU.
    _, diff = _scratch(logprobs)
    ranks = torch.sub(logprobs, chosen, out=diff).clamp_(min=0).sign_().sum(-1).long() + 1
    out = TokenLogprobs(chosen.squeeze(1), ranks)
    if k > 0:
        out.top_logprobs, out.top_ids = topk_rows(logprobs, min(k, logprobs.shape[1]))
    return out


def _column(values: Sequence[float], like: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype, device=like.device)


def _chunked(x: torch.Tensor, c: int, fill: float = -math.inf) -> torch.Tensor:
    """[B, V] as [B, ceil(V / c), c]: a view when c divides V, else a copy padded with fill."""
    B, V = x.shape
    if V % c:
        x = torch.nn.functional.pad(x, (0, c - V % c), value=fill)
    return x.unflatten(1, (-1, c))


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, -1) (the first maximum) through chunk maxima."""
    B, V = x.shape
    if V < 8 * CHUNK:
        return x.argmax(-1)
    xc = _chunked(x, CHUNK)
    best = xc.amax(-1).argmax(-1)  # the first chunk holding the maximum
    rows = torch.arange(B, device=x.device)
    return best * CHUNK + xc[rows, best].argmax(-1)


def topk_rows(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.topk(x, k, -1) (sorted, largest first) through chunk maxima: the k-th largest chunk
    maximum bounds the k-th largest value from below, so the k chunks with the largest maxima
    hold the k largest values (equal values may come from other positions)."""
    B, V = x.shape
    c = next((c for c in (CHUNK, 32, 16, 8) if k * c * 4 <= V), None)
    if c is None:
        return torch.topk(x, k, dim=-1)
    xc = _chunked(x, c)
    n = xc.shape[1]
    cid = torch.topk(xc.amax(-1), k, dim=-1, sorted=False).indices  # [B, k]
    rows = torch.arange(B, device=x.device)[:, None] * n
    cand = xc.reshape(B * n, c).index_select(0, (cid + rows).flatten()).view(B, k * c)
    values, pos = torch.topk(cand, k, dim=-1)
    ids = cid.gather(1, pos // c) * c + pos % c
    return values, ids.clamp_(max=V - 1)  # padding (-inf) only ever fills rows short of values


def _flat_ids(seqs: Sequence[TokenIds], rows: Sequence[int], V: int,
              device: torch.device) -> torch.Tensor:
    """The token ids of seqs[i] for i in rows as indices into the flattened [B, V] logits
    (repeats kept)."""
    parts = [torch.as_tensor(seqs[i], dtype=torch.int64, device=device) for i in rows]
    if not parts:
        return torch.empty(0, dtype=torch.int64, device=device)
    lengths = torch.tensor([len(t) for t in parts], device=device)
    offsets = torch.tensor(rows, dtype=torch.int64, device=device) * V
    return torch.cat(parts) + torch.repeat_interleave(offsets, lengths)


def apply_penalties(logits: torch.Tensor, prompt_tokens: Sequence[TokenIds],
                    output_tokens: Sequence[TokenIds], params: Sequence[SamplingParams]) -> None:
    """In place, as vLLM: repetition (tokens of prompt or output: positive logits divided by it,
    negative multiplied), then presence (subtracted once if the output has the token) and
    frequency (times its count in the output). Touches only the logits of the tokens seen.

    No deduplication: a token seen twice is written twice with the same value (computed from
    the logits before the write), which is idempotent; only frequency accumulates."""
    B, V = logits.shape
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1]
    add_rows = [i for i, p in enumerate(params) if p.frequency_penalty or p.presence_penalty]
    if not rep_rows and not add_rows:
        return
    flat = logits.view(-1)
    dev = logits.device
    if rep_rows:
        seen = torch.cat([_flat_ids(prompt_tokens, rep_rows, V, dev), _flat_ids(output_tokens, rep_rows, V, dev)])
        r = _column([p.repetition_penalty for p in params], logits)[seen // V]
        x = flat[seen]
        flat[seen] = torch.where(x > 0, x / r, x * r)
    if add_rows:
        out = _flat_ids(output_tokens, add_rows, V, dev)
        row = out // V
        flat[out] = flat[out] - _column([p.presence_penalty for p in params], logits)[row]
        flat.index_add_(0, out, -_column([p.frequency_penalty for p in params], logits)[row])


def apply_logit_bias(logits: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    """Adds each row's logit_bias (OpenAI's: token id -> value) in one scatter."""
    rows, cols, vals = [], [], []
    for i, p in enumerate(params):
        if p.logit_bias:
            rows += [i] * len(p.logit_bias)
            cols += p.logit_bias.keys()
            vals += p.logit_bias.values()
    if rows:
        idx = (torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device))
        logits.index_put_(idx, _column(vals, logits), accumulate=True)


def _uniform(generators: Sequence[torch.Generator | None], device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per row from generators[i] (None: torch's default generator); rows
    sharing a generator draw in one call, in row order."""
    u = torch.empty(len(generators), dtype=torch.float64, device=device)
    groups: dict[int, list[int]] = {}
    for i, g in enumerate(generators):
        groups.setdefault(id(g), []).append(i)
    for rows in groups.values():
        g = generators[rows[0]]
        # Drawn where the generator lives (a request's seed gives the same draws whether its
        # logits are on the CPU or a GPU), then moved: a few values per step.
        draws = torch.rand(len(rows), dtype=torch.float64, generator=g,
                           device=g.device if g is not None else device).to(device)
        if len(rows) == len(generators):
            return draws
        u[rows] = draws
    return u


def _takes_prompt(proc) -> bool:
    """vLLM's two processor signatures: (prompt ids, output ids, logits) or (output ids, logits)."""
    try:
        return len(inspect.signature(proc).parameters) == 3
    except (TypeError, ValueError):  # no introspectable signature: the two-argument form
        return False


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    return x if len(rows) == x.shape[0] else x[torch.tensor(rows, device=x.device)]


SMALL_ON_CPU = 1 << 20  # logits below this many values are sampled on one CPU thread


@contextlib.contextmanager
def _cpu_threads_for(logits: torch.Tensor):
    """On the CPU, a small batch is sampled on one thread: torch's thread pool costs more to
    wake than it saves there, and its threads keep spinning into the model's next step."""
    if logits.device.type != "cpu" or logits.numel() >= SMALL_ON_CPU or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None] | None = None,
           prompt_tokens: Sequence[TokenIds] | None = None,
           output_tokens: Sequence[TokenIds] | None = None,
           default_generator: torch.Generator | None = None) -> SamplerOutput:
    """Samples one token per row of logits [B, V] (float32, contiguous) under params[i].
    logits is overwritten (penalties, processors, then the sampling works in place).
    Log-probabilities, when any request asks for them, are those of the model's distribution
    (log_softmax of the logits after processors and penalties, before temperature and
    truncation). Rows without a generator of their own draw from default_generator (torch's
    global one when None)."""
    if _plain_greedy(logits, params):
        if logits.device.type == "cpu" and logits.is_contiguous():
            return SamplerOutput(tokens=torch.from_numpy(logits.numpy().argmax(axis=1)))
        # On a GPU one argmax kernel (the first maximum, NaN first, as argmax_rows), rather than
        # argmax_rows' passes and the scatter of its rows into the output.
        return SamplerOutput(tokens=logits.argmax(dim=1))
    with _cpu_threads_for(logits):
        return _sample(logits, params, generators, prompt_tokens, output_tokens, default_generator)


def _plain_greedy(logits: torch.Tensor, params: Sequence[SamplingParams]) -> bool:
    """Greedy rows that nothing else touches: one argmax (on the CPU numpy's, the first maximum,
    NaN first, as torch's) in one pass. In the engine, torch's first operations after a model step
    cost 0.1-0.3 ms each (warm: ~5 us), which made greedy sampling ~0.9 ms of SmolLM2's ~12 ms
    decode step; numpy's argmax of the same fresh logits takes ~50 us. Large batches too: at 64
    rows of SmolLM2's 49,152 logits numpy takes 0.5 ms, torch 2.1 ms on its threads, which then
    spin into the model's next step (libgomp: ~3 % of a 64-request run's CPU time)."""
    return all(p.greedy and not p.logits_processors and not p.logit_bias and p.logprobs is None
               and p.repetition_penalty == 1 and not p.frequency_penalty and not p.presence_penalty for p in params)


def _sample(logits: torch.Tensor, params: Sequence[SamplingParams],
            generators: Sequence[torch.Generator | None] | None,
            prompt_tokens: Sequence[TokenIds] | None, output_tokens: Sequence[TokenIds] | None,
            default_generator: torch.Generator | None) -> SamplerOutput:
    B, V = logits.shape
    generators = generators if generators is not None else [None] * B
    prompt_tokens = prompt_tokens if prompt_tokens is not None else [[]] * B
    output_tokens = output_tokens if output_tokens is not None else [[]] * B
    out = SamplerOutput(tokens=torch.empty(B, dtype=torch.int64, device=logits.device))
    for i, p in enumerate(params):
        if p.logits_processors:
            try:
                row = logits[i].clone()
                for proc in p.logits_processors:
                    row = proc(prompt_tokens[i], output_tokens[i], row) if _takes_prompt(proc) else proc(output_tokens[i], row)
                logits[i] = row
            except Exception as e:  # noqa: BLE001 - the request's own code: isolate it
                out.errors[i] = e
    apply_logit_bias(logits, params)
    apply_penalties(logits, prompt_tokens, output_tokens, params)

    want_logprobs = [p.logprobs for p in params if p.logprobs is not None]
    # Before sampling, which overwrites the logits.
    logprobs = torch.log_softmax(logits, dim=-1) if want_logprobs else None
    greedy = [i for i, p in enumerate(params) if p.greedy]
    drawn = [i for i, p in enumerate(params) if not p.greedy]
    if greedy:
        out.tokens[greedy] = argmax_rows(_rows(logits, greedy))
    if drawn:
        out.tokens[drawn] = _sample_rows(_rows(logits, drawn), [params[i] for i in drawn],
                                         [generators[i] for i in drawn], default_generator)
    if logprobs is not None:
        out.logprobs = token_logprobs(logprobs, out.tokens, max(want_logprobs))
    return out


def _sample_rows(x: torch.Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None],
                 default_generator: torch.Generator | None = None) -> torch.Tensor:
    """Temperature, then min-p (relative to the most probable token), then top-k, then top-p
    (renormalised after top-k), as vLLM orders them. Overwrites x."""
    B, V = x.shape
    dev = x.device
    temp = _column([p.temperature for p in params], x)
    # p < min_p * p_max  <=>  (logit - max_logit) / temperature < log(min_p)
    log_min_p = _column([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], x)
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [p.top_p for p in params]
    generators = [g if g is not None else default_generator for g in generators]
    u = _uniform(generators, dev)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)

    ranked = [i for i in range(B) if top_k[i] < V]
    if ranked:
        r = torch.tensor(ranked, device=dev)
        tokens[r] = _sample_top_k(_rows(x, ranked), [top_k[i] for i in ranked], temp[r], log_min_p[r],
                                  [top_p[i] for i in ranked], u[r])
    whole = [i for i in range(B) if top_k[i] == V]
    if whole:
        w = torch.tensor(whole, device=dev)
        # Rows with -inf logits (a grammar's mask, min_p): exp's slow path unless floored.
        floor = any(params[i].structured_outputs is not None or params[i].min_p > 0 for i in whole)
        tokens[w] = _sample_whole(_rows(x, whole), temp[w], log_min_p[w], [top_p[i] for i in whole],
                                  [generators[i] for i in whole], u[w], floor)
    return tokens


def _sample_top_k(x: torch.Tensor, top_k: list[int], temp: torch.Tensor, log_min_p: torch.Tensor,
                  top_p: list[float], u: torch.Tensor) -> torch.Tensor:
    """Rows with top-k: everything happens on the row's top_k largest logits."""
    kmax = max(top_k)
    raw, ids = topk_rows(x, kmax)  # temperature keeps the order: scale only the candidates
    values = raw / temp[:, None]
    top = values[:, :1]  # the row's maximum
    k = torch.tensor(top_k, device=x.device)
    pos = torch.arange(kmax, device=x.device)[None, :]
    values = values.masked_fill((pos >= k[:, None]) | (values - top < log_min_p[:, None]), -math.inf)
    e = torch.exp(values - top)
    return _draw_candidates(e, ids, e.sum(-1), top_p, u)[0]


def _draw_candidates(e: torch.Tensor, ids: torch.Tensor, total: torch.Tensor, top_p: list[float],
                     u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws by inverse CDF among candidates e [b, c] (unnormalised probabilities, largest
    first, of tokens ids) within the nucleus of each row's distribution, whose mass is total.
    Returns the tokens and whether the candidates held the whole nucleus (where not, the row
    must be drawn another way)."""
    c = e.shape[1]
    p = torch.tensor(top_p, dtype=torch.float32, device=e.device)
    cum = torch.cumsum(e, -1)
    keep = (cum - e < p[:, None] * total[:, None]) | (p[:, None] >= 1)  # the mass ranked higher < top_p
    covered = cum[:, -1] >= p * total
    e = e * keep
    cdf = torch.cumsum(e, -1)
    target = (u * cdf[:, -1].double()).to(torch.float32)[:, None]
    pick = torch.searchsorted(cdf, target, right=True).clamp_(max=c - 1)
    pick = torch.minimum(pick, keep.sum(-1, keepdim=True) - 1)  # rounding at the very top of the cdf
    return ids.gather(1, pick).squeeze(1), covered


def _sample_whole(x: torch.Tensor, temp: torch.Tensor, log_min_p: torch.Tensor, top_p: list[float],
                  generators: Sequence[torch.Generator | None], u: torch.Tensor, floor: bool = False) -> torch.Tensor:
    """Rows without top-k: their whole probabilities, computed in place in x; top-p rows tried
    on their largest candidates first, the rest drawn from the whole row. floor: the rows hold
    -inf (see EXP_FLOOR)."""
    B, V = x.shape
    dev = x.device
    probs = x.sub_(x.amax(-1, keepdim=True)).div_(temp[:, None])
    if bool(torch.isfinite(log_min_p).any()):
        probs.masked_fill_(probs < log_min_p[:, None], -math.inf)
    if floor:
        probs.clamp_(min=EXP_FLOOR)
    probs.exp_()  # unnormalised: the most probable token has 1
    if floor:
        torch.nn.functional.threshold_(probs, EXP_ZERO, 0.0)  # banned tokens: no mass at all
    chunks = _chunked(probs, CHUNK, fill=0.0)  # padding has no mass: never drawn
    sums = chunks.sum(-1)
    total = sums.sum(-1)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    pending = [i for i in range(B) if top_p[i] < 1]
    left = [i for i in range(B) if top_p[i] >= 1]
    for cand, wider in ((FIRST_CANDIDATES, False), (TOP_P_CANDIDATES, True)):
        if wider:  # rejection sampling takes >= 2 draws per token below top_p = 0.5: try more
            left += [i for i in pending if top_p[i] >= 0.5]
            pending = [i for i in pending if top_p[i] < 0.5]
        if not pending:
            break
        idx = torch.tensor(pending, device=dev)
        e, ids = topk_rows(_rows(probs, pending), min(cand, V))
        got, covered = _draw_candidates(e, ids, total[idx], [top_p[i] for i in pending], u[idx])
        tokens[idx] = got
        pending = [i for i, ok in zip(pending, covered.tolist()) if not ok]
    left += pending  # a nucleus wider than the candidates
    if left:
        idx = torch.tensor(left, device=dev)
        tokens[idx] = _draw_rejection(_rows(probs, left), _rows(chunks, left), _rows(sums, left), total[idx],
                                      [top_p[i] for i in left], [generators[i] for i in left], u[idx])
    return tokens


def _draw_rejection(probs: torch.Tensor, chunks: torch.Tensor, sums: torch.Tensor, total: torch.Tensor,
                    top_p: list[float], generators: Sequence[torch.Generator | None],
                    u: torch.Tensor) -> torch.Tensor:
    """Inverse CDF over whole rows (chunk sums, then within the chunk); for top_p < 1 a draw is
    kept only if it lies in the nucleus (the mass of the strictly more probable tokens is below
    top_p), else redrawn: rejection sampling, exact."""
    B, V = probs.shape
    dev = probs.device
    csum = torch.cumsum(sums.double(), -1)
    p = torch.tensor(top_p, dtype=torch.float64, device=dev)
    tokens = torch.empty(B, dtype=torch.int64, device=dev)
    rows = torch.arange(B, device=dev)
    for r in range(REJECTION_ROUNDS + 1):
        if r > 0:
            u = _uniform([generators[i] for i in rows.tolist()], dev)
        target = u * csum[rows, -1]
        ch = torch.searchsorted(csum[rows], target[:, None], right=True).clamp_(max=chunks.shape[1] - 1).squeeze(1)
        rest = (target - (csum[rows, ch] - sums[rows, ch].double())).to(torch.float32)
        within = chunks[rows, ch]  # [b, CHUNK]
        off = torch.searchsorted(torch.cumsum(within, -1), rest[:, None], right=True).squeeze(1)
        # Rounding can land past the chunk's last nonzero value: take the last one drawable.
        last = (within > 0).cumsum(-1).argmax(-1)
        tok = ch * CHUNK + torch.minimum(off, last)
        tokens[rows] = tok
        nucleus = p[rows] < 1
        if not bool(nucleus.any()):
            return tokens
        pr = _rows(probs, rows.tolist())
        before = _mass_above(pr, pr.gather(1, tok[:, None]))
        rows = rows[nucleus & (before >= p[rows] * total[rows])]
        if len(rows) == 0:
            return tokens
    for i in rows.tolist():  # still rejected after many rounds (a tiny top_p on a flat row)
        tokens[i] = _sample_sorted(probs[i], top_p[i], generators[i])
    return tokens


_scratch_bufs = threading.local()


def _scratch(like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A bool and a float buffer shaped like `like`, reused from call to call (per thread): a
    fresh [B, V] temporary costs more in page faults than the arithmetic on a CPU."""
    key = (like.device, like.shape, like.dtype)
    bufs = getattr(_scratch_bufs, "bufs", None)
    if bufs is None or bufs[0] != key:
        bufs = (key, torch.empty(like.shape, dtype=torch.bool, device=like.device), torch.empty_like(like))
        _scratch_bufs.bufs = bufs
    return bufs[1], bufs[2]


def _mass_above(probs: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """sum of probs[i, j] over probs[i, j] > level[i]."""
    above, masked = _scratch(probs)
    torch.gt(probs, level, out=above)
    return torch.mul(probs, above, out=masked).sum(-1).double()


def _sample_sorted(probs: torch.Tensor, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    sorted_probs, order = torch.sort(probs / probs.sum(), descending=True)
    before = torch.cumsum(sorted_probs, 0) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    cdf = torch.cumsum(sorted_probs.double(), 0)
    u = torch.rand(1, dtype=torch.float64, generator=generator, device=probs.device)
    pick = torch.searchsorted(cdf, u * cdf[-1], right=True).clamp_(max=int((sorted_probs > 0).sum()) - 1)
    return order[pick[0]]
