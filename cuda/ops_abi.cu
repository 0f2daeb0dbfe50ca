// The kernels' entries of the C ABI table (cpp/src/runtime/cuda_abi.h), and the table with the
// library's only export, flashpage_cuda_get_ops. Argument checks that the kernels rely on happen
// here, with messages.
#include <cstdio>
#include <type_traits>

#include "abi.h"
#include "gemm.h"
#include "kernels/kernels.h"
#include "runtime/cuda_abi.h"

namespace {

using flashpage::cuda::DType;
using flashpage::cuda::GemmInput;
using flashpage::cuda::invalid;
using flashpage::cuda::report;

bool dtype_ok(int dtype) { return dtype == 0 || dtype == 1; }

}  // namespace

FLASHPAGE_INTERNAL int flashpage_cuda_num_sms(int device, int* num_sms, char* err, size_t err_len) {
  return report(cudaDeviceGetAttribute(num_sms, cudaDevAttrMultiProcessorCount, device),
                "cudaDeviceGetAttribute", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_reshape_and_cache(int dtype, const void* key, const void* value,
                                                      void* k_cache, void* v_cache,
                                                      const int32_t* slot_mapping, int num_tokens,
                                                      int num_kv_heads, int head_dim,
                                                      int block_size, void* stream, char* err,
                                                      size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("reshape_and_cache: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (head_dim % 8 != 0) return invalid("reshape_and_cache: head_dim must be a multiple of 8", err, err_len);
  return report(flashpage::cuda::reshape_and_cache(static_cast<DType>(dtype), key, value, k_cache,
                                                   v_cache, slot_mapping, num_tokens, num_kv_heads,
                                                   head_dim, block_size,
                                                   static_cast<cudaStream_t>(stream)),
                "reshape_and_cache", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_fused_add_rms_norm(int dtype, void* out, const void* x,
                                                       void* residual, const void* weight,
                                                       int num_tokens, int hidden, float eps,
                                                       void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("fused_add_rms_norm: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (hidden % 8 != 0) return invalid("fused_add_rms_norm: hidden must be a multiple of 8", err, err_len);
  return report(flashpage::cuda::fused_add_rms_norm(static_cast<DType>(dtype), out, x, residual,
                                                    weight, num_tokens, hidden, eps,
                                                    static_cast<cudaStream_t>(stream)),
                "fused_add_rms_norm", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_silu_and_mul(int dtype, void* out, const void* in, int num_tokens,
                                                 int inter, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("silu_and_mul: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (inter % 8 != 0) return invalid("silu_and_mul: the intermediate size must be a multiple of 8", err, err_len);
  return report(flashpage::cuda::silu_and_mul(static_cast<DType>(dtype), out, in, num_tokens, inter,
                                              static_cast<cudaStream_t>(stream)),
                "silu_and_mul", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_rotary_embedding(int dtype, void* q, void* k,
                                                     const int32_t* positions, const float* cos_sin,
                                                     int num_tokens, int num_q_heads,
                                                     int num_kv_heads, int head_dim, void* stream,
                                                     char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("rotary_embedding: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (head_dim % 2 != 0) return invalid("rotary_embedding: head_dim must be even", err, err_len);
  return report(flashpage::cuda::rotary_embedding(static_cast<DType>(dtype), q, k, positions, cos_sin,
                                                  num_tokens, num_q_heads, num_kv_heads, head_dim,
                                                  static_cast<cudaStream_t>(stream)),
                "rotary_embedding", err, err_len);
}

namespace {

flashpage::cuda::PagedDecodeParams decode_params(int dtype, const void* q, const void* k_cache,
                                                 const void* v_cache, const int32_t* block_tables,
                                                 const int32_t* context_lens, void* out,
                                                 float* workspace, int num_seqs, int num_q_heads,
                                                 int num_kv_heads, int head_dim, int block_size,
                                                 int block_table_stride, int max_context_len,
                                                 int num_sms, float scale, int num_splits) {
  flashpage::cuda::PagedDecodeParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_tables = block_tables;
  p.context_lens = context_lens;
  p.out = out;
  p.workspace = workspace;
  p.num_seqs = num_seqs;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.block_table_stride = block_table_stride;
  p.max_context_len = max_context_len;
  p.num_sms = num_sms;
  p.scale = scale;
  p.num_splits = num_splits;
  return p;
}

}  // namespace

// Floats of workspace the call with the same arguments needs (0: none).
FLASHPAGE_INTERNAL int64_t flashpage_cuda_paged_decode_workspace(
    int num_seqs, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
    int max_context_len, int num_sms, int num_splits) {
  return flashpage::cuda::paged_decode_workspace_floats(
      decode_params(1, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, num_seqs,
                    num_q_heads, num_kv_heads, head_dim, block_size, 0, max_context_len, num_sms,
                    1.f, num_splits));
}

FLASHPAGE_INTERNAL int flashpage_cuda_paged_decode(
    int dtype, const void* q, const void* k_cache, const void* v_cache,
    const int32_t* block_tables, const int32_t* context_lens, void* out, float* workspace,
    int num_seqs, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
    int block_table_stride, int max_context_len, int num_sms, float scale, int num_splits,
    void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("paged_decode: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (!flashpage::cuda::paged_decode_supported(head_dim, block_size, num_q_heads, num_kv_heads))
    return invalid("paged_decode: unsupported shape (head_dim 64 or 128, block_size 16 or 32, "
                   "query heads per KV head 1..8 or a multiple of 8)", err, err_len);
  const auto p = decode_params(dtype, q, k_cache, v_cache, block_tables, context_lens, out,
                               workspace, num_seqs, num_q_heads, num_kv_heads, head_dim,
                               block_size, block_table_stride, max_context_len, num_sms, scale,
                               num_splits);
  if (flashpage::cuda::paged_decode_workspace_floats(p) > 0 && workspace == nullptr)
    return invalid("paged_decode: this call splits the KV and needs a workspace", err, err_len);
  return report(flashpage::cuda::paged_decode(p, static_cast<cudaStream_t>(stream)),
                "paged_decode", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_paged_prefill(
    int dtype, const void* q, const void* k_cache, const void* v_cache,
    const int32_t* block_tables, const int32_t* query_start_loc, const int32_t* context_lens,
    void* out, int num_seqs, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
    int block_table_stride, int max_query_len, float scale, void* stream, char* err,
    size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("paged_prefill: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (!flashpage::cuda::paged_prefill_supported(head_dim, block_size, num_q_heads, num_kv_heads))
    return invalid("paged_prefill: unsupported shape (head_dim 64 or 128, block_size 16 or 32, "
                   "query heads a multiple of KV heads)", err, err_len);
  flashpage::cuda::PagedPrefillParams p{};
  p.dtype = static_cast<DType>(dtype);
  p.q = q;
  p.k_cache = k_cache;
  p.v_cache = v_cache;
  p.block_tables = block_tables;
  p.query_start_loc = query_start_loc;
  p.context_lens = context_lens;
  p.out = out;
  p.num_seqs = num_seqs;
  p.num_q_heads = num_q_heads;
  p.num_kv_heads = num_kv_heads;
  p.head_dim = head_dim;
  p.block_size = block_size;
  p.block_table_stride = block_table_stride;
  p.max_query_len = max_query_len;
  p.scale = scale;
  return report(flashpage::cuda::paged_prefill(p, static_cast<cudaStream_t>(stream)),
                "paged_prefill", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_w4a16_gemm(int dtype, const void* x, const uint8_t* qweight,
                                               const void* scales, const uint8_t* zeros, void* out, int M,
                                               int N, int K, int group_size, void* stream, char* err,
                                               size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("w4a16_gemm: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (!flashpage::cuda::w4a16_supported(K, group_size)) {
    if (err != nullptr && err_len > 0)
      std::snprintf(err, err_len, "w4a16_gemm: K=%d and group_size=%d must be multiples of 32, K of group_size",
                    K, group_size);
    return -1;
  }
  const flashpage::cuda::W4A16Params p{static_cast<DType>(dtype), x, qweight, scales, zeros, out, M, N, K, group_size};
  return report(flashpage::cuda::w4a16_gemm(p, static_cast<cudaStream_t>(stream)), "w4a16_gemm", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_quantize_per_token_int8(int dtype, const void* x, int8_t* xq, float* scales,
                                                            int M, int K, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("quantize_per_token_int8: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  return report(flashpage::cuda::quantize_per_token_int8(static_cast<DType>(dtype), x, xq, scales, M, K,
                                                         static_cast<cudaStream_t>(stream)),
                "quantize_per_token_int8", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_quantize_per_token_fp8(int dtype, const void* x, void* xq, float* scales, int M,
                                                           int K, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("quantize_per_token_fp8: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  return report(flashpage::cuda::quantize_per_token_fp8(static_cast<DType>(dtype), x, xq, scales, M, K,
                                                        static_cast<cudaStream_t>(stream)),
                "quantize_per_token_fp8", err, err_len);
}

// 1 when cuBLASLt (dense and FP8 GEMMs) can be loaded; else 0 and why.
FLASHPAGE_INTERNAL int flashpage_cuda_blaslt_available(char* why, size_t why_len) {
  return flashpage::cuda::lt_available(why, why_len) ? 1 : 0;
}

// Dense out [M, N] = x [M, K] . w [N, K]^T in fp16/bf16 (cuBLASLt).
FLASHPAGE_INTERNAL int flashpage_cuda_gemm(int dtype, const void* x, const void* w, void* out, int M, int N, int K,
                                         void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("gemm: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  const flashpage::cuda::LtGemmParams p{static_cast<GemmInput>(dtype), static_cast<DType>(dtype), x, w, out,
                                        nullptr, nullptr, M, N, K, N};
  return flashpage::cuda::lt_gemm(p, static_cast<cudaStream_t>(stream), err, err_len);
}

FLASHPAGE_INTERNAL int64_t flashpage_cuda_fp8_linear_workspace(int M, int K) {
  return flashpage::cuda::fp8_linear_workspace(M, K);
}

FLASHPAGE_INTERNAL int flashpage_cuda_fp8_linear(int dtype, const void* x, const void* w_fp8, const float* w_scales,
                                               void* out, int M, int N, int K, int fast_accum, void* workspace,
                                               int64_t workspace_bytes, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("fp8_linear: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (K % 16 != 0) return invalid("fp8_linear: K must be a multiple of 16", err, err_len);
  return flashpage::cuda::fp8_linear(static_cast<DType>(dtype), x, w_fp8, w_scales, out, M, N, K, fast_accum != 0,
                                     workspace, workspace_bytes, static_cast<cudaStream_t>(stream), err, err_len);
}

namespace {

int w4a16_shape_error(const char* fn, int N, int K, int group_size, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0)
    std::snprintf(err, err_len,
                  "%s: N=%d must be a multiple of 16, K=%d of 64 and of group_size=%d, group_size of 64", fn, N, K,
                  group_size);
  return -1;
}

}  // namespace

FLASHPAGE_INTERNAL int flashpage_cuda_w4a16_repack(int dtype, const uint8_t* qweight, const void* scales,
                                                 const uint8_t* zeros, uint32_t* packed, void* scales_t,
                                                 uint8_t* zeros_t, int N, int K, int group_size, void* stream,
                                                 char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("w4a16_repack: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (!flashpage::cuda::w4a16_mma_supported(N, K, group_size))
    return w4a16_shape_error("w4a16_repack", N, K, group_size, err, err_len);
  return report(flashpage::cuda::w4a16_repack(static_cast<DType>(dtype), qweight, scales, zeros, packed, scales_t,
                                              zeros_t, N, K, group_size, static_cast<cudaStream_t>(stream)),
                "w4a16_repack", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_w4a16_dequantize(int dtype, const uint32_t* packed, const void* scales_t,
                                                     const uint8_t* zeros_t, void* out, int N, int K,
                                                     int group_size, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("w4a16_dequantize: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (!flashpage::cuda::w4a16_mma_supported(N, K, group_size))
    return w4a16_shape_error("w4a16_dequantize", N, K, group_size, err, err_len);
  return report(flashpage::cuda::w4a16_dequantize(static_cast<DType>(dtype), packed, scales_t, zeros_t, out, N, K,
                                                  group_size, 0, N, static_cast<cudaStream_t>(stream)),
                "w4a16_dequantize", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_w4a16_num_configs() { return flashpage::cuda::w4a16_mma_num_configs(); }

FLASHPAGE_INTERNAL int64_t flashpage_cuda_w4a16_linear_workspace(int M, int N, int K, int config) {
  return flashpage::cuda::w4a16_linear_workspace(M, N, K, config);
}

// config: -1 chooses by M; -2 forces dequantize + dense GEMM; 0.. a tensor-core configuration.
FLASHPAGE_INTERNAL int flashpage_cuda_w4a16_linear(int dtype, const void* x, const uint32_t* packed,
                                                 const void* scales_t, const uint8_t* zeros_t, void* out, int M,
                                                 int N, int K, int group_size, int config, void* workspace,
                                                 int64_t workspace_bytes, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("w4a16_linear: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (!flashpage::cuda::w4a16_mma_supported(N, K, group_size))
    return w4a16_shape_error("w4a16_linear", N, K, group_size, err, err_len);
  if (config < flashpage::cuda::kW4A16ForceDense || config >= flashpage::cuda::w4a16_mma_num_configs())
    return invalid("w4a16_linear: config must be -2, -1 or a configuration index", err, err_len);
  flashpage::cuda::W4A16MmaParams p{static_cast<DType>(dtype), x, packed, scales_t, zeros_t, out, M, N, K,
                                    group_size, config};
  return flashpage::cuda::w4a16_linear(p, workspace, workspace_bytes, static_cast<cudaStream_t>(stream), err,
                                       err_len);
}

FLASHPAGE_INTERNAL int64_t flashpage_cuda_w8a8_linear_workspace(int M, int N, int K, int mode) {
  return flashpage::cuda::w8a8_linear_workspace(M, N, K, mode);
}

// mode: -1 chooses by M, 0 the __dp4a kernel, 1 cuBLASLt's int8 tensor cores.
FLASHPAGE_INTERNAL int flashpage_cuda_w8a8_linear(int dtype, const void* x, const int8_t* wq, const float* w_scales,
                                                void* out, int M, int N, int K, int mode, void* workspace,
                                                int64_t workspace_bytes, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("w8a8_linear: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (K % 16 != 0) return invalid("w8a8_linear: K must be a multiple of 16", err, err_len);
  if (mode < -1 || mode > 1) return invalid("w8a8_linear: mode must be -1, 0 or 1", err, err_len);
  return flashpage::cuda::w8a8_linear(static_cast<DType>(dtype), x, wq, w_scales, out, M, N, K, mode, workspace,
                                      workspace_bytes, static_cast<cudaStream_t>(stream), err, err_len);
}

// device.cu's entries (static_asserts there check their types against the table's).
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::device_count)> flashpage_cuda_device_count;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::device_name)> flashpage_cuda_device_name;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::axpy)> flashpage_cuda_axpy;
// executor_abi.cu's entries.
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::set_device)> flashpage_cuda_set_device;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::mem_info)> flashpage_cuda_mem_info;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::device_malloc)> flashpage_cuda_device_malloc;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::device_free)> flashpage_cuda_device_free;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::host_malloc)> flashpage_cuda_host_malloc;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::host_free)> flashpage_cuda_host_free;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::memcpy_async)> flashpage_cuda_memcpy_async;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::stream_create)> flashpage_cuda_stream_create;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::stream_destroy)> flashpage_cuda_stream_destroy;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::stream_synchronize)> flashpage_cuda_stream_synchronize;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::gather_rows)> flashpage_cuda_gather_rows;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::linear)> flashpage_cuda_linear;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::widen_to_float)> flashpage_cuda_widen_to_float;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::attention_supported)> flashpage_cuda_attention_supported;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::graph_begin)> flashpage_cuda_graph_begin;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::graph_end)> flashpage_cuda_graph_end;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::graph_launch)> flashpage_cuda_graph_launch;
FLASHPAGE_INTERNAL std::remove_pointer_t<decltype(flashpage_cuda_ops::graph_destroy)> flashpage_cuda_graph_destroy;

namespace {

// Field by field: an entry whose type differs from the table's does not compile.
flashpage_cuda_ops make_ops() {
  flashpage_cuda_ops t{};
  t.abi_version = FLASHPAGE_CUDA_ABI_VERSION;
  t.size = sizeof(flashpage_cuda_ops);
  t.device_count = &flashpage_cuda_device_count;
  t.device_name = &flashpage_cuda_device_name;
  t.axpy = &flashpage_cuda_axpy;
  t.num_sms = &flashpage_cuda_num_sms;
  t.reshape_and_cache = &flashpage_cuda_reshape_and_cache;
  t.fused_add_rms_norm = &flashpage_cuda_fused_add_rms_norm;
  t.silu_and_mul = &flashpage_cuda_silu_and_mul;
  t.rotary_embedding = &flashpage_cuda_rotary_embedding;
  t.paged_decode_workspace = &flashpage_cuda_paged_decode_workspace;
  t.paged_decode = &flashpage_cuda_paged_decode;
  t.paged_prefill = &flashpage_cuda_paged_prefill;
  t.w4a16_gemm = &flashpage_cuda_w4a16_gemm;
  t.quantize_per_token_int8 = &flashpage_cuda_quantize_per_token_int8;
  t.quantize_per_token_fp8 = &flashpage_cuda_quantize_per_token_fp8;
  t.blaslt_available = &flashpage_cuda_blaslt_available;
  t.gemm = &flashpage_cuda_gemm;
  t.fp8_linear_workspace = &flashpage_cuda_fp8_linear_workspace;
  t.fp8_linear = &flashpage_cuda_fp8_linear;
  t.w4a16_repack = &flashpage_cuda_w4a16_repack;
  t.w4a16_dequantize = &flashpage_cuda_w4a16_dequantize;
  t.w4a16_num_configs = &flashpage_cuda_w4a16_num_configs;
  t.w4a16_linear_workspace = &flashpage_cuda_w4a16_linear_workspace;
  t.w4a16_linear = &flashpage_cuda_w4a16_linear;
  t.w8a8_linear_workspace = &flashpage_cuda_w8a8_linear_workspace;
  t.w8a8_linear = &flashpage_cuda_w8a8_linear;
  t.set_device = &flashpage_cuda_set_device;
  t.mem_info = &flashpage_cuda_mem_info;
  t.device_malloc = &flashpage_cuda_device_malloc;
  t.device_free = &flashpage_cuda_device_free;
  t.host_malloc = &flashpage_cuda_host_malloc;
  t.host_free = &flashpage_cuda_host_free;
  t.memcpy_async = &flashpage_cuda_memcpy_async;
  t.stream_create = &flashpage_cuda_stream_create;
  t.stream_destroy = &flashpage_cuda_stream_destroy;
  t.stream_synchronize = &flashpage_cuda_stream_synchronize;
  t.gather_rows = &flashpage_cuda_gather_rows;
  t.linear = &flashpage_cuda_linear;
  t.widen_to_float = &flashpage_cuda_widen_to_float;
  t.attention_supported = &flashpage_cuda_attention_supported;
  t.graph_begin = &flashpage_cuda_graph_begin;
  t.graph_end = &flashpage_cuda_graph_end;
  t.graph_launch = &flashpage_cuda_graph_launch;
  t.graph_destroy = &flashpage_cuda_graph_destroy;
  return t;
}

}  // namespace

FLASHPAGE_EXPORT const flashpage_cuda_ops* flashpage_cuda_get_ops() {
  static const flashpage_cuda_ops ops = make_ops();
  return &ops;
}
