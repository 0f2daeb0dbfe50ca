"""flashpage's canonical on-disk format for quantized Linear weights, converters from GPTQ and
AWQ checkpoints, and the plain torch references (dequantize, then matmul in fp32) that every
quantized kernel is tested against.

The format (config.json: "quantization_config": {"quant_method": "flashpage", "format": ...,
"group_size": ..., "symmetric": ...}); for a Linear `name` with weight [N, K] (out, in):

- "w4a16": `name.qweight` uint8 [N, K / 2], element (n, k) in byte k // 2, the low nibble for
  even k; `name.scales` fp16/bf16 [N, K / group_size] (group_size -1: one group per row); `name.qzeros` uint8 [N, K / group_size]
  (0..15, or 16: GPTQ's original format stores zero - 1 in a nibble, so a stored 15 means 16)
  when not symmetric. w[n, k] = (q - z) * s, with z = 8 when symmetric.
- "w8a8-int8": `name.qweight` int8 [N, K], `name.scales` float32 [N] (per output channel);
  activations are quantized per token at run time.
- "fp8": `name.qweight` float8_e4m3fn [N, K], `name.scales` float32 [1] (per tensor) or [N].

Rows are output channels, as nn.Linear keeps them, so one row is one contiguous stream; every
backend repacks at load into its kernel's layout (`repack_w4a16_mma` is the reference of the
CUDA tensor-core kernel's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's nibble i holds column AWQ_ORDER[i] of 8


@dataclass
class W4A16:
    qweight: torch.Tensor  # uint8 [N, K // 2]
    scales: torch.Tensor  # fp16/bf16 [N, K // group_size]
    qzeros: torch.Tensor | None  # uint8 [N, K // group_size], None when symmetric
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.qweight.shape[0], self.qweight.shape[1] * 2


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] integers in 0..15 -> uint8 [N, K / 2], low nibble first."""
    if q.shape[1] % 2:
        raise ValueError(f"pack_int4: K={q.shape[1]} must be even")
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] -> int32 [N, K] in 0..15."""
    lo = (packed & 0xF).to(torch.int32)
    hi = (packed >> 4).to(torch.int32)
    return torch.stack([lo, hi], dim=-1).flatten(1)


def quantize_w4a16(w: torch.Tensor, group_size: int = 128, symmetric: bool = True,
                   scale_dtype: torch.dtype = torch.bfloat16) -> W4A16:
    """Round-to-nearest 4-bit quantization of a float weight [N, K], per group of group_size
    input features (for tests and benchmarks; real checkpoints come from GPTQ/AWQ)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"quantize_w4a16: K={K} is not a multiple of group_size={group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    if symmetric:
        scale = g.abs().amax(-1).clamp_min(1e-8) / 7.0
        zero = torch.full_like(scale, 8.0)
    else:
        lo, hi = g.amin(-1), g.amax(-1)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8)
        zero = torch.round(-lo / scale).clamp(0, 15)
    scale = scale.to(scale_dtype)
    q = torch.round(g / scale.float()[..., None] + zero[..., None]).clamp(0, 15).reshape(N, K)
    return W4A16(pack_int4(q), scale, None if symmetric else zero.to(torch.uint8), group_size)


def dequantize_w4a16(w: W4A16) -> torch.Tensor:
    """The float32 weight [N, K] the format stands for."""
    q = unpack_int4(w.qweight).float()
    N, K = q.shape
    z = w.qzeros.float() if w.qzeros is not None else torch.full(w.scales.shape, 8.0, device=q.device)
    g = q.reshape(N, K // w.group_size, w.group_size)
    return ((g - z[..., None]) * w.scales.float()[..., None]).reshape(N, K)


@dataclass
class W4A16Mma:
    """W4A16 in the CUDA tensor-core kernel's layout (cuda/kernels/w4a16_mma.cu)."""
    packed: torch.Tensor  # int32 [N / 16, K / 64, 32, 4]
    scales_t: torch.Tensor  # [K / group_size, N]
    zeros_t: torch.Tensor | None  # uint8 [K / group_size, N]
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.scales_t.shape[1], self.packed.shape[1] * 64


MMA_TILE_N, MMA_BLOCK_K = 16, 64


def mma_nibble_positions(device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) in its 16 x 64 block of every nibble of the mma layout, each [32, 4, 8]:
    lane l, word j, nibble i hold row l // 4 + 8 (i & 1) and column
    16 (l % 4) + 4 j + 2 ((i >> 1) & 1) + (i >> 2)."""
    lane = torch.arange(32, device=device).view(32, 1, 1)
    j = torch.arange(4, device=device).view(1, 4, 1)
    i = torch.arange(8, device=device).view(1, 1, 8)
    row = lane // 4 + 8 * (i & 1) + 0 * j
    col = 16 * (lane % 4) + 4 * j + 2 * ((i >> 1) & 1) + (i >> 2)
    return row, col


def repack_w4a16_mma(w: W4A16) -> W4A16Mma:
    """The canonical format -> the tensor-core kernel's layout (the reference of w4a16_repack)."""
    N, K = w.shape
    if N % MMA_TILE_N or K % MMA_BLOCK_K or w.group_size % MMA_BLOCK_K:
        raise ValueError(f"repack_w4a16_mma: N={N} must be a multiple of 16, K={K} and group_size={w.group_size} "
                         "of 64")
    q = unpack_int4(w.qweight).view(N // 16, 16, K // 64, 64).permute(0, 2, 1, 3)  # [tiles, kblocks, 16, 64]
    row, col = mma_nibble_positions(q.device)
    nib = q[:, :, row, col].to(torch.int64)  # [tiles, kblocks, 32, 4, 8]
    words = (nib << (4 * torch.arange(8, device=q.device))).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    zeros = w.qzeros.T.contiguous() if w.qzeros is not None else None
    return W4A16Mma(words.contiguous(), w.scales.T.contiguous(), zeros, w.group_size)


def _unpack_int32(x: torch.Tensor, axis: int) -> torch.Tensor:
    """int32 words holding 8 nibbles (nibble i at bits 4i..4i+3) -> the nibbles, the 8 of a word
    consecutive along `axis`."""
    shifts = torch.arange(0, 32, 4, device=x.device, dtype=torch.int32)
    nib = (x.unsqueeze(-1) >> shifts) & 0xF  # [..., 8]
    if axis == 0:  # words [R, C] -> [R * 8, C]
        return nib.permute(0, 2, 1).reshape(x.shape[0] * 8, x.shape[1])
    return nib.reshape(x.shape[0], x.shape[1] * 8)  # [R, C] -> [R, C * 8]


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
              g_idx: torch.Tensor | None = None, sym: bool = True, zero_offset: int = 1) -> W4A16:
    """AutoGPTQ's 4-bit layout: qweight int32 [K / 8, N] (8 input rows per word), qzeros int32
    [K / group, N / 8], scales [K / group, N]. GPTQ's original checkpoint format stores zero - 1,
    hence zero_offset=1 (0 for the "gptq_v2" format); a stored 15 then means 16, as GPTQ's own
    kernels read it. Act-order checkpoints (a g_idx that is
    not k // group_size) are refused."""
    K, N = qweight.shape[0] * 8, qweight.shape[1]
    if g_idx is not None:
        trivial = torch.arange(K, device=g_idx.device) // group_size
        if not torch.equal(g_idx.to(trivial.dtype), trivial):
            raise ValueError("GPTQ with act-order (desc_act: a g_idx that permutes groups) is not supported")
    q = _unpack_int32(qweight.to(torch.int32), axis=0).T  # [N, K]
    zeros = _unpack_int32(qzeros.to(torch.int32), axis=1) + zero_offset  # [K / g, N], 0..16
    if scales.shape != (K // group_size, N):
        raise ValueError(f"GPTQ scales have shape {tuple(scales.shape)}, expected {(K // group_size, N)}")
    symmetric = sym and bool((zeros == 8).all())
    return W4A16(pack_int4(q), scales.T.contiguous(), None if symmetric else zeros.T.to(torch.uint8).contiguous(),
                 group_size)


def _awq_columns(x: torch.Tensor) -> torch.Tensor:
    """AutoAWQ words [R, C] -> nibbles [R, C * 8] in column order (undoing AWQ_ORDER)."""
    nib = _unpack_int32(x.to(torch.int32), axis=1).reshape(x.shape[0], x.shape[1], 8)
    out = torch.empty_like(nib)
    out[..., list(AWQ_ORDER)] = nib
    return out.reshape(x.shape[0], x.shape[1] * 8)


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> W4A16:
    """AutoAWQ's GEMM layout: qweight int32 [K, N / 8], qzeros int32 [K / group, N / 8] (both with
    AWQ_ORDER within each word), scales [K / group, N]; always asymmetric."""
    q = _awq_columns(qweight)  # [K, N]
    zeros = _awq_columns(qzeros)  # [K / g, N]
    return W4A16(pack_int4(q.T), scales.T.contiguous(), zeros.T.to(torch.uint8).contiguous(), group_size)


def to_awq(w: W4A16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """from_awq's inverse, for asymmetric W4A16: (qweight int32 [K, N / 8], qzeros int32
    [K / group, N / 8], scales [K / group, N]) as AutoAWQ's GEMM layout stores them."""
    if w.qzeros is None:
        raise ValueError("to_awq: AWQ checkpoints are asymmetric (quantize with symmetric=False)")

    def words(nibbles: torch.Tensor) -> torch.Tensor:  # [R, C] columns -> int32 [R, C / 8]
        m = nibbles.to(torch.int64).reshape(nibbles.shape[0], -1, 8)[..., list(AWQ_ORDER)]
        packed = (m << torch.arange(0, 32, 4, dtype=torch.int64)).sum(-1)
        return (packed - (packed >= 1 << 31).to(torch.int64) * (1 << 32)).to(torch.int32)

    return words(unpack_int4(w.qweight).T), words(w.qzeros.T), w.scales.T.contiguous()


def quantize_w8a8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel: (qweight int8 [N, K], scales float32 [N])."""
    scale = w.float().abs().amax(1).clamp_min(1e-8) / 127.0
    return torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (int8 [M, K], float32 scales [M]), symmetric per row."""
    scale = x.float().abs().amax(1).clamp_min(1e-8) / 127.0
    return torch.round(x.float() / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def quantize_fp8(w: torch.Tensor, per_channel: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """float8_e4m3fn weights with a per-tensor (or per-channel) float32 scale."""
    finfo = torch.finfo(torch.float8_e4m3fn)
    amax = w.float().abs().amax(1) if per_channel else w.float().abs().amax().reshape(1)
    scale = amax.clamp_min(1e-12) / finfo.max
    scaled = w.float() / (scale[:, None] if per_channel else scale)
    return scaled.clamp(finfo.min, finfo.max).to(torch.float8_e4m3fn), scale


def reference_w4a16(x: torch.Tensor, w: W4A16) -> torch.Tensor:
    """y = x @ dequantize(w).T in float32: the reference of the W4A16 kernels."""
    return x.float() @ dequantize_w4a16(w).to(x.device).T


def reference_w8a8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """Per-token int8 activations times per-channel int8 weights, in float32."""
    xq, x_scales = quantize_per_token_int8(x)
    acc = xq.float() @ qweight.float().T  # exact: integer products summed in fp32 (|sum| < 2^24)
    return acc * x_scales[:, None] * w_scales[None, :]


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [M, K] -> (float8_e4m3fn [M, K], float32 scales [M]): scale = amax / 448 per row."""
    finfo = torch.finfo(torch.float8_e4m3fn)
    scale = x.float().abs().amax(1).clamp_min(1e-8) / finfo.max
    return (x.float() / scale[:, None]).clamp(finfo.min, finfo.max).to(torch.float8_e4m3fn), scale


def reference_fp8(x: torch.Tensor, qweight: torch.Tensor, w_scales: torch.Tensor) -> torch.Tensor:
    """FP8 W8A8: per-token fp8 activations times fp8 weights with a per-tensor or per-channel
    scale, in float32."""
    s = w_scales if w_scales.numel() > 1 else w_scales.expand(qweight.shape[0])
    xq, x_scales = quantize_per_token_fp8(x)
    return (xq.float() @ qweight.float().T) * x_scales[:, None] * s[None, :]
