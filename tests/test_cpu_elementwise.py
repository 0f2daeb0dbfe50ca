"""CPU SiLU*mul, rotary embedding and KV-cache write on every ISA level against numpy."""

import numpy as np
import pytest

from flashpage import _core
from test_cpu_attention import from_bf16_bits, to_bf16_bits

ISAS = ["ref", *_core.cpu_supported_isas()]


@pytest.mark.parametrize("isa", ISAS)
def test_silu_and_mul(isa):
    x = np.random.default_rng(0).standard_normal((5, 2 * 37)).astype(np.float32)
    g, u = x[:, :37].astype(np.float64), x[:, 37:].astype(np.float64)
    np.testing.assert_allclose(_core.silu_and_mul(isa, x), g / (1 + np.exp(-g)) * u, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("head_dim", [8, 64, 30])
def test_rotary_rotate_half(isa, head_dim):
    rng = np.random.default_rng(head_dim)
    tokens, heads, max_pos = 7, 3, 64
    inv = 1.0 / 10000 ** (np.arange(0, head_dim, 2) / head_dim)
    freqs = np.outer(np.arange(max_pos), inv)
    cos_sin = np.concatenate([np.cos(freqs), np.sin(freqs)], -1).astype(np.float32)
    x = rng.standard_normal((tokens, heads, head_dim)).astype(np.float32)
    pos = rng.integers(0, max_pos, tokens).astype(np.int32)
    c = np.tile(np.cos(freqs[pos]), 2)[:, None, :]
    s = np.tile(np.sin(freqs[pos]), 2)[:, None, :]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
    want = x * c + np.concatenate([-x2, x1], -1) * s
    np.testing.assert_allclose(_core.rotary(isa, x, pos, cos_sin), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside the cos/sin table"):
        _core.rotary(isa, x, np.full(tokens, max_pos, np.int32), cos_sin)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("bf16", [False, True])
def test_write_kv_cache(isa, bf16):
    rng = np.random.default_rng(1)
    tokens, kv_heads, d, bs, blocks = 9, 2, 16, 4, 6
    key = rng.standard_normal((tokens, kv_heads, d)).astype(np.float32)
    value = rng.standard_normal((tokens, kv_heads, d)).astype(np.float32)
    slots = rng.permutation(blocks * bs)[:tokens].astype(np.int32)
    slots[3] = -1
    dtype = np.uint16 if bf16 else np.float32
    kc = np.zeros((blocks, kv_heads, bs, d), dtype)
    vc = np.zeros_like(kc)
    _core.write_kv_cache(isa, key, value, kc, vc, slots)
    for t, s in enumerate(slots):
        if s < 0:
            continue
        got_k, got_v = kc[s // bs, :, s % bs], vc[s // bs, :, s % bs]
        if bf16:
            np.testing.assert_array_equal(got_k, to_bf16_bits(key[t]))
            np.testing.assert_array_equal(from_bf16_bits(got_v), from_bf16_bits(to_bf16_bits(value[t])))
        else:
            np.testing.assert_array_equal(got_k, key[t])
            np.testing.assert_array_equal(got_v, value[t])
    assert (kc != 0).any(-1).sum() == (tokens - 1) * kv_heads
    with pytest.raises(ValueError, match="outside a cache of 24 slots"):
        _core.write_kv_cache(isa, key, value, kc, vc, np.full(tokens, 24, np.int32))
