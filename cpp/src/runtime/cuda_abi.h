// The C ABI between the core and libflashpage_cuda (dlopen'ed at run time), in one place: the
// library exports a single symbol, flashpage_cuda_get_ops, which returns its table of entry
// points. The core's loader (cuda_loader.cc) and the Python test facade (flashpage.cuda_ops,
// checked against this file by tests/test_cuda_abi.py) read the table; nothing else is
// looked up by name. Adding an entry: append it to the struct (never reorder) and raise
// FLASHPAGE_CUDA_ABI_VERSION when an existing entry changes.
//
// Every int-returning entry returns 0 on success, or writes a message into err (at most
// err_len bytes) and returns -1. dtype: 0 = float16, 1 = bfloat16. stream: a cudaStream_t
// (nullptr = the default stream). The kernels are in cuda/kernels/kernels.h.
#pragma once

#include <stddef.h>
#include <stdint.h>

#define FLASHPAGE_CUDA_ABI_VERSION 2
#define FLASHPAGE_CUDA_GET_OPS "flashpage_cuda_get_ops"

extern "C" {

struct flashpage_cuda_ops {
  uint32_t abi_version;  // FLASHPAGE_CUDA_ABI_VERSION of the library
  uint32_t size;         // sizeof(flashpage_cuda_ops) in the library: entries past it are absent
  int (*device_count)(int* count, char* err, size_t err_len);
  int (*device_name)(int device, char* name, size_t name_len, char* err, size_t err_len);
  int (*axpy)(int n, float a, const float* x, float* y, char* err, size_t err_len);
  int (*num_sms)(int device, int* num_sms, char* err, size_t err_len);
  int (*reshape_and_cache)(int dtype, const void* key, const void* value, void* k_cache,
      void* v_cache, const int32_t* slot_mapping, int num_tokens, int num_kv_heads, int head_dim,
      int block_size, void* stream, char* err, size_t err_len);
  int (*fused_add_rms_norm)(int dtype, void* out, const void* x, void* residual, const void* weight,
      int num_tokens, int hidden, float eps, void* stream, char* err, size_t err_len);
  int (*silu_and_mul)(int dtype, void* out, const void* in, int num_tokens, int inter, void* stream,
      char* err, size_t err_len);
  int (*rotary_embedding)(int dtype, void* q, void* k, const int32_t* positions,
      const float* cos_sin, int num_tokens, int num_q_heads, int num_kv_heads, int head_dim,
      void* stream, char* err, size_t err_len);
  int64_t (*paged_decode_workspace)(int num_seqs, int num_q_heads, int num_kv_heads, int head_dim,
      int block_size, int max_context_len, int num_sms, int num_splits);
  int (*paged_decode)(int dtype, const void* q, const void* k_cache, const void* v_cache,
      const int32_t* block_tables, const int32_t* context_lens, void* out, float* workspace,
      int num_seqs, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
      int block_table_stride, int max_context_len, int num_sms, float scale, int num_splits,
      void* stream, char* err, size_t err_len);
  int (*paged_prefill)(int dtype, const void* q, const void* k_cache, const void* v_cache,
      const int32_t* block_tables, const int32_t* query_start_loc, const int32_t* context_lens,
      void* out, int num_seqs, int num_q_heads, int num_kv_heads, int head_dim, int block_size,
      int block_table_stride, int max_query_len, float scale, void* stream, char* err,
      size_t err_len);
  int (*w4a16_gemm)(int dtype, const void* x, const uint8_t* qweight, const void* scales,
      const uint8_t* zeros, void* out, int M, int N, int K, int group_size, void* stream, char* err,
      size_t err_len);
  int (*quantize_per_token_int8)(int dtype, const void* x, int8_t* xq, float* scales, int M, int K,
      void* stream, char* err, size_t err_len);
  int (*quantize_per_token_fp8)(int dtype, const void* x, void* xq, float* scales, int M, int K,
      void* stream, char* err, size_t err_len);
  int (*blaslt_available)(char* why, size_t why_len);
  int (*gemm)(int dtype, const void* x, const void* w, void* out, int M, int N, int K, void* stream,
      char* err, size_t err_len);
  int64_t (*fp8_linear_workspace)(int M, int K);
  int (*fp8_linear)(int dtype, const void* x, const void* w_fp8, const float* w_scales, void* out,
      int M, int N, int K, int fast_accum, void* workspace, int64_t workspace_bytes, void* stream,
      char* err, size_t err_len);
  int (*w4a16_repack)(int dtype, const uint8_t* qweight, const void* scales, const uint8_t* zeros,
      uint32_t* packed, void* scales_t, uint8_t* zeros_t, int N, int K, int group_size,
      void* stream, char* err, size_t err_len);
  int (*w4a16_dequantize)(int dtype, const uint32_t* packed, const void* scales_t,
      const uint8_t* zeros_t, void* out, int N, int K, int group_size, void* stream, char* err,
      size_t err_len);
  int (*w4a16_num_configs)(void);
  int64_t (*w4a16_linear_workspace)(int M, int N, int K, int config);
  int (*w4a16_linear)(int dtype, const void* x, const uint32_t* packed, const void* scales_t,
      const uint8_t* zeros_t, void* out, int M, int N, int K, int group_size, int config,
      void* workspace, int64_t workspace_bytes, void* stream, char* err, size_t err_len);
  int64_t (*w8a8_linear_workspace)(int M, int N, int K, int mode);
  int (*w8a8_linear)(int dtype, const void* x, const int8_t* wq, const float* w_scales, void* out,
      int M, int N, int K, int mode, void* workspace, int64_t workspace_bytes, void* stream,
      char* err, size_t err_len);
  // --- what the executor (cpp/src/backends/cuda) needs beyond the kernels: memory, streams,
  // and the glue of the forward pass. Copies use unified addressing (cudaMemcpyDefault).
  int (*set_device)(int device, char* err, size_t err_len);
  int (*mem_info)(size_t* free_bytes, size_t* total_bytes, char* err, size_t err_len);
  int (*device_malloc)(void** ptr, size_t bytes, char* err, size_t err_len);  // zero-filled
  int (*device_free)(void* ptr, char* err, size_t err_len);
  int (*host_malloc)(void** ptr, size_t bytes, char* err, size_t err_len);  // pinned
  int (*host_free)(void* ptr, char* err, size_t err_len);
  int (*memcpy_async)(void* dst, const void* src, size_t bytes, void* stream, char* err, size_t err_len);
  int (*stream_create)(void** stream, char* err, size_t err_len);
  int (*stream_destroy)(void* stream, char* err, size_t err_len);
  int (*stream_synchronize)(void* stream, char* err, size_t err_len);
  int (*gather_rows)(const void* src, const int32_t* rows, void* out, int n, int64_t row_bytes,
      void* stream, char* err, size_t err_len);
  // out [M, ldo] (columns 0..N-1) = x [M, K] . w [N, K]^T (+ bias [N], dtype; nullptr: none).
  int (*linear)(int dtype, const void* x, const void* w, const void* bias, void* out, int M, int N,
      int K, int ldo, void* stream, char* err, size_t err_len);
  int (*widen_to_float)(int dtype, const void* in, float* out, int64_t n, void* stream, char* err,
      size_t err_len);
  // Bit 0: paged_decode supports the shape; bit 1: paged_prefill does.
  int (*attention_supported)(int head_dim, int block_size, int num_q_heads, int num_kv_heads);
  // CUDA graphs: what is launched on `stream` between graph_begin and graph_end is recorded,
  // not run, into an executable graph; graph_launch runs it again on `stream`.
  int (*graph_begin)(void* stream, char* err, size_t err_len);
  int (*graph_end)(void* stream, void** graph, char* err, size_t err_len);
  int (*graph_launch)(void* graph, void* stream, char* err, size_t err_len);
  int (*graph_destroy)(void* graph, char* err, size_t err_len);
};

// The library's only export; the table is static and lives as long as the library.
typedef const struct flashpage_cuda_ops* (*flashpage_cuda_get_ops_fn)(void);
}
