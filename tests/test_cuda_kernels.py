"""CUDA kernels against torch references on the GPU (skipped without a GPU and CUDA torch).
Error metric: ||out - ref|| / ||ref|| with ref in fp32; outputs are poisoned (NaN) first so an
unwritten element fails."""

from __future__ import annotations

import itertools
import math

import pytest

import flashpage

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(
    not (flashpage.cuda_available() and torch.cuda.is_available()), reason="needs a CUDA GPU")

if flashpage.cuda_available() and torch.cuda.is_available():
    from flashpage import cuda_ops

DTYPES = [torch.float16, torch.bfloat16]
TOL = {torch.float16: 5e-3, torch.bfloat16: 2e-2}


def _need_blaslt():
    ok, why = cuda_ops.blaslt_available()
    if not ok:
        pytest.skip(why)


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    assert not torch.isnan(out).any(), "NaN in output (unwritten element?)"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def make_paged(seq_lens, kv_heads, head_dim, block_size, dtype, extra_blocks=7, seed=0):
    """Random paged caches and per-sequence contiguous copies of their K and V."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    blocks_per = [math.ceil(n / block_size) for n in seq_lens]
    num_blocks = sum(blocks_per) + extra_blocks
    k_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g, device="cuda").to(dtype)
    v_cache = torch.randn(num_blocks, kv_heads, block_size, head_dim, generator=g, device="cuda").to(dtype)
    perm = torch.randperm(num_blocks, generator=g, device="cuda").to(torch.int32)
    width = max(blocks_per) + 2
    tables = torch.full((len(seq_lens), width), -1, dtype=torch.int32, device="cuda")
    at = 0
    for i, nb in enumerate(blocks_per):
        tables[i, :nb] = perm[at:at + nb]
        at += nb
    return k_cache, v_cache, tables


def gather(cache, table, n):
    """[num_blocks, heads, bs, d] -> [heads, n, d] for one sequence."""
    bs = cache.shape[2]
    blocks = table[: math.ceil(n / bs)].long()
    x = cache[blocks]  # [nb, heads, bs, d]
    return x.permute(1, 0, 2, 3).reshape(cache.shape[1], -1, cache.shape[3])[:, :n]


def ref_decode(q, k_cache, v_cache, tables, lens, scale):
    out = torch.empty_like(q, dtype=torch.float32)
    q_heads, kv_heads = q.shape[1], k_cache.shape[1]
    for i, n in enumerate(lens):
        k = gather(k_cache, tables[i], n).float().repeat_interleave(q_heads // kv_heads, 0)
        v = gather(v_cache, tables[i], n).float().repeat_interleave(q_heads // kv_heads, 0)
        s = torch.einsum("hd,hnd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,hnd->hd", s.softmax(-1), v)
    return out


DECODE_CASES = [
    # (seq lens, q heads, kv heads, head dim, block size, splits)
    ([1], 32, 8, 128, 16, 0),
    ([16, 17, 32, 33], 32, 8, 128, 16, 0),
    ([5, 300, 1000], 32, 8, 128, 16, 3),
    ([4000, 70], 32, 8, 128, 16, 0),
    ([4000], 32, 8, 128, 16, 1),
    ([257, 31, 64], 8, 8, 128, 32, 0),
    ([100, 2048], 12, 4, 64, 16, 0),
    ([33, 600], 28, 4, 128, 32, 2),
    ([1, 15, 999], 16, 16, 64, 32, 0),
    ([513, 7], 32, 2, 128, 16, 0),
    ([129], 9, 3, 64, 16, 0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_paged_decode_matches_reference(case, dtype):
    lens, q_heads, kv_heads, head_dim, block_size, splits = case
    k_cache, v_cache, tables = make_paged(lens, kv_heads, head_dim, block_size, dtype)
    q = torch.randn(len(lens), q_heads, head_dim, device="cuda").to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(head_dim)
    cuda_ops.paged_decode(q, k_cache, v_cache, tables, ctx, max(lens), scale, splits, out=out)
    torch.cuda.synchronize()
    assert rel_err(out, ref_decode(q, k_cache, v_cache, tables, lens, scale)) < TOL[dtype]


def test_paged_decode_rejects_unsupported_shapes():
    k_cache, v_cache, tables = make_paged([10], 2, 96, 16, torch.float16)
    q = torch.randn(1, 4, 96, device="cuda", dtype=torch.float16)
    ctx = torch.tensor([10], dtype=torch.int32, device="cuda")
    with pytest.raises(RuntimeError, match="unsupported shape"):
        cuda_ops.paged_decode(q, k_cache, v_cache, tables, ctx, 10)
    with pytest.raises(ValueError, match="int32"):
        cuda_ops.paged_decode(q, k_cache, v_cache, tables.long(), ctx, 10)


def ref_prefill(q, k_cache, v_cache, tables, qsl, lens, scale):
    out = torch.empty_like(q, dtype=torch.float32)
    q_heads, kv_heads = q.shape[1], k_cache.shape[1]
    for i, n in enumerate(lens):
        a, b = int(qsl[i]), int(qsl[i + 1])
        k = gather(k_cache, tables[i], n).float().repeat_interleave(q_heads // kv_heads, 0)
        v = gather(v_cache, tables[i], n).float().repeat_interleave(q_heads // kv_heads, 0)
        qi = q[a:b].float().transpose(0, 1)  # [h, q_len, d]
        s = torch.einsum("hqd,hnd->hqn", qi, k) * scale
        pos_q = torch.arange(n - (b - a), n, device="cuda")[:, None]
        s = s.masked_fill(torch.arange(n, device="cuda")[None, :] > pos_q, float("-inf"))
        out[a:b] = torch.einsum("hqn,hnd->hqd", s.softmax(-1), v).transpose(0, 1)
    return out


PREFILL_CASES = [
    # (query lens, context lens, q heads, kv heads, head dim, block size)
    ([5], [5], 8, 8, 128, 16),
    ([64, 65, 1, 130], [64, 100, 37, 130], 32, 8, 128, 16),   # chunks after cached context
    ([200, 1, 1], [1000, 16, 17], 12, 4, 64, 32),            # a prefill chunk beside decodes
    ([300], [300], 28, 4, 128, 32),
    ([17, 33], [17, 48], 9, 3, 64, 16),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", PREFILL_CASES)
def test_paged_prefill_matches_reference(case, dtype):
    qlens, lens, q_heads, kv_heads, head_dim, block_size = case
    k_cache, v_cache, tables = make_paged(lens, kv_heads, head_dim, block_size, dtype, seed=1)
    qsl = torch.tensor([0] + list(itertools.accumulate(qlens)), dtype=torch.int32, device="cuda")
    q = torch.randn(sum(qlens), q_heads, head_dim, device="cuda").to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32, device="cuda")
    out = torch.full_like(q, float("nan"))
    scale = 1 / math.sqrt(head_dim)
    cuda_ops.paged_prefill(q, k_cache, v_cache, tables, qsl, ctx, max(qlens), scale, out=out)
    torch.cuda.synchronize()
    assert rel_err(out, ref_prefill(q, k_cache, v_cache, tables, qsl, lens, scale)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size,head_dim", [(16, 128), (32, 64)])
def test_reshape_and_cache_writes_the_slots(dtype, block_size, head_dim):
    tokens, kv_heads, num_blocks = 37, 4, 9
    key = torch.randn(tokens, kv_heads, head_dim, device="cuda").to(dtype)
    value = torch.randn(tokens, kv_heads, head_dim, device="cuda").to(dtype)
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:tokens].to(torch.int32)
    slots[5] = -1  # padding: skipped
    k_cache = torch.zeros(num_blocks, kv_heads, block_size, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    cuda_ops.reshape_and_cache(key, value, k_cache, v_cache, slots)
    torch.cuda.synchronize()
    for t in range(tokens):
        s = int(slots[t])
        if s < 0:
            continue
        assert torch.equal(k_cache[s // block_size, :, s % block_size], key[t])
        assert torch.equal(v_cache[s // block_size, :, s % block_size], value[t])
    assert int((k_cache != 0).any(-1).sum()) == (tokens - 1) * kv_heads


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [8, 576, 4096, 5120])
def test_fused_add_rms_norm(dtype, hidden):
    x = torch.randn(13, hidden, device="cuda").to(dtype)
    res = torch.randn(13, hidden, device="cuda").to(dtype)
    w = torch.randn(hidden, device="cuda").to(dtype)
    r32 = x.float() + res.float()
    want = r32 * torch.rsqrt(r32.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    res_in = res.clone()
    out = cuda_ops.fused_add_rms_norm(x, res_in, w, 1e-5)
    torch.cuda.synchronize()
    assert rel_err(res_in, r32) < TOL[dtype] / 4
    assert rel_err(out, want) < TOL[dtype]
    plain = cuda_ops.fused_add_rms_norm(x, None, w, 1e-5)
    x32 = x.float()
    assert rel_err(plain, x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype):
    x = torch.randn(7, 2 * 1408, device="cuda").to(dtype)
    out = cuda_ops.silu_and_mul(x)
    torch.cuda.synchronize()
    g, u = x.float().chunk(2, -1)
    assert rel_err(out, torch.nn.functional.silu(g) * u) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rotary_embedding_rotate_half(dtype, head_dim):
    tokens, q_heads, kv_heads, max_pos = 11, 8, 2, 4096
    inv_freq = 1.0 / (500000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos, device="cuda").float(), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).contiguous()
    q = torch.randn(tokens, q_heads, head_dim, device="cuda").to(dtype)
    k = torch.randn(tokens, kv_heads, head_dim, device="cuda").to(dtype)
    pos = torch.randint(0, max_pos, (tokens,), device="cuda", dtype=torch.int32)
    want = []
    for x in (q, k):
        c = freqs[pos.long()].cos()[:, None, :].repeat(1, 1, 2)
        s = freqs[pos.long()].sin()[:, None, :].repeat(1, 1, 2)
        x1, x2 = x.float().chunk(2, -1)
        want.append(x.float() * c + torch.cat([-x2, x1], -1) * s)
    cuda_ops.rotary_embedding(q, k, pos, cos_sin)
    torch.cuda.synchronize()
    assert rel_err(q, want[0]) < TOL[dtype]
    assert rel_err(k, want[1]) < TOL[dtype]


W4A16_CASES = [
    # (M, N, K, group size, symmetric)
    (1, 4096, 4096, 128, True),
    (1, 8, 128, 32, False),
    (3, 384, 1024, 128, False),
    (16, 1000, 2048, 64, True),
    (33, 256, 512, 128, False),  # beyond one 16-row tile, a partial last tile
    (7, 130, 14336, 128, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,G,sym", W4A16_CASES)
def test_w4a16_gemm_matches_dequantize_then_matmul(dtype, M, N, K, G, sym):
    from flashpage.quantization import quantize_w4a16, reference_w4a16
    g = torch.Generator().manual_seed(M * 7 + N)
    w = torch.randn(N, K, generator=g) * 0.05
    qw = quantize_w4a16(w, G, symmetric=sym, scale_dtype=dtype)
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    zeros = qw.qzeros.cuda() if qw.qzeros is not None else None
    out = cuda_ops.w4a16_gemm(x, qw.qweight.cuda(), qw.scales.cuda(), zeros, G)
    ref = reference_w4a16(x.float(), qw)
    assert out.shape == (M, N) and rel_err(out, ref) < TOL[dtype]


def test_w4a16_gemm_refuses_bad_shapes():
    x = torch.randn(2, 100, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="multiples of 32"):
        cuda_ops.w4a16_gemm(x, torch.zeros(8, 50, dtype=torch.uint8, device="cuda"),
                            torch.ones(8, 1, dtype=torch.float16, device="cuda"), None, 100)
    with pytest.raises(ValueError, match="do not fit"):
        cuda_ops.w4a16_gemm(torch.randn(2, 128, device="cuda", dtype=torch.float16),
                            torch.zeros(8, 32, dtype=torch.uint8, device="cuda"),
                            torch.ones(8, 1, dtype=torch.float16, device="cuda"), None, 128)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (5, 130, 512), (16, 1000, 2048), (40, 64, 14336),
                                   (300, 520, 1024)])
@pytest.mark.parametrize("mode", [-1, 0, 1])
def test_w8a8_gemm_matches_the_int8_reference(dtype, M, N, K, mode):
    from flashpage.quantization import quantize_per_token_int8, quantize_w8a8, reference_w8a8
    if mode == 1:
        _need_blaslt()
    g = torch.Generator().manual_seed(M + N)
    w = torch.randn(N, K, generator=g) * 0.05
    qweight, w_scales = quantize_w8a8(w)
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    xq, xs = cuda_ops.quantize_per_token_int8(x)
    ref_q, ref_s = quantize_per_token_int8(x.float())
    assert torch.allclose(xs, ref_s, rtol=1e-6) and (xq.int() - ref_q.int()).abs().max() <= 1
    out = cuda_ops.w8a8_gemm(x, qweight.cuda(), w_scales.cuda(), mode=mode)
    assert out.shape == (M, N) and rel_err(out, reference_w8a8(x.float(), qweight.cuda(), w_scales.cuda())) < TOL[dtype]


# --- the tensor-core W4A16 kernel, cuBLASLt dense and FP8 GEMMs -----------------------------------

def _w4a16(N, K, G, sym, dtype, seed):
    from flashpage.quantization import quantize_w4a16
    g = torch.Generator().manual_seed(seed)
    qw = quantize_w4a16(torch.randn(N, K, generator=g) * 0.05, G, symmetric=sym, scale_dtype=dtype)
    dev = cuda_ops.w4a16_repack(qw.qweight.cuda(), qw.scales.cuda(),
                                qw.qzeros.cuda() if qw.qzeros is not None else None, G)
    return qw, dev


@pytest.mark.parametrize("sym", [True, False])
def test_w4a16_repack_matches_the_reference_layout(sym):
    from flashpage.quantization import repack_w4a16_mma
    qw, dev = _w4a16(48, 384, 128, sym, torch.bfloat16, 1)
    ref = repack_w4a16_mma(qw)
    assert torch.equal(dev.packed.cpu(), ref.packed) and torch.equal(dev.scales_t.cpu(), ref.scales_t)
    assert (dev.zeros_t is None) == sym and (sym or torch.equal(dev.zeros_t.cpu(), ref.zeros_t))


@pytest.mark.parametrize("dtype", DTYPES)
def test_w4a16_dequantize_matches_the_reference(dtype):
    from flashpage.quantization import dequantize_w4a16
    qw, dev = _w4a16(64, 256, 64, False, dtype, 2)
    assert torch.allclose(cuda_ops.w4a16_dequantize(dev).float().cpu(), dequantize_w4a16(qw).to(dtype).float())


W4A16_MMA_CASES = [  # (M, N, K, group_size, symmetric)
    (1, 4096, 4096, 128, True),
    (1, 16, 64, 64, False),
    (3, 48, 4096, 4096, False),  # channel-wise scales
    (8, 1040, 512, 128, True),
    (9, 64, 1024, 64, False),
    (16, 256, 14336, 128, True),
    (17, 128, 256, 128, False),
    (33, 4096, 256, 128, True),
    (64, 192, 512, 128, False),
    (100, 512, 512, 256, True),
    (256, 1024, 1024, 128, False),
    (600, 272, 512, 128, True),  # dequantize + cuBLASLt
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,G,sym", W4A16_MMA_CASES)
def test_w4a16_linear_matches_dequantize_then_matmul(dtype, M, N, K, G, sym):
    from flashpage.quantization import reference_w4a16
    qw, dev = _w4a16(N, K, G, sym, dtype, M + N)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).to(dtype).cuda()
    out = cuda_ops.w4a16_linear(x, dev)
    assert out.shape == (M, N) and rel_err(out, reference_w4a16(x.float(), qw)) < TOL[dtype]


@pytest.mark.parametrize("config", [-2, *range(6)])
def test_w4a16_linear_every_configuration(config):
    from flashpage.quantization import reference_w4a16
    assert cuda_ops.w4a16_num_configs() == 6
    qw, dev = _w4a16(208, 640, 128, False, torch.bfloat16, 3)
    for M in (1, 37, 70):
        x = torch.randn(M, 640, generator=torch.Generator().manual_seed(M)).to(torch.bfloat16).cuda()
        assert rel_err(cuda_ops.w4a16_linear(x, dev, config=config), reference_w4a16(x.float(), qw)) < 2e-2


def test_w4a16_linear_refuses_what_it_cannot_run():
    qw, dev = _w4a16(32, 128, 64, True, torch.float16, 4)
    with pytest.raises(ValueError, match="K=128"):
        cuda_ops.w4a16_linear(torch.randn(2, 64, device="cuda", dtype=torch.float16), dev)
    with pytest.raises(ValueError, match="scales must be"):
        cuda_ops.w4a16_linear(torch.randn(2, 128, device="cuda", dtype=torch.bfloat16), dev)
    with pytest.raises(RuntimeError, match="config"):
        cuda_ops.w4a16_linear(torch.randn(2, 128, device="cuda", dtype=torch.float16), dev, config=99)
    from flashpage.quantization import quantize_w4a16
    odd = quantize_w4a16(torch.randn(40, 128), 64)
    with pytest.raises(RuntimeError, match="N=40 must be a multiple of 16"):
        cuda_ops.w4a16_repack(odd.qweight.cuda(), odd.scales.cuda(), None, 64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (7, 100, 72), (256, 1024, 512), (1000, 384, 4096)])
def test_dense_gemm_matches_torch(dtype, M, N, K):
    _need_blaslt()
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, K, generator=g).to(dtype).cuda()
    w = (torch.randn(N, K, generator=g) * 0.05).to(dtype).cuda()
    assert rel_err(cuda_ops.gemm(x, w), x.float() @ w.float().T) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_fp8_quantization_matches_the_reference(dtype):
    from flashpage.quantization import quantize_per_token_fp8
    x = (torch.randn(9, 4096, generator=torch.Generator().manual_seed(9)) * 4).to(dtype).cuda()
    xq, s = cuda_ops.quantize_per_token_fp8(x)
    ref_q, ref_s = quantize_per_token_fp8(x.float())
    assert torch.allclose(s, ref_s, rtol=1e-6)
    assert torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
                    reason="FP8 needs sm_89+")
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("M,N,K", [(1, 4096, 4096), (16, 256, 1024), (1024, 512, 2048), (33, 4096, 14336)])
def test_fp8_linear_matches_the_reference(per_channel, M, N, K):
    from flashpage.quantization import quantize_fp8, reference_fp8
    _need_blaslt()
    g = torch.Generator().manual_seed(M + N)
    w = torch.randn(N, K, generator=g) * 0.05
    qweight, w_scales = quantize_fp8(w, per_channel)
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).cuda()
    ref = reference_fp8(x.float(), qweight.cuda(), w_scales.cuda())
    for fast in (False, True):
        out = cuda_ops.fp8_linear(x, qweight.cuda(), w_scales.cuda(), fast_accum=fast)
        assert out.shape == (M, N) and rel_err(out, ref) < 2e-2


def test_fp8_linear_refuses_bad_arguments():
    x = torch.randn(2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        cuda_ops.fp8_linear(x, torch.zeros(16, 64, device="cuda", dtype=torch.bfloat16),
                            torch.ones(1, device="cuda"))
    with pytest.raises(ValueError, match="1 or N=16"):
        cuda_ops.fp8_linear(x, torch.zeros(16, 64, device="cuda").to(torch.float8_e4m3fn),
                            torch.ones(3, device="cuda"))
    with pytest.raises(RuntimeError, match="multiple of 16"):
        cuda_ops.fp8_linear(torch.randn(2, 40, device="cuda", dtype=torch.bfloat16),
                            torch.zeros(16, 40, device="cuda").to(torch.float8_e4m3fn), torch.ones(1, device="cuda"))
