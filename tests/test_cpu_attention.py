"""CPU paged attention (reference and every ISA level) against a numpy implementation over a
mixed batch: prompt chunks after cached context, whole prompts, decodes; GQA; fp32 and bf16
caches; head dims including stories260K's 8. Each level keeps its own cache layout (the amx
level: AMX tiles for bf16); the binding writes the standard-layout caches given here through
the level's own cache writer first.

The levels with bf16 dot products (amx, avx512_bf16) attend to bf16 caches of the pair layout
with bf16 arithmetic (Q and the probabilities rounded to bf16, fp32 sums, as flash attention on
GPUs): about 2^-8 relative per term, hence 1e-2 there."""

from __future__ import annotations

import math

import numpy as np
import pytest

from flashpage import _core


def to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even fp32 -> bf16, as raw uint16."""
    b = x.astype(np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def from_bf16_bits(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.uint32) << 16).view(np.float32)


def make_batch(rng, qlens, lens, q_heads, kv_heads, d, bs):
    blocks_per = [math.ceil(n / bs) for n in lens]
    nblocks = sum(blocks_per) + 3
    k = rng.standard_normal((nblocks, kv_heads, bs, d)).astype(np.float32)
    v = rng.standard_normal((nblocks, kv_heads, bs, d)).astype(np.float32)
    perm = rng.permutation(nblocks).astype(np.int32)
    tables = np.full((len(lens), max(blocks_per) + 1), -1, dtype=np.int32)
    at = 0
    for i, nb in enumerate(blocks_per):
        tables[i, :nb] = perm[at:at + nb]
        at += nb
    qsl = np.concatenate([[0], np.cumsum(qlens)]).astype(np.int32)
    q = rng.standard_normal((qsl[-1], q_heads, d)).astype(np.float32)
    return q, k, v, tables, qsl, np.array(lens, dtype=np.int32)


def numpy_attention(q, k, v, tables, qsl, lens, scale):
    out = np.zeros_like(q, dtype=np.float64)
    bs, kv_heads = k.shape[2], k.shape[1]
    g = q.shape[1] // kv_heads
    for s, n in enumerate(lens):
        blocks = tables[s, : math.ceil(n / bs)]
        ks = k[blocks].transpose(1, 0, 2, 3).reshape(kv_heads, -1, k.shape[3])[:, :n].astype(np.float64)
        vs = v[blocks].transpose(1, 0, 2, 3).reshape(kv_heads, -1, v.shape[3])[:, :n].astype(np.float64)
        a, b = qsl[s], qsl[s + 1]
        for j, r in enumerate(range(a, b)):
            pos = n - (b - a) + j
            for h in range(q.shape[1]):
                sc = ks[h // g, : pos + 1] @ q[r, h].astype(np.float64) * scale
                w = np.exp(sc - sc.max())
                out[r, h] = (w / w.sum()) @ vs[h // g, : pos + 1]
    return out


CASES = [
    # (query lens, context lens, q heads, kv heads, head dim, block size)
    ([5, 1, 1, 7], [5, 17, 33, 20], 8, 4, 8, 16),    # stories260K-like, mixed batch
    ([1, 1], [1, 64], 9, 3, 64, 16),                 # SmolLM2-like decodes
    ([40, 3], [40, 100], 4, 1, 128, 32),             # prefill + chunk after context
    ([2, 9], [31, 9], 6, 2, 20, 1),                  # odd head dim, block size 1
    ([100, 1, 37, 5], [130, 77, 37, 200], 12, 4, 64, 16),  # long chunks: many key steps and row tiles
    ([17, 2], [50, 33], 32, 2, 128, 16),             # GQA group of 16: a position's heads fill a tile
    ([1, 3, 1], [70, 130, 200], 10, 5, 64, 16),      # decodes, short chunk: passes of 4 + 1 KV heads
    ([1, 2], [200, 90], 16, 8, 64, 16),              # 8 KV heads: two passes of 4
]
ALL_ISAS = ["ref", "avx2", "avx512", "avx512_bf16", "amx"]


def isa_param():
    have = {"ref", *_core.cpu_supported_isas()}
    return [pytest.param(i, marks=pytest.mark.skipif(i not in have, reason=f"this CPU has no {i}")) for i in ALL_ISAS]


def tolerance(isa: str, bf16: bool) -> float:
    return 1e-2 if bf16 and isa in ("amx", "avx512_bf16") else 2e-5


@pytest.mark.parametrize("isa", isa_param())
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_paged_attention_matches_numpy_on_every_isa(case, bf16, isa):
    rng = np.random.default_rng(7)
    qlens, lens, q_heads, kv_heads, d, bs = case
    q, k, v, tables, qsl, ctx = make_batch(rng, qlens, lens, q_heads, kv_heads, d, bs)
    if bf16:
        k, v = to_bf16_bits(k), to_bf16_bits(v)
    scale = 1 / math.sqrt(d)
    want = numpy_attention(q, from_bf16_bits(k) if bf16 else k, from_bf16_bits(v) if bf16 else v,
                           tables, qsl, ctx, scale)
    got = _core.paged_attention(isa, q, k, v, tables, qsl, ctx, scale)
    tol = tolerance(isa, bf16)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=isa)


@pytest.mark.parametrize("isa", isa_param())
@pytest.mark.parametrize("bf16", [False, True])
def test_paged_attention_rows_are_independent_of_their_tile(isa, bf16):
    """A row's result is bitwise the same however the rows are cut into pieces (threads split a
    long prompt's query tiles), and alone (one query row at a time)."""
    rng = np.random.default_rng(3)
    qlens, lens, q_heads, kv_heads, d, bs = ([45, 1, 20], [80, 50, 20], 9, 3, 64, 16)
    q, k, v, tables, qsl, ctx = make_batch(rng, qlens, lens, q_heads, kv_heads, d, bs)
    if bf16:
        k, v = to_bf16_bits(k), to_bf16_bits(v)
    whole = _core.paged_attention(isa, q, k, v, tables, qsl, ctx, 0.125)
    # Pieces of up to 4 rows (spanning two positions of a 3-head group) run the kernels' few-row
    # variant (keys in lanes), the rest the tile of rows in lanes: the same bits.
    for splits in ([7], [16, 32, 48, 64, 80, 96, 112, 128], [1, 2, 3, 50, 51, 100], list(range(1, 140)),
                   list(range(2, 140, 2)), list(range(4, 140, 4))):
        np.testing.assert_array_equal(_core.paged_attention(isa, q, k, v, tables, qsl, ctx, 0.125, splits), whole,
                                      err_msg=f"{isa} split at {splits[:8]}")


def test_paged_attention_rejects_mismatched_shapes():
    rng = np.random.default_rng(0)
    q, k, v, tables, qsl, ctx = make_batch(rng, [2], [2], 4, 2, 16, 16)
    with pytest.raises(ValueError, match="head_dim must match"):
        _core.paged_attention("ref", q[:, :, :8].copy(), k, v, tables, qsl, ctx, 1.0)
    with pytest.raises(ValueError, match="float32 or uint16"):
        _core.paged_attention("ref", q, k.astype(np.float64), v.astype(np.float64), tables, qsl, ctx, 1.0)


@pytest.mark.parametrize("isa", isa_param())
@pytest.mark.parametrize("bf16", [False, True])
def test_paged_attention_ignores_what_lies_past_the_context(isa, bf16):
    """Cache slots past a sequence's context (the rest of its last block) may hold anything, NaN
    included (a freed block's old contents): the results are bitwise those of a clean cache."""
    rng = np.random.default_rng(5)
    qlens, lens, q_heads, kv_heads, d, bs = ([1, 3, 1, 20], [70, 130, 200, 41], 9, 3, 64, 16)
    q, k, v, tables, qsl, ctx = make_batch(rng, qlens, lens, q_heads, kv_heads, d, bs)
    if bf16:
        k, v = to_bf16_bits(k), to_bf16_bits(v)
    clean = _core.paged_attention(isa, q, k, v, tables, qsl, ctx, 0.125)
    nan = np.uint16(0x7FC0) if bf16 else np.float32("nan")
    for s, n in enumerate(lens):
        last = tables[s, (n - 1) // bs]
        k[last, :, n % bs or bs:] = nan
        v[last, :, n % bs or bs:] = nan
    np.testing.assert_array_equal(_core.paged_attention(isa, q, k, v, tables, qsl, ctx, 0.125), clean)
