"""The workload of `flashpage bench serve`: prompt and output lengths, random token-id prompts
and request arrival times, all from seeded generators so that two servers get the same
requests at the same moments.

Lengths: `random` draws each prompt's and output's length uniformly from
[len * (1 - r), len * (1 + r)] (r = --range-ratio). `production` draws prompt lengths from a
lognormal fitted to the production trace of the seeds — prompt tokens mean 820, p95 2,400,
p99 4,100. Two parameters, two equations, from the mean and the p95 (z95 = 1.6449):

    ln 820  = mu + sigma^2 / 2
    ln 2400 = mu + z95 * sigma
    => sigma^2/2 - z95*sigma + ln(2400/820) = 0  => sigma = z95 - sqrt(z95^2 - 2 ln(2400/820))
       sigma = 0.898, mu = 6.306   (the other root, 2.39, puts p99 near 12,000)

Check: its p99 is exp(mu + 2.3263 * sigma) ~ 4,430, 8 % above the trace's 4,100 — a lognormal's
tail is a little heavier than the trace's, close enough for a load mix. When the model's context
cannot hold the p99 prompt plus its output, every length is scaled by (room / p99) — the
distribution keeps its shape — and the rest of the tail is clipped to the room.

Prompts are uniform random token ids (exact lengths, no tokenizer round trip, no prefix-cache
hits), avoiding the tokenizer's special tokens (or ids below FIRST_TOKEN_ID without one).

Arrivals: gaps drawn from a gamma distribution of shape `burstiness` and mean 1/rate (vLLM's
--burstiness: 1 is a Poisson process, below 1 burstier, above 1 more regular); rate inf sends
every request at once.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from statistics import NormalDist

from flashpage.bench.serve_metrics import BenchError

PRODUCTION_MEAN, PRODUCTION_P95, PRODUCTION_P99 = 820, 2400, 4100
FIRST_TOKEN_ID = 3  # without a tokenizer: skip the usual unk/bos/eos ids 0..2


def fit_lognormal(mean: float, p95: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal with this mean and 95th percentile (the smaller root)."""
    z = NormalDist().inv_cdf(0.95)
    disc = z * z - 2 * math.log(p95 / mean)
    if disc < 0:
        raise ValueError(f"no lognormal has mean {mean} and p95 {p95}")
    sigma = z - math.sqrt(disc)
    return math.log(mean) - sigma * sigma / 2, sigma


def lognormal_quantile(mu: float, sigma: float, q: float) -> float:
    return math.exp(mu + sigma * NormalDist().inv_cdf(q))


PRODUCTION_MU, PRODUCTION_SIGMA = fit_lognormal(PRODUCTION_MEAN, PRODUCTION_P95)


@dataclass(frozen=True)
class LengthSpec:
    dist: str  # "random" | "production"
    input_len: int
    output_len: int
    range_ratio: float = 0.0
    max_model_len: int | None = None  # None: lengths are not fitted to a context

    def validate(self) -> None:
        if self.dist not in ("random", "production"):
            raise BenchError(f"--length-dist must be random or production, got {self.dist!r}")
        if self.input_len < 1 or self.output_len < 1:
            raise BenchError("--input-len and --output-len must be at least 1")
        if not 0 <= self.range_ratio < 1:
            raise BenchError(f"--range-ratio must be within [0, 1), got {self.range_ratio}")
        need = self.output_hi() + (self.uniform_bounds(self.input_len)[1] if self.dist == "random" else 1)
        if self.max_model_len is not None and need > self.max_model_len:
            raise BenchError(f"prompts of up to {need - self.output_hi()} tokens plus {self.output_hi()} output "
                             f"tokens do not fit the model's context of {self.max_model_len}")

    def uniform_bounds(self, n: int) -> tuple[int, int]:
        return max(1, math.floor(n * (1 - self.range_ratio))), max(1, math.ceil(n * (1 + self.range_ratio)))

    def output_hi(self) -> int:
        return self.uniform_bounds(self.output_len)[1]

    def production_scale(self) -> float:
        """1, or what shrinks the p99 prompt to fit the context beside the longest output."""
        if self.max_model_len is None:
            return 1.0
        room = self.max_model_len - self.output_hi()
        return min(1.0, room / lognormal_quantile(PRODUCTION_MU, PRODUCTION_SIGMA, 0.99))

    def sample(self, n: int, rng: random.Random) -> list[tuple[int, int]]:
        """n (prompt length, output length) pairs."""
        out_lo, out_hi = self.uniform_bounds(self.output_len)
        outs = [rng.randint(out_lo, out_hi) for _ in range(n)]
        if self.dist == "random":
            lo, hi = self.uniform_bounds(self.input_len)
            return [(rng.randint(lo, hi), o) for o in outs]
        scale = self.production_scale()
        pairs = []
        for o in outs:
            n_in = max(1, round(rng.lognormvariate(PRODUCTION_MU, PRODUCTION_SIGMA) * scale))
            if self.max_model_len is not None:
                n_in = min(n_in, self.max_model_len - o)
            pairs.append((n_in, o))
        return pairs


@dataclass(frozen=True)
class Vocab:
    """The token ids random prompts draw from."""
    size: int
    special: frozenset[int]
    source: str

    def allowed(self) -> list[int]:
        return [i for i in range(self.size) if i not in self.special]


def load_vocab(tokenizer: str | None, vocab_size: int | None) -> Vocab:
    """From a tokenizer.json (or a directory holding one), else ids FIRST_TOKEN_ID..vocab_size-1."""
    if tokenizer:
        path = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
        if not os.path.isfile(path):
            raise BenchError(f"--tokenizer: {path} does not exist")
        try:
            from tokenizers import Tokenizer
        except ImportError:  # the vocabulary and special ids are plain JSON too
            return _vocab_from_json(path, vocab_size)
        tok = Tokenizer.from_file(path)
        size = tok.get_vocab_size(with_added_tokens=True)
        special = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        return Vocab(min(size, vocab_size) if vocab_size else size, special, path)
    if vocab_size is None:
        raise BenchError("random prompts need the vocabulary: give --tokenizer DIR_OR_tokenizer.json or --vocab-size")
    if vocab_size <= FIRST_TOKEN_ID:
        raise BenchError(f"--vocab-size must be more than {FIRST_TOKEN_ID}, got {vocab_size}")
    return Vocab(vocab_size, frozenset(range(FIRST_TOKEN_ID)), "--vocab-size")


def _vocab_from_json(path: str, vocab_size: int | None) -> Vocab:
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    added = data.get("added_tokens", [])
    size = max([*data["model"]["vocab"].values(), *(t["id"] for t in added)]) + 1
    special = frozenset(t["id"] for t in added if t.get("special"))
    return Vocab(min(size, vocab_size) if vocab_size else size, special, path)


def make_prompts(lengths: list[tuple[int, int]], vocab: Vocab, rng: random.Random) -> list[list[int]]:
    ids = vocab.allowed()
    if not ids:
        raise BenchError(f"the vocabulary of {vocab.source} has no ids besides special tokens")
    return [rng.choices(ids, k=n_in) for n_in, _ in lengths]


def arrival_times(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    """Send offsets in seconds from the start of a run, the first at 0."""
    if math.isinf(rate):
        return [0.0] * n
    scale = 1.0 / (rate * burstiness)  # gamma mean = shape * scale = 1 / rate
    t, times = 0.0, []
    for i in range(n):
        if i:
            t += rng.gammavariate(burstiness, scale)
        times.append(t)
    return times


def rng_for(seed: int, purpose: str, index: int = 0) -> random.Random:
    """One independent, reproducible stream per purpose and run (string seeds hash stably)."""
    return random.Random(f"{seed}:{purpose}:{index}")
