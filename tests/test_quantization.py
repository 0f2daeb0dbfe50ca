"""The canonical quantized-weight format: int4 packing, round-to-nearest quantization, and
conversion from GPTQ and AWQ checkpoints (packed here the way AutoGPTQ and AutoAWQ pack them),
plus the float32 references the CUDA kernels are tested against."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flashpage import quantization as Q  # noqa: E402

N, K, G = 48, 256, 64


def _random(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (N, K), generator=g)
    zeros = torch.randint(0, 16, (N, K // G), generator=g)
    scales = (torch.rand(N, K // G, generator=g) * 0.02 + 0.001).half()
    return q, zeros, scales


def _want(q, zeros, scales):
    return ((q.reshape(N, K // G, G) - zeros[..., None]).float() * scales.float()[..., None]).reshape(N, K)


def _gptq_pack(q, zeros, stored_offset=1):
    """AutoGPTQ's QuantLinear.pack, in numpy: qweight [K/8, N] (input rows i*8..i*8+7 in one
    word, row j at bits 4j), qzeros [K/G, N/8] holding zero - 1."""
    N, K = q.shape
    G = K // zeros.shape[1]
    iq = q.T.numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((K // 8, N), dtype=np.uint32)
    for row in range(K // 8):
        for j in range(8):
            qweight[row] |= iq[row * 8 + j] << (4 * j)
    z = (zeros.T.numpy().astype(np.int64) - stored_offset).astype(np.uint32) & 0xF  # [K/G, N]
    qzeros = np.zeros((K // G, N // 8), dtype=np.uint32)
    for col in range(N // 8):
        for j in range(8):
            qzeros[:, col] |= z[:, col * 8 + j] << (4 * j)
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def _awq_pack(q, zeros):
    """AutoAWQ's WQLinear_GEMM.from_linear packing: qweight [K, N/8], qzeros [K/G, N/8], the 8
    columns of a word in the order [0, 2, 4, 6, 1, 3, 5, 7]."""
    def pack(m):  # [R, C] -> [R, C / 8]
        m = m.numpy().astype(np.uint32)
        out = np.zeros((m.shape[0], m.shape[1] // 8), dtype=np.uint32)
        for col in range(m.shape[1] // 8):
            for i in range(8):
                out[:, col] |= m[:, col * 8 + Q.AWQ_ORDER[i]] << (4 * i)
        return torch.from_numpy(out.view(np.int32))
    return pack(q.T), pack(zeros.T)


def test_int4_packing_round_trips():
    q, _, _ = _random()
    packed = Q.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (N, K // 2)
    assert torch.equal(Q.unpack_int4(packed), q.to(torch.int32))
    assert int(packed[0, 0]) == int(q[0, 0]) | (int(q[0, 1]) << 4)  # low nibble first


@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_quantization(symmetric):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(1))
    qw = Q.quantize_w4a16(w, group_size=G, symmetric=symmetric)
    err = (Q.dequantize_w4a16(qw) - w).abs().reshape(N, K // G, G)
    assert torch.all(err <= qw.scales.float()[..., None] * 0.51 + 1e-6)  # half a step (bf16 scales)
    assert (qw.qzeros is None) == symmetric


@pytest.mark.parametrize("offset", [1, 0])
def test_gptq_conversion(offset):
    q, zeros, scales = _random(2)
    zeros = zeros + offset  # the original format (offset 1) cannot say 0, and says 16 instead
    qweight, qzeros = _gptq_pack(q, zeros, offset)
    w = Q.from_gptq(qweight, qzeros, scales.T.contiguous(), G, g_idx=torch.arange(K) // G, sym=False,
                    zero_offset=offset)
    assert torch.equal(Q.unpack_int4(w.qweight), q.to(torch.int32))
    assert torch.equal(w.qzeros.to(torch.int64), zeros)
    assert torch.allclose(Q.dequantize_w4a16(w), _want(q, zeros, scales))


def test_gptq_symmetric_and_act_order():
    q, _, scales = _random(3)
    eights = torch.full((N, K // G), 8)
    qweight, qzeros = _gptq_pack(q, eights)
    w = Q.from_gptq(qweight, qzeros, scales.T.contiguous(), G)
    assert w.qzeros is None and torch.allclose(Q.dequantize_w4a16(w), _want(q, eights, scales))
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(0)) // G
    with pytest.raises(ValueError, match="act-order"):
        Q.from_gptq(qweight, qzeros, scales.T.contiguous(), G, g_idx=perm)


def test_awq_conversion():
    q, zeros, scales = _random(4)
    qweight, qzeros = _awq_pack(q, zeros)
    w = Q.from_awq(qweight, qzeros, scales.T.contiguous(), G)
    assert torch.equal(Q.unpack_int4(w.qweight), q.to(torch.int32))
    assert torch.allclose(Q.dequantize_w4a16(w), _want(q, zeros, scales))


def test_to_awq_packs_as_autoawq_does():
    q, zeros, scales = _random(4)
    qweight, qzeros = _awq_pack(q, zeros)
    w = Q.from_awq(qweight, qzeros, scales.T.contiguous(), G)
    got = Q.to_awq(w)
    assert torch.equal(got[0], qweight) and torch.equal(got[1], qzeros) and torch.equal(got[2], scales.T)
    with pytest.raises(ValueError, match="asymmetric"):
        Q.to_awq(Q.quantize_w4a16(torch.randn(N, K), G, symmetric=True))


def test_references():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(7, K, generator=g), torch.randn(N, K, generator=g) * 0.05
    exact = x @ w.T
    qw = Q.quantize_w4a16(w, G, symmetric=False)
    assert torch.allclose(Q.reference_w4a16(x, qw), x @ Q.dequantize_w4a16(qw).T, atol=1e-5)
    qi, si = Q.quantize_w8a8(w)
    assert (Q.reference_w8a8(x, qi, si) - exact).abs().max() < 0.02 * exact.abs().max()
    for per_channel in (False, True):
        qf, sf = Q.quantize_fp8(w, per_channel)
        assert qf.dtype == torch.float8_e4m3fn and sf.numel() == (N if per_channel else 1)
        assert (Q.reference_fp8(x, qf, sf) - exact).abs().max() < 0.08 * exact.abs().max()


def test_per_token_fp8_activations():
    x = torch.randn(5, K, generator=torch.Generator().manual_seed(6)) * 3
    xq, s = Q.quantize_per_token_fp8(x)
    assert xq.dtype == torch.float8_e4m3fn and torch.allclose(xq.float().abs().amax(1), torch.full((5,), 448.0))
    assert (xq.float() * s[:, None] - x).abs().max() < 0.07 * x.abs().max()


# --- the CUDA tensor-core W4A16 layout, checked on the CPU --------------------------------------
# The kernel (cuda/kernels/w4a16_mma.cu) feeds mma.sync.m16n8k16 with, per lane l (g = l // 4,
# t = l % 4), PTX's fragments: A register i holds W rows g + 8 (i % 2), logical k 2t + 8 (i // 2)
# + {0, 1} (low, high half), from nibbles i and i + 4 of the lane's word j; B register s holds
# x[token g] at logical k 2t + 8 s + {0, 1}, which the kernel loads from physical column
# 16 t + 4 j + 2 s + {0, 1} of the 64-block; C register c is (row g + 8 (c // 2), token 2t + c % 2).
# Emulating exactly that on the repacked words must give x . dequant(W)^T.

def _emulate_mma_kernel(x, w: Q.W4A16Mma):
    N, Kw = w.shape
    M = x.shape[0]
    words = w.packed.to(torch.int64) & 0xFFFFFFFF  # [tiles, kblocks, 32, 4]
    out = torch.zeros(M, N)
    lanes = torch.arange(32)
    g_, t_ = lanes // 4, lanes % 4
    for tile in range(N // 16):
        for kb in range(Kw // 64):
            s_ = w.scales_t[kb * 64 // w.group_size].float()
            z_ = w.zeros_t[kb * 64 // w.group_size].float() if w.zeros_t is not None else torch.full((N,), 8.0)
            for j in range(4):
                A = torch.full((16, 16), float("nan"))
                B = torch.full((16, M), float("nan"))
                for lane in range(32):
                    g, t = int(g_[lane]), int(t_[lane])
                    word = int(words[tile, kb, lane, j])
                    for i in range(4):
                        for h in range(2):
                            q = (word >> (4 * (i + 4 * h))) & 0xF
                            row = g + 8 * (i % 2)
                            n = tile * 16 + row
                            A[row, 2 * t + 8 * (i // 2) + h] = (q - z_[n]) * s_[n]
                    for s in range(2):
                        for h in range(2):
                            B[2 * t + 8 * s + h] = x[:, kb * 64 + 16 * t + 4 * j + 2 * s + h]
                assert not A.isnan().any() and not B.isnan().any(), "a fragment element is never written"
                out[:, tile * 16:(tile + 1) * 16] += (A @ B).T
    return out


@pytest.mark.parametrize("symmetric", [True, False])
def test_mma_layout_feeds_the_fragments_the_kernel_expects(symmetric):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(32, 128, generator=g) * 0.05
    qw = Q.quantize_w4a16(w, 64, symmetric=symmetric, scale_dtype=torch.float16)
    x = torch.randn(3, 128, generator=g)
    packed = Q.repack_w4a16_mma(qw)
    assert packed.packed.shape == (2, 2, 32, 4) and packed.packed.dtype == torch.int32
    assert torch.allclose(_emulate_mma_kernel(x, packed), Q.reference_w4a16(x, qw), atol=1e-5)


def test_mma_nibbles_cover_each_block_once():
    row, col = Q.mma_nibble_positions()
    flat = (row * 64 + col).flatten()
    assert sorted(flat.tolist()) == list(range(16 * 64))


def test_half_float_magic_turns_a_nibble_into_bias_plus_q():
    # (nibble | magic) read as a 16-bit float is bias + nibble: the kernel's conversion-free dequant.
    q = torch.arange(16, dtype=torch.int32)
    assert torch.equal((q | 0x6400).to(torch.int16).view(torch.float16).float(), 1024.0 + q)
    assert torch.equal((q | 0x4300).to(torch.int16).view(torch.bfloat16).float(), 128.0 + q)


def test_mma_repack_refuses_shapes_the_kernel_cannot_take():
    qw = Q.quantize_w4a16(torch.randn(40, 128), 64)
    with pytest.raises(ValueError, match="N=40"):
        Q.repack_w4a16_mma(qw)
    with pytest.raises(ValueError, match="group_size=32"):
        Q.repack_w4a16_mma(Q.quantize_w4a16(torch.randn(16, 128), 32))
