"""The batched torch sampler (flashpage.sampler) and SamplingParams validation: exact support of
top-k / top-p / min-p, empirical distributions against the softmax, penalties against a plain
reference, logprobs, and seeded draws independent of the batch."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from flashpage import SamplingParams  # noqa: E402
from flashpage import sampler as S  # noqa: E402

V = 50


def _logits(seed: int = 0, v: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(v, generator=g) * 1.5


def _draw(row: torch.Tensor, params: SamplingParams, n: int = 20000) -> torch.Tensor:
    """n draws in one batch (unseeded rows share the default generator)."""
    torch.manual_seed(1)
    return S.sample(row.repeat(n, 1), [params] * n).tokens


def _expected(row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The target distribution computed the plain way: full sort per row."""
    p = torch.softmax(row.double() / params.temperature, dim=-1)
    if params.min_p > 0:
        p = torch.where(p >= params.min_p * p.max(), p, 0)
        p /= p.sum()
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    k = params.top_k if params.top_k > 0 else len(p)
    keep[order[:k]] = True
    p = torch.where(keep, p, 0)
    p /= p.sum()
    sp = p[order]
    before = torch.cumsum(sp, 0) - sp
    drop = order[(before >= params.top_p) & (params.top_p < 1)]
    p[drop] = 0
    return p / p.sum()


def _assert_draws_match(row: torch.Tensor, params: SamplingParams, want: torch.Tensor, n: int, label) -> torch.Tensor:
    """n draws: only tokens of the support, each token's frequency within 5 standard errors of
    its probability. Returns the frequencies."""
    got = torch.bincount(_draw(row, params, n), minlength=len(row)).double() / n
    assert set(torch.nonzero(got).flatten().tolist()) <= set(torch.nonzero(want).flatten().tolist())
    sigma = torch.sqrt(want * (1 - want) / n)
    assert torch.all((got - want).abs() <= 5 * sigma + 1e-9), (label, (got - want).abs().max())
    return got


@pytest.mark.parametrize("kw", [dict(top_k=5), dict(top_p=0.6), dict(top_k=10, top_p=0.8), dict(min_p=0.2),
                                dict(temperature=0.7), dict(temperature=1.3, top_k=3, min_p=0.05)])
def test_support_and_distribution_match_softmax(kw, monkeypatch):
    row = _logits(3)
    params = SamplingParams(**kw)
    want = _expected(row, params)
    n = 20000
    # The candidate path; too few candidates (rejection sampling over whole rows); and no
    # rejection rounds either (the full-sort fallback).
    for cand, rounds in ((S.FIRST_CANDIDATES, S.REJECTION_ROUNDS), (4, S.REJECTION_ROUNDS), (4, 0)):
        monkeypatch.setattr(S, "FIRST_CANDIDATES", cand)
        monkeypatch.setattr(S, "TOP_P_CANDIDATES", cand)
        monkeypatch.setattr(S, "REJECTION_ROUNDS", rounds)
        got = _assert_draws_match(row, params, want, n, (kw, cand, rounds))
        # Every token of the support with a non-negligible probability was drawn.
        assert torch.all(got[want > 0.002] > 0)


@pytest.mark.parametrize("v", [4096, 4099, 50_000])
def test_chunked_argmax_and_topk_match_torch(v):
    g = torch.Generator().manual_seed(v)
    x = torch.randn(6, v, generator=g)
    x[1] = torch.randint(0, 5, (v,), generator=g).float()  # many ties: the first maximum wins
    x[2, : v // 2] = -math.inf
    x[3, -1] = 100.0  # the maximum in the last (possibly padded) chunk
    assert torch.equal(S.argmax_rows(x), x.argmax(-1))
    for k in (1, 5, 50, 300):
        values, ids = S.topk_rows(x, k)
        assert torch.equal(values, torch.topk(x, k, -1).values)
        assert torch.equal(x.gather(1, ids), values) and bool((ids < v).all())


@pytest.mark.parametrize("kw", [dict(top_p=0.9), dict(top_p=0.3), dict(temperature=0.9), dict(top_k=40, top_p=0.8),
                                dict(min_p=0.05, top_p=0.95)])
def test_distribution_on_a_large_vocabulary(kw, monkeypatch):
    """The chunked paths (vocabulary not a multiple of the chunk): candidates, then rejection
    sampling over whole rows when the candidates are too few."""
    v, n = 1031, 8000
    g = torch.Generator().manual_seed(5)
    row = torch.randn(v, generator=g) * 2.5
    params = SamplingParams(**kw)
    want = _expected(row, params)
    for cand in (S.FIRST_CANDIDATES, 2):
        monkeypatch.setattr(S, "FIRST_CANDIDATES", cand)
        monkeypatch.setattr(S, "TOP_P_CANDIDATES", cand)
        _assert_draws_match(row, params, want, n, (kw, cand))


def test_greedy_is_argmax_and_ignores_seed():
    logits = torch.stack([_logits(i) for i in range(8)])
    out = S.sample(logits.clone(), [SamplingParams(temperature=0, seed=i) for i in range(8)])
    assert torch.equal(out.tokens, logits.argmax(-1))


def test_plain_greedy_rows_take_the_numpy_path_with_torchs_answers(monkeypatch):
    """All-greedy batches skip torch (numpy's argmax), large ones too: the same tokens, first
    maximum on ties, NaN winning as in torch; anything else on a row (a penalty, a bias,
    logprobs, a processor) takes the torch path."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4099, generator=g)
    x[1] = torch.randint(0, 3, (4099,), generator=g).float()  # ties
    x[2, 17] = math.nan
    x[3] = -math.inf
    greedy = [SamplingParams(temperature=0) for _ in range(5)]
    assert S._plain_greedy(x, greedy)
    out = S.sample(x.clone(), greedy)
    assert out.tokens.dtype == torch.int64 and torch.equal(out.tokens, x.argmax(-1))
    assert out.tokens[2] == 17 and out.tokens[3] == 0
    for other in (dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(logit_bias={1: 2.0}),
                  dict(logprobs=2), dict(temperature=0.5), dict(logits_processors=[lambda ids, row: row])):
        assert not S._plain_greedy(x, greedy[:4] + [SamplingParams(**{"temperature": 0, **other})])
    monkeypatch.setattr(S, "SMALL_ON_CPU", 100)
    assert S._plain_greedy(x, greedy)  # a batch too large for one thread in torch: numpy still
    # Logits numpy cannot take in place (a GPU's; here a strided view) get torch's one argmax,
    # with argmax_rows' answers on ties and NaN.
    wide = torch.cat([x, x], dim=1)[:, :4099]  # sample() overwrites it: a fresh one
    assert not wide.is_contiguous()
    assert torch.equal(S.sample(wide, greedy).tokens, S.argmax_rows(x.clone()))


def test_seeded_draws_do_not_depend_on_the_batch():
    rows = [_logits(i) for i in range(6)]
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = S.sample(rows[2][None].clone(), [p], [torch.Generator().manual_seed(42)]).tokens[0]
    for others in ([0, 1], [5, 4, 3, 0, 1], []):
        batch = [rows[i] for i in others] + [rows[2]]
        params = [SamplingParams(temperature=0.8, top_k=4) for _ in others] + [p]
        gens = [None] * len(others) + [torch.Generator().manual_seed(42)]
        got = S.sample(torch.stack(batch), params, gens).tokens[-1]
        assert got == alone


def test_penalties_match_a_plain_reference():
    B = 4
    logits = torch.stack([_logits(i) for i in range(B)])
    prompts = [[1, 2, 3], [], [4, 4], [7]]
    outputs = [[2, 2, 5], [9, 9, 9, 1], [], [7, 7]]
    params = [SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2),
              SamplingParams(temperature=0, frequency_penalty=-0.5),
              SamplingParams(temperature=0, repetition_penalty=0.7),
              SamplingParams(temperature=0, presence_penalty=1.5, repetition_penalty=2.0)]
    want = logits.clone()
    for i, p in enumerate(params):
        for t in set(prompts[i]) | set(outputs[i]):
            x = want[i, t]
            want[i, t] = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
        for t in set(outputs[i]):
            want[i, t] -= p.frequency_penalty * outputs[i].count(t) + p.presence_penalty
    got = logits.clone()
    S.apply_penalties(got, prompts, outputs, params)
    assert torch.allclose(got, want, atol=1e-6)


def test_logprobs_are_log_softmax():
    logits = torch.stack([_logits(i) for i in range(3)])
    params = [SamplingParams(temperature=0, logprobs=5), SamplingParams(temperature=0.5, logprobs=0),
              SamplingParams(temperature=1.0)]
    out = S.sample(logits.clone(), params)
    ref = torch.log_softmax(logits, -1)
    chosen = ref.gather(1, out.tokens[:, None])
    assert torch.allclose(out.logprobs.logprobs, chosen.squeeze(1))
    assert torch.equal(out.logprobs.ranks, (ref > chosen).sum(-1) + 1)
    assert out.logprobs.ranks[0] == 1  # greedy: the most probable
    assert torch.allclose(out.logprobs.top_logprobs, torch.topk(ref, 5, -1).values)
    assert torch.equal(out.logprobs.top_ids[0], torch.topk(ref[0], 5).indices)


def test_logits_processors_run_before_sampling():
    def ban_argmax(output_ids, row):
        row = row.clone()
        row[row.argmax()] = -math.inf
        return row
    row = _logits(1)
    out = S.sample(row[None].clone(), [SamplingParams(temperature=0, logits_processors=[ban_argmax])])
    assert out.tokens[0] == torch.topk(row, 2).indices[1]


@pytest.mark.parametrize("kw,field", [
    (dict(n=0), "n"), (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(top_k=-2), "top_k"), (dict(min_p=1.1), "min_p"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0), "repetition_penalty"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=20, max_tokens=10), "min_tokens"),
    (dict(logprobs=-1), "logprobs"), (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(stop=[""]), "stop"),
    (dict(logits_processors=[3]), "logits_processors"),
])
def test_impossible_values_name_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_stop_is_normalised_to_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams().stop == [] and SamplingParams().stop_token_ids == []
