"""CPU Linear layers (fp32 and bf16 weights) on every ISA level against numpy, the weights
packed into each level's panel layout first as the model does at load. Every level is a
parameter: the ones this CPU lacks are reported as skipped, by name.

On the levels with bf16 dot products (avx512_bf16, amx), bf16 weights compute in bf16: the
inputs are rounded to bf16 first, so the reference multiplies the rounded inputs."""

import numpy as np
import pytest

from flashpage import _core
from test_cpu_attention import from_bf16_bits, to_bf16_bits

ALL_ISAS = ["scalar", "avx2", "avx512", "avx512_bf16", "amx"]
BF16_DOT = {"avx512_bf16", "amx"}


def isa_param(isas=ALL_ISAS):
    """One parameter per level, skipped (and so listed by pytest -ra) where this CPU or build lacks it."""
    have = set(_core.cpu_supported_isas())
    return [pytest.param(i, marks=pytest.mark.skipif(i not in have, reason=f"this CPU has no {i}")) for i in isas]


def rounded(x: np.ndarray) -> np.ndarray:
    return from_bf16_bits(to_bf16_bits(x))


def _case(M, N, K, bf16, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = rng.standard_normal((N, K)).astype(np.float32)
    bias = rng.standard_normal(N).astype(np.float32)
    wk = to_bf16_bits(w) if bf16 else w
    wf = from_bf16_bits(wk) if bf16 else w
    return x, wk, wf, bias


def _check(got, x, wf, bias, K, isa="scalar", bf16=False):
    if bf16 and isa in BF16_DOT:
        x = rounded(x)
    want = x.astype(np.float64) @ wf.astype(np.float64).T
    if bias is not None:
        want = want + bias
    # fp32 accumulation: the error grows with K and the size of the terms.
    mag = np.abs(x.astype(np.float64)) @ np.abs(wf.astype(np.float64)).T + 1
    assert np.all(np.abs(got - want) <= 2e-6 * np.sqrt(K) * mag), np.max(np.abs(got - want) / mag)


@pytest.mark.parametrize("isa", isa_param())
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 6, 7, 8, 12, 13, 16, 17, 33, 37, 64, 70])
# 1, 2, 3, 5 and 10 panels of 32 columns: the decode kernels' groups of 3-4 panels and their remainders.
@pytest.mark.parametrize("N,K", [(1, 1), (33, 16), (70, 37), (130, 301), (290, 40)])
@pytest.mark.parametrize("bf16", [False, True])
def test_linear_matches_numpy(isa, M, N, K, bf16):
    x, wk, wf, bias = _case(M, N, K, bf16, M * 1000 + N)
    for b in (None, bias):
        got = _core.linear(isa, x, wk, b, True)
        _check(got, x, wf, b, K, isa, bf16)
    _check(_core.linear(isa, x, wk, bias, False), x, wf, bias, K, isa, bf16)


@pytest.mark.parametrize("isa", isa_param())
def test_linear_into_wider_output(isa):
    """y with a row stride larger than N: only columns [off, off + N) are written."""
    M, N, K, off, width = 21, 45, 67, 7, 64
    x, wk, wf, bias = _case(M, N, K, True, 5)
    out = np.full((M, width), -3.0, np.float32)
    got = _core.linear(isa, x, wk, bias, True, out=out, col_offset=off)
    assert got is out or np.shares_memory(got, out)
    _check(out[:, off:off + N], x, wf, bias, K, isa, True)
    assert np.all(out[:, :off] == -3.0) and np.all(out[:, off + N:] == -3.0)
    # batch invariance also covers where the columns land
    assert np.array_equal(out[:, off:off + N], _core.linear(isa, x, wk, bias, True))


@pytest.mark.parametrize("isa", isa_param(ALL_ISAS[1:]))
@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("N,K", [(45, 301), (77, 67), (33, 5), (50, 1040)])
def test_linear_is_batch_invariant(isa, bf16, N, K):
    """Row i of linear(x) is bitwise the same whatever M, the other rows, their order and how
    the output columns are split across threads."""
    M = 37
    x, wk, _, bias = _case(M, N, K, bf16, N * 7 + K)
    perm = np.random.default_rng(K).permutation(M)
    for b in (None, bias):
        full = _core.linear(isa, x, wk, b, True)
        assert np.array_equal(full, _core.linear(isa, x, wk, b, False))
        for i in range(M):
            assert np.array_equal(_core.linear(isa, x[i:i + 1], wk, b, True)[0], full[i]), (isa, i)
        assert np.array_equal(_core.linear(isa, x[perm], wk, b, True), full[perm])
        for start, length in [(0, 2), (3, 5), (10, 8), (1, 12), (20, 17)]:
            part = _core.linear(isa, x[start:start + length], wk, b, True)
            assert np.array_equal(part, full[start:start + length]), (isa, start, length)


def test_linear_rejects_bad_shapes():
    x = np.zeros((2, 8), np.float32)
    with pytest.raises(ValueError, match="same K"):
        _core.linear("ref", x, np.zeros((4, 7), np.float32))
    with pytest.raises(ValueError, match="bias must be"):
        _core.linear("ref", x, np.zeros((4, 8), np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="out must be"):
        _core.linear("ref", x, np.zeros((4, 8), np.float32), out=np.zeros((2, 5), np.float32), col_offset=2)
    with pytest.raises(ValueError, match="out must be"):
        _core.linear("ref", x, np.zeros((4, 8), np.float32), out=np.zeros((2, 8), np.float64))
    assert _core.num_threads() >= 1


@pytest.mark.parametrize("isa", isa_param())
@pytest.mark.parametrize("M,K,inter", [(5, 64, 32), (13, 96, 64), (37, 64, 96), (70, 160, 48), (300, 64, 64)])
def test_fused_gate_up_silu_is_bitwise_the_three_ops_it_replaces(isa, M, K, inter):
    """The bf16 levels' fused MLP head (gate and up Linears, SiLU.mul, rounding into down's
    input) gives the bits of linear, silu_and_mul and the bf16 rounding run one after another —
    the path the levels without it (and decode batches of 1-4 rows) take."""
    rng = np.random.default_rng(M * 1000 + K + inter)
    x = rng.standard_normal((M, K)).astype(np.float32)
    gate = to_bf16_bits(rng.standard_normal((inter, K)).astype(np.float32))
    up = to_bf16_bits(rng.standard_normal((inter, K)).astype(np.float32))
    got, fused = _core.gate_up_silu(isa, x, gate, up)
    assert fused == (isa == "avx512_bf16")  # amx's tiles and the fp32 levels run the ops apart
    if not fused:
        assert got is None
        return
    gate_up = np.concatenate([_core.linear(isa, x, gate), _core.linear(isa, x, up)], axis=1)
    want = to_bf16_bits(_core.silu_and_mul(isa, gate_up))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("isa", isa_param(["avx512_bf16"]))
@pytest.mark.parametrize("M", [1, 2, 3, 4])
def test_decode_batches_keep_the_unfused_gate_up(isa, M):
    """1-4 rows read several weight panels side by side (run_bf16's decode path): not fused."""
    x = np.ones((M, 64), np.float32)
    w = to_bf16_bits(np.ones((32, 64), np.float32))
    assert _core.gate_up_silu(isa, x, w, w) == (None, False)
