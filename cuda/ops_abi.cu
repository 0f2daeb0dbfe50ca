// C ABI exports of the kernels, for the core's loader and for Python (ctypes) tests and
// benchmarks. Argument checks that the kernels rely on happen here, with messages.
#include <cstdio>

#include "abi.h"
#include "kernels/kernels.h"

namespace {

using flashpage::cuda::DType;
using flashpage::cuda::invalid;
using flashpage::cuda::report;

bool dtype_ok(int dtype) { return dtype == 0 || dtype == 1; }

}  // namespace

FLASHPAGE_EXPORT int flashpage_cuda_num_sms(int device, int* num_sms, char* err, size_t err_len) {
  return report(cudaDeviceGetAttribute(num_sms, cudaDevAttrMultiProcessorCount, device),
                "cudaDeviceGetAttribute", err, err_len);
}

FLASHPAGE_EXPORT int flashpage_cuda_reshape_and_cache(int dtype, const void* key, const void* value,
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

FLASHPAGE_EXPORT int flashpage_cuda_fused_add_rms_norm(int dtype, void* out, const void* x,
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

FLASHPAGE_EXPORT int flashpage_cuda_silu_and_mul(int dtype, void* out, const void* in, int num_tokens,
                                                 int inter, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("silu_and_mul: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (inter % 8 != 0) return invalid("silu_and_mul: the intermediate size must be a multiple of 8", err, err_len);
  return report(flashpage::cuda::silu_and_mul(static_cast<DType>(dtype), out, in, num_tokens, inter,
                                              static_cast<cudaStream_t>(stream)),
                "silu_and_mul", err, err_len);
}

FLASHPAGE_EXPORT int flashpage_cuda_rotary_embedding(int dtype, void* q, void* k,
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
FLASHPAGE_EXPORT int64_t flashpage_cuda_paged_decode_workspace(
    int num_seqs, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
    int max_context_len, int num_sms, int num_splits) {
  return flashpage::cuda::paged_decode_workspace_floats(
      decode_params(1, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, num_seqs,
                    num_q_heads, num_kv_heads, head_dim, block_size, 0, max_context_len, num_sms,
                    1.f, num_splits));
}

FLASHPAGE_EXPORT int flashpage_cuda_paged_decode(
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

FLASHPAGE_EXPORT int flashpage_cuda_paged_prefill(
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

FLASHPAGE_EXPORT int flashpage_cuda_w4a16_gemm(int dtype, const void* x, const uint8_t* qweight,
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

FLASHPAGE_EXPORT int flashpage_cuda_quantize_per_token_int8(int dtype, const void* x, int8_t* xq, float* scales,
                                                            int M, int K, void* stream, char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("quantize_per_token_int8: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  return report(flashpage::cuda::quantize_per_token_int8(static_cast<DType>(dtype), x, xq, scales, M, K,
                                                         static_cast<cudaStream_t>(stream)),
                "quantize_per_token_int8", err, err_len);
}

FLASHPAGE_EXPORT int flashpage_cuda_w8a8_gemm(int dtype, const int8_t* xq, const float* x_scales, const int8_t* wq,
                                              const float* w_scales, void* out, int M, int N, int K, void* stream,
                                              char* err, size_t err_len) {
  if (!dtype_ok(dtype)) return invalid("w8a8_gemm: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (K % 16 != 0) return invalid("w8a8_gemm: K must be a multiple of 16", err, err_len);
  const flashpage::cuda::W8A8Params p{static_cast<DType>(dtype), xq, x_scales, wq, w_scales, out, M, N, K};
  return report(flashpage::cuda::w8a8_gemm(p, static_cast<cudaStream_t>(stream)), "w8a8_gemm", err, err_len);
}
