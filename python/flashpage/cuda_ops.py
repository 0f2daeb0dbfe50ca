"""The CUDA kernels of libflashpage_cuda on torch tensors, through the library's C ABI.

For tests and benchmarks on a GPU machine (it needs torch with CUDA); the engine itself
calls the kernels from C++. Every function checks shapes and dtypes and raises ValueError
naming the problem, or RuntimeError with the CUDA error.
"""

from __future__ import annotations

import ctypes
import functools
import math
from typing import Any

from flashpage import _core

_ERR_LEN = 512


_p, _i, _f, _i64, _u32, _sz = (ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64, ctypes.c_uint32,
                               ctypes.c_size_t)
_ip = ctypes.POINTER(ctypes.c_int)
# The table of cpp/src/runtime/cuda_abi.h, entry by entry, in its order: (name, return type,
# argument types). tests/test_cuda_abi.py checks it against the header.
OPS_TABLE: list[tuple[str, Any, list[Any]]] = [
    ("device_count", _i, [_ip, _p, _sz]),
    ("device_name", _i, [_i, _p, _sz, _p, _sz]),
    ("axpy", _i, [_i, _f, _p, _p, _p, _sz]),
    ("num_sms", _i, [_i, _ip, _p, _sz]),
    ("reshape_and_cache", _i, [_i, _p, _p, _p, _p, _p, _i, _i, _i, _i, _p, _p, _sz]),
    ("fused_add_rms_norm", _i, [_i, _p, _p, _p, _p, _i, _i, _f, _p, _p, _sz]),
    ("silu_and_mul", _i, [_i, _p, _p, _i, _i, _p, _p, _sz]),
    ("rotary_embedding", _i, [_i, _p, _p, _p, _p, _i, _i, _i, _i, _p, _p, _sz]),
    ("paged_decode_workspace", _i64, [_i, _i, _i, _i, _i, _i, _i, _i]),
    ("paged_decode", _i, [_i, _p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _i, _i, _f, _i, _p, _p, _sz]),
    ("paged_prefill", _i, [_i, _p, _p, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _i, _i, _f, _p, _p, _sz]),
    ("w4a16_gemm", _i, [_i, _p, _p, _p, _p, _p, _i, _i, _i, _i, _p, _p, _sz]),
    ("quantize_per_token_int8", _i, [_i, _p, _p, _p, _i, _i, _p, _p, _sz]),
    ("quantize_per_token_fp8", _i, [_i, _p, _p, _p, _i, _i, _p, _p, _sz]),
    ("blaslt_available", _i, [_p, _sz]),
    ("gemm", _i, [_i, _p, _p, _p, _i, _i, _i, _p, _p, _sz]),
    ("fp8_linear_workspace", _i64, [_i, _i]),
    ("fp8_linear", _i, [_i, _p, _p, _p, _p, _i, _i, _i, _i, _p, _i64, _p, _p, _sz]),
    ("w4a16_repack", _i, [_i, _p, _p, _p, _p, _p, _p, _i, _i, _i, _p, _p, _sz]),
    ("w4a16_dequantize", _i, [_i, _p, _p, _p, _p, _i, _i, _i, _p, _p, _sz]),
    ("w4a16_num_configs", _i, []),
    ("w4a16_linear_workspace", _i64, [_i, _i, _i, _i]),
    ("w4a16_linear", _i, [_i, _p, _p, _p, _p, _p, _i, _i, _i, _i, _i, _p, _i64, _p, _p, _sz]),
    ("w8a8_linear_workspace", _i64, [_i, _i, _i, _i]),
    ("w8a8_linear", _i, [_i, _p, _p, _p, _p, _i, _i, _i, _i, _p, _i64, _p, _p, _sz]),
    ("set_device", _i, [_i, _p, _sz]),
    ("mem_info", _i, [_p, _p, _p, _sz]),
    ("device_malloc", _i, [_p, _sz, _p, _sz]),
    ("device_free", _i, [_p, _p, _sz]),
    ("host_malloc", _i, [_p, _sz, _p, _sz]),
    ("host_free", _i, [_p, _p, _sz]),
    ("memcpy_async", _i, [_p, _p, _sz, _p, _p, _sz]),
    ("stream_create", _i, [_p, _p, _sz]),
    ("stream_destroy", _i, [_p, _p, _sz]),
    ("stream_synchronize", _i, [_p, _p, _sz]),
    ("gather_rows", _i, [_p, _p, _p, _i, _i64, _p, _p, _sz]),
    ("linear", _i, [_i, _p, _p, _p, _p, _i, _i, _i, _i, _p, _p, _sz]),
    ("widen_to_float", _i, [_i, _p, _p, _i64, _p, _p, _sz]),
    ("attention_supported", _i, [_i, _i, _i, _i]),
    ("graph_begin", _i, [_p, _p, _sz]),
    ("graph_end", _i, [_p, _p, _p, _sz]),
    ("graph_launch", _i, [_p, _p, _p, _sz]),
    ("graph_destroy", _i, [_p, _p, _sz]),
]
ABI_VERSION = 2  # FLASHPAGE_CUDA_ABI_VERSION


class CudaOps(ctypes.Structure):
    _fields_ = [("abi_version", _u32), ("size", _u32)] + [
        (name, ctypes.CFUNCTYPE(ret, *args)) for name, ret, args in OPS_TABLE]


@functools.cache
def _ops() -> CudaOps:
    info = _core.cuda_info()
    if not info["available"]:
        raise RuntimeError(f"CUDA backend not available: {info['reason']}")
    lib = ctypes.CDLL(info["library_path"])
    get_ops = lib.flashpage_cuda_get_ops
    get_ops.restype = ctypes.POINTER(CudaOps)
    get_ops.argtypes = []
    ops = get_ops().contents
    if ops.abi_version != ABI_VERSION or ops.size < ctypes.sizeof(CudaOps):
        raise RuntimeError(f"{info['library_path']}: ABI version {ops.abi_version} ({ops.size}-byte table), "
                           f"flashpage.cuda_ops expects {ABI_VERSION} ({ctypes.sizeof(CudaOps)} bytes)")
    return ops


def _call(name: str, *args: Any) -> None:
    err = ctypes.create_string_buffer(_ERR_LEN)
    if getattr(_ops(), name)(*args, err, _ERR_LEN) != 0:
        raise RuntimeError(err.value.decode())


def _dtype_code(t: Any) -> int:
    import torch

    if t.dtype == torch.float16:
        return 0
    if t.dtype == torch.bfloat16:
        return 1
    raise ValueError(f"expected a float16 or bfloat16 tensor, got {t.dtype}")


def _check(t: Any, name: str, *, dtype: Any = None, dim: int | None = None) -> None:
    if not t.is_cuda or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous CUDA tensor")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")


def _stream() -> int:
    import torch

    return torch.cuda.current_stream().cuda_stream


def _workspace(workspace: Any | None, need: int, device: Any) -> Any | None:
    """A uint8 workspace of at least `need` bytes: the caller's if big enough, else a new one
    (None when nothing is needed and none was given)."""
    import torch

    if need > 0 and (workspace is None or workspace.numel() < need):
        return torch.empty(need, dtype=torch.uint8, device=device)
    return workspace


def _bytes_of(workspace: Any | None) -> tuple[int | None, int]:
    return (None, 0) if workspace is None else (workspace.data_ptr(), workspace.numel())


@functools.cache
def num_sms(device: int = 0) -> int:
    n = ctypes.c_int(0)
    _call("num_sms", device, ctypes.byref(n))
    return n.value


def reshape_and_cache(key: Any, value: Any, k_cache: Any, v_cache: Any, slot_mapping: Any) -> None:
    """key/value [tokens, kv_heads, head_dim] -> caches [blocks, kv_heads, block_size, head_dim]."""
    import torch

    for t, n in ((key, "key"), (value, "value")):
        _check(t, n, dtype=k_cache.dtype, dim=3)
    for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check(t, n, dim=4)
    _check(slot_mapping, "slot_mapping", dtype=torch.int32, dim=1)
    tokens, kv_heads, head_dim = key.shape
    if k_cache.shape[1] != kv_heads or k_cache.shape[3] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(f"cache shape {tuple(k_cache.shape)} does not fit key {tuple(key.shape)}")
    _call("reshape_and_cache", _dtype_code(key), key.data_ptr(), value.data_ptr(),
          k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(), tokens, kv_heads,
          head_dim, k_cache.shape[2], _stream())


def fused_add_rms_norm(x: Any, residual: Any | None, weight: Any, eps: float) -> Any:
    """residual += x (in place); returns rmsnorm(residual) * weight (or of x without residual)."""
    import torch

    _check(x, "x", dim=2)
    _check(weight, "weight", dtype=x.dtype, dim=1)
    if residual is not None:
        _check(residual, "residual", dtype=x.dtype, dim=2)
    out = torch.empty_like(x)
    _call("fused_add_rms_norm", _dtype_code(x), out.data_ptr(), x.data_ptr(),
          residual.data_ptr() if residual is not None else None, weight.data_ptr(), x.shape[0],
          x.shape[1], eps, _stream())
    return out


def silu_and_mul(x: Any) -> Any:
    import torch

    _check(x, "x", dim=2)
    inter = x.shape[1] // 2
    out = torch.empty((x.shape[0], inter), dtype=x.dtype, device=x.device)
    _call("silu_and_mul", _dtype_code(x), out.data_ptr(), x.data_ptr(), x.shape[0],
          inter, _stream())
    return out


def rotary_embedding(q: Any, k: Any, positions: Any, cos_sin: Any) -> None:
    """In place on q [tokens, q_heads, head_dim] and k [tokens, kv_heads, head_dim]."""
    import torch

    _check(q, "q", dim=3)
    _check(k, "k", dtype=q.dtype, dim=3)
    _check(positions, "positions", dtype=torch.int32, dim=1)
    _check(cos_sin, "cos_sin", dtype=torch.float32, dim=2)
    _call("rotary_embedding", _dtype_code(q), q.data_ptr(), k.data_ptr(),
          positions.data_ptr(), cos_sin.data_ptr(), q.shape[0], q.shape[1], k.shape[1], q.shape[2],
          _stream())


def paged_decode(q: Any, k_cache: Any, v_cache: Any, block_tables: Any, context_lens: Any,
                 max_context_len: int, scale: float | None = None, num_splits: int = 0,
                 out: Any | None = None, workspace: Any | None = None) -> Any:
    """Attention of q [seqs, q_heads, head_dim] over the paged caches; returns [seqs, q_heads, head_dim]."""
    import torch

    _check(q, "q", dim=3)
    for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check(t, n, dtype=q.dtype, dim=4)
    _check(block_tables, "block_tables", dtype=torch.int32, dim=2)
    _check(context_lens, "context_lens", dtype=torch.int32, dim=1)
    seqs, q_heads, head_dim = q.shape
    kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    need = paged_decode_workspace_floats(seqs, q_heads, kv_heads, head_dim, block_size,
                                         max_context_len, num_splits, q.device.index or 0)
    if need > 0 and (workspace is None or workspace.numel() < need):
        workspace = torch.empty(need, dtype=torch.float32, device=q.device)
    if out is None:
        out = torch.empty_like(q)
    _call("paged_decode", _dtype_code(q), q.data_ptr(), k_cache.data_ptr(),
          v_cache.data_ptr(), block_tables.data_ptr(), context_lens.data_ptr(), out.data_ptr(),
          workspace.data_ptr() if need > 0 else None, seqs, q_heads, kv_heads, head_dim,
          block_size, block_tables.shape[1], max_context_len, num_sms(q.device.index or 0), scale,
          num_splits, _stream())
    return out


def paged_decode_workspace_floats(seqs: int, q_heads: int, kv_heads: int, head_dim: int,
                                  block_size: int, max_context_len: int, num_splits: int = 0,
                                  device: int = 0) -> int:
    """Floats of workspace paged_decode needs (0 when it runs unsplit)."""
    return int(_ops().paged_decode_workspace(
        seqs, q_heads, kv_heads, head_dim, block_size, max_context_len, num_sms(device), num_splits))


def paged_prefill(q: Any, k_cache: Any, v_cache: Any, block_tables: Any, query_start_loc: Any,
                  context_lens: Any, max_query_len: int, scale: float | None = None,
                  out: Any | None = None) -> Any:
    """Causal attention of the flattened batch's query rows q [tokens, q_heads, head_dim]
    over each sequence's paged KV (its newest q_len positions are the rows' own)."""
    import torch

    _check(q, "q", dim=3)
    for t, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        _check(t, n, dtype=q.dtype, dim=4)
    for t, n in ((block_tables, "block_tables"), (query_start_loc, "query_start_loc"),
                 (context_lens, "context_lens")):
        _check(t, n, dtype=torch.int32)
    seqs = context_lens.shape[0]
    if query_start_loc.shape[0] != seqs + 1:
        raise ValueError("query_start_loc must have one entry more than context_lens")
    _, q_heads, head_dim = q.shape
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    if out is None:
        out = torch.empty_like(q)
    _call("paged_prefill", _dtype_code(q), q.data_ptr(), k_cache.data_ptr(),
          v_cache.data_ptr(), block_tables.data_ptr(), query_start_loc.data_ptr(),
          context_lens.data_ptr(), out.data_ptr(), seqs, q_heads, k_cache.shape[1], head_dim,
          k_cache.shape[2], block_tables.shape[1], max_query_len, scale, _stream())
    return out


def _check_w4a16(qweight: Any, scales: Any, zeros: Any | None, group_size: int) -> tuple[int, int]:
    """The canonical int4 tensors' shapes agree; returns (N, K)."""
    import torch

    _check(qweight, "qweight", dtype=torch.uint8, dim=2)
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if group_size <= 0 or K % group_size or scales.shape != (N, K // group_size):
        raise ValueError(f"scales {tuple(scales.shape)} do not fit qweight {tuple(qweight.shape)} with group_size "
                         f"{group_size}")
    if zeros is not None:
        _check(zeros, "zeros", dtype=torch.uint8, dim=2)
        if zeros.shape != scales.shape:
            raise ValueError(f"zeros {tuple(zeros.shape)} must match scales {tuple(scales.shape)}")
    return N, K


def w4a16_gemm(x: Any, qweight: Any, scales: Any, zeros: Any | None, group_size: int) -> Any:
    """y [M, N] = x [M, K] . dequant(W)^T for the canonical int4 layout (flashpage.quantization):
    qweight uint8 [N, K / 2], scales [N, K / group_size] in x's dtype, zeros uint8 or None."""
    import torch

    _check(x, "x", dim=2)
    _check(scales, "scales", dtype=x.dtype, dim=2)
    N, K = _check_w4a16(qweight, scales, zeros, group_size)
    if x.shape[1] != K:
        raise ValueError(f"qweight {tuple(qweight.shape)} does not fit x {tuple(x.shape)}")
    M = x.shape[0]
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _call("w4a16_gemm", _dtype_code(x), x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
          zeros.data_ptr() if zeros is not None else None, out.data_ptr(), M, N, K, group_size, _stream())
    return out


def _quantize_per_token(x: Any, dtype: Any, fn: str) -> tuple[Any, Any]:
    import torch

    _check(x, "x", dim=2)
    xq = torch.empty(x.shape, dtype=dtype, device=x.device)
    scales = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    _call(fn, _dtype_code(x), x.data_ptr(), xq.data_ptr(), scales.data_ptr(), x.shape[0], x.shape[1], _stream())
    return xq, scales


def quantize_per_token_int8(x: Any) -> tuple[Any, Any]:
    """x [M, K] fp16/bf16 -> (int8 [M, K], float32 scales [M]), symmetric per row."""
    import torch

    return _quantize_per_token(x, torch.int8, "quantize_per_token_int8")


def w8a8_gemm(x: Any, qweight: Any, w_scales: Any, mode: int = -1, workspace: Any | None = None) -> Any:
    """y [M, N] in x's dtype: x quantized per token to int8, times int8 weights [N, K] with
    per-channel float32 scales [N] (the canonical w8a8-int8 layout). mode -1 chooses by M, 0 forces
    the __dp4a kernel, 1 cuBLASLt's int8 tensor cores."""
    import torch

    _check(x, "x", dim=2)
    _check(qweight, "qweight", dtype=torch.int8, dim=2)
    _check(w_scales, "w_scales", dtype=torch.float32, dim=1)
    if qweight.shape[1] != x.shape[1] or w_scales.shape[0] != qweight.shape[0]:
        raise ValueError(f"qweight {tuple(qweight.shape)} / w_scales {tuple(w_scales.shape)} do not fit x "
                         f"{tuple(x.shape)}")
    M, K = x.shape
    N = qweight.shape[0]
    workspace = _workspace(workspace, int(_ops().w8a8_linear_workspace(M, N, K, mode)), x.device)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _call("w8a8_linear", _dtype_code(x), x.data_ptr(), qweight.data_ptr(), w_scales.data_ptr(),
          out.data_ptr(), M, N, K, mode, *_bytes_of(workspace), _stream())
    return out


def blaslt_available() -> tuple[bool, str]:
    """Whether cuBLASLt (the dense and FP8 GEMMs) can be loaded, and if not why."""
    why = ctypes.create_string_buffer(_ERR_LEN)
    ok = _ops().blaslt_available(why, _ERR_LEN) == 1
    return ok, why.value.decode()


def _check_weight(w: Any, x: Any, name: str) -> None:
    _check(w, name, dim=2)
    if w.shape[1] != x.shape[1]:
        raise ValueError(f"{name} {tuple(w.shape)} does not fit x {tuple(x.shape)}: both need K={x.shape[1]} columns")


def gemm(x: Any, w: Any) -> Any:
    """Dense y [M, N] = x [M, K] . w [N, K]^T in fp16/bf16 through cuBLASLt."""
    import torch

    _check(x, "x", dim=2)
    _check_weight(w, x, "w")
    if w.dtype != x.dtype:
        raise ValueError(f"w must be {x.dtype}, got {w.dtype}")
    out = torch.empty((x.shape[0], w.shape[0]), dtype=x.dtype, device=x.device)
    _call("gemm", _dtype_code(x), x.data_ptr(), w.data_ptr(), out.data_ptr(), x.shape[0], w.shape[0],
          x.shape[1], _stream())
    return out


def quantize_per_token_fp8(x: Any) -> tuple[Any, Any]:
    """x [M, K] fp16/bf16 -> (float8_e4m3fn [M, K], float32 scales [M]), scale = amax / 448 per row."""
    import torch

    return _quantize_per_token(x, torch.float8_e4m3fn, "quantize_per_token_fp8")


def fp8_linear(x: Any, qweight: Any, w_scales: Any, fast_accum: bool = False, workspace: Any | None = None) -> Any:
    """FP8 W8A8: x [M, K] quantized per token to e4m3, times qweight float8_e4m3fn [N, K] with
    float32 scales [N] (per channel) or [1] (per tensor), through cuBLASLt; y in x's dtype."""
    import torch

    _check(x, "x", dim=2)
    _check_weight(qweight, x, "qweight")
    if qweight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"qweight must be torch.float8_e4m3fn, got {qweight.dtype}")
    _check(w_scales, "w_scales", dtype=torch.float32, dim=1)
    M, K = x.shape
    N = qweight.shape[0]
    if w_scales.shape[0] not in (1, N):
        raise ValueError(f"w_scales must have 1 or N={N} entries, got {w_scales.shape[0]}")
    if w_scales.shape[0] == 1:  # cuBLASLt takes one scale vector form: expand (a loader does it once)
        w_scales = w_scales.expand(N).contiguous()
    workspace = _workspace(workspace, int(_ops().fp8_linear_workspace(M, K)), x.device)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _call("fp8_linear", _dtype_code(x), x.data_ptr(), qweight.data_ptr(), w_scales.data_ptr(),
          out.data_ptr(), M, N, K, int(fast_accum), *_bytes_of(workspace), _stream())
    return out


def w4a16_repack(qweight: Any, scales: Any, zeros: Any | None, group_size: int) -> Any:
    """The canonical int4 layout (qweight uint8 [N, K / 2], scales [N, G], zeros uint8 [N, G] or
    None) -> flashpage.quantization.W4A16Mma on the GPU, the tensor-core kernel's layout."""
    import torch

    from flashpage.quantization import W4A16Mma

    _check(scales, "scales", dim=2)
    N, K = _check_w4a16(qweight, scales, zeros, group_size)
    dev = qweight.device
    packed = torch.empty((N // 16, K // 64, 32, 4), dtype=torch.int32, device=dev) if N % 16 == 0 and K % 64 == 0 \
        else torch.empty(0, dtype=torch.int32, device=dev)
    scales_t = torch.empty((K // group_size, N), dtype=scales.dtype, device=dev)
    zeros_t = torch.empty((K // group_size, N), dtype=torch.uint8, device=dev) if zeros is not None else None
    _call("w4a16_repack", _dtype_code(scales), qweight.data_ptr(), scales.data_ptr(),
          zeros.data_ptr() if zeros is not None else None, packed.data_ptr(), scales_t.data_ptr(),
          zeros_t.data_ptr() if zeros_t is not None else None, N, K, group_size, _stream())
    return W4A16Mma(packed, scales_t, zeros_t, group_size)


def _check_packed(w: Any) -> tuple[int, int]:
    import torch

    _check(w.packed, "packed", dtype=torch.int32, dim=4)
    _check(w.scales_t, "scales_t", dim=2)
    if w.zeros_t is not None:
        _check(w.zeros_t, "zeros_t", dtype=torch.uint8, dim=2)
    return w.shape


def w4a16_dequantize(w: Any) -> Any:
    """The dense weight [N, K] of a W4A16Mma, in its scales' dtype, as the kernel rounds it."""
    import torch

    N, K = _check_packed(w)
    out = torch.empty((N, K), dtype=w.scales_t.dtype, device=w.packed.device)
    _call("w4a16_dequantize", _dtype_code(w.scales_t), w.packed.data_ptr(), w.scales_t.data_ptr(),
          w.zeros_t.data_ptr() if w.zeros_t is not None else None, out.data_ptr(), N, K, w.group_size, _stream())
    return out


def w4a16_num_configs() -> int:
    return int(_ops().w4a16_num_configs())


def w4a16_linear(x: Any, w: Any, config: int = -1, workspace: Any | None = None) -> Any:
    """y [M, N] = x [M, K] . dequant(W)^T for a W4A16Mma (from w4a16_repack): the tensor-core
    kernel, or for large M dequantize + cuBLASLt. config -1 chooses by M, -2 forces the dense path,
    0.. picks a tensor-core configuration (tuning)."""
    import torch

    _check(x, "x", dim=2)
    N, K = _check_packed(w)
    if x.shape[1] != K:
        raise ValueError(f"x {tuple(x.shape)} does not fit the weight's K={K}")
    if w.scales_t.dtype != x.dtype:
        raise ValueError(f"scales must be {x.dtype}, got {w.scales_t.dtype}")
    M = x.shape[0]
    workspace = _workspace(workspace, int(_ops().w4a16_linear_workspace(M, N, K, config)), x.device)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _call("w4a16_linear", _dtype_code(x), x.data_ptr(), w.packed.data_ptr(), w.scales_t.data_ptr(),
          w.zeros_t.data_ptr() if w.zeros_t is not None else None, out.data_ptr(), M, N, K, w.group_size, config,
          *_bytes_of(workspace), _stream())
    return out
