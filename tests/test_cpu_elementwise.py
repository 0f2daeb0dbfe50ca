"""CPU SiLU*mul, rotary embedding and KV-cache write on every ISA level against numpy."""

import numpy as np
import pytest

from flashpage import _core
from test_cpu_attention import from_bf16_bits, to_bf16_bits

ISAS = ["ref", *_core.cpu_supported_isas()]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("inter", [37, 64, 1536])
def test_silu_and_mul(isa, inter):
    x = np.random.default_rng(0).standard_normal((5, 2 * inter)).astype(np.float32)
    x[0, :8] = [-120, -88, -87, -30, 30, 87, 88, 120]  # the ends of exp's range
    g, u = x[:, :inter].astype(np.float64), x[:, inter:].astype(np.float64)
    with np.errstate(over="ignore"):
        want = g / (1 + np.exp(-g)) * u
    np.testing.assert_allclose(_core.silu_and_mul(isa, x), want, rtol=1e-5, atol=1e-6)


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


@pytest.mark.parametrize("isa", [i for i in ISAS if i not in ("ref", "scalar")])
@pytest.mark.parametrize("d, bs", [(64, 16), (128, 32)])
def test_pair_layout_of_the_kv_cache(isa, d, bs):
    """Every vector level keeps bf16 caches with head_dim % 32 == 0 and blocks of 16k tokens in
    the pair layout (attention_tiles.h): K [d/2][block][2], V [block/2][d][2] per block and head
    (the amx level's tiles read it as is). Tokens written one at a time (decodes: half of each V
    word) and in runs (prefill)."""
    rng = np.random.default_rng(2)
    kv_heads, blocks = 3, 4
    tokens = 23
    key = rng.standard_normal((tokens, kv_heads, d)).astype(np.float32)
    value = rng.standard_normal((tokens, kv_heads, d)).astype(np.float32)
    slots = rng.permutation(blocks * bs)[:tokens].astype(np.int32)
    kc = np.zeros((blocks, kv_heads, bs, d), np.uint16)
    vc = np.zeros_like(kc)
    _core.write_kv_cache(isa, key[:5], value[:5], kc, vc, slots[:5])      # a run
    for t in range(5, tokens):                                             # one at a time
        _core.write_kv_cache(isa, key[t:t + 1], value[t:t + 1], kc, vc, slots[t:t + 1])
    k_flat = kc.reshape(blocks, kv_heads, d // 2, bs, 2)
    v_flat = vc.reshape(blocks, kv_heads, bs // 2, d, 2)
    for t, s in enumerate(slots):
        b, off = divmod(int(s), bs)
        want_k, want_v = to_bf16_bits(key[t]), to_bf16_bits(value[t])
        for h in range(kv_heads):
            np.testing.assert_array_equal(k_flat[b, h, :, off, :].reshape(-1), want_k[h])
            np.testing.assert_array_equal(v_flat[b, h, off // 2, :, off % 2], want_v[h])
    written = np.zeros(blocks * bs, bool)
    written[slots] = True
    assert not k_flat.transpose(0, 3, 1, 2, 4).reshape(blocks * bs, -1)[~written].any()  # others untouched
