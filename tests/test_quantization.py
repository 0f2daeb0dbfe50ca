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
