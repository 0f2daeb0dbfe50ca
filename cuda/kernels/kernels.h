// Launch functions of flashpage's CUDA kernels, on raw device pointers. All tensors are
// contiguous, row-major; `dtype` is the 16-bit element type of activations and KV cache.
// Each returns cudaSuccess or the launch error; none synchronizes.
//
// KV cache layout (per layer): k_cache and v_cache are [num_blocks, num_kv_heads, block_size,
// head_dim]: one block of one head is a contiguous block_size x head_dim tile, so attention
// streams it with coalesced 16-byte loads.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace flashpage::cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// key/value [num_tokens, num_kv_heads, head_dim] -> the cache slots in slot_mapping
// (block * block_size + offset; negative = skip). head_dim % 8 == 0.
cudaError_t reshape_and_cache(DType dtype, const void* key, const void* value, void* k_cache,
                              void* v_cache, const int32_t* slot_mapping, int num_tokens,
                              int num_kv_heads, int head_dim, int block_size, cudaStream_t stream);

// residual += x; out = residual * rsqrt(mean(residual^2) + eps) * weight, per row of `hidden`.
// With residual == nullptr: out = rmsnorm(x) * weight. hidden % 8 == 0.
cudaError_t fused_add_rms_norm(DType dtype, void* out, const void* x, void* residual,
                               const void* weight, int num_tokens, int hidden, float eps,
                               cudaStream_t stream);

// out[t, i] = silu(in[t, i]) * in[t, inter + i] for in [num_tokens, 2 * inter]. inter % 8 == 0.
cudaError_t silu_and_mul(DType dtype, void* out, const void* in, int num_tokens, int inter,
                         cudaStream_t stream);

// Rotary embedding in place, rotate-half ("neox") style as in Hugging Face Llama:
// q [num_tokens, num_q_heads, head_dim], k [num_tokens, num_kv_heads, head_dim];
// cos_sin [max_position, head_dim] float32, cos in the first half and sin in the second
// (scaling variants such as llama3 or linear are folded into this table by the caller).
cudaError_t rotary_embedding(DType dtype, void* q, void* k, const int32_t* positions,
                             const float* cos_sin, int num_tokens, int num_q_heads,
                             int num_kv_heads, int head_dim, cudaStream_t stream);

struct PagedDecodeParams {
  DType dtype;
  const void* q;      // [num_seqs, num_q_heads, head_dim]
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_tables;  // [num_seqs, block_table_stride]
  const int32_t* context_lens;  // [num_seqs], the current token included
  void* out;                    // [num_seqs, num_q_heads, head_dim]
  float* workspace;             // paged_decode_workspace_floats() floats, or nullptr if 0
  int num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, block_table_stride;
  int max_context_len;  // an upper bound of context_lens (sizes the split-KV grid)
  int num_sms;          // multiprocessors of the device (from cudaGetDeviceProperties)
  float scale;          // softmax scale, usually 1/sqrt(head_dim)
  int num_splits = 0;   // 0: choose; else force this many KV splits (tests)
};

// Split-KV (flash-decoding) attention of one query token per sequence over its paged KV.
cudaError_t paged_decode(const PagedDecodeParams& p, cudaStream_t stream);
// Floats of workspace paged_decode needs for these parameters (0 when it runs unsplit).
int64_t paged_decode_workspace_floats(const PagedDecodeParams& p);
// Whether a configuration is supported (head_dim 64 or 128, block size 16 or 32, query heads
// per KV head 1..8 or a multiple of 8).
bool paged_decode_supported(int head_dim, int block_size, int num_q_heads, int num_kv_heads);

struct PagedPrefillParams {
  DType dtype;
  const void* q;  // [num_tokens, num_q_heads, head_dim]: the flattened batch's query rows
  const void* k_cache;
  const void* v_cache;
  const int32_t* block_tables;     // [num_seqs, block_table_stride]
  const int32_t* query_start_loc;  // [num_seqs + 1]
  const int32_t* context_lens;     // [num_seqs]: cached tokens after this step's writes
  void* out;                       // [num_tokens, num_q_heads, head_dim]
  int num_seqs, num_q_heads, num_kv_heads, head_dim, block_size, block_table_stride;
  int max_query_len;  // the longest query_start_loc[i + 1] - query_start_loc[i]
  float scale;
};

// Causal attention of every query row of the batch over its sequence's paged KV (prefill
// chunks and decodes alike: the mixed-batch contract of the CPU kernel).
cudaError_t paged_prefill(const PagedPrefillParams& p, cudaStream_t stream);
bool paged_prefill_supported(int head_dim, int block_size, int num_q_heads, int num_kv_heads);

struct W4A16Params {
  DType dtype;              // of x, scales and out
  const void* x;            // [M, K]
  const uint8_t* qweight;   // [N, K / 2]: canonical int4, low nibble = even k
  const void* scales;       // [N, K / group_size]
  const uint8_t* zeros;     // [N, K / group_size], or nullptr: symmetric (zero point 8)
  void* out;                // [M, N]
  int M, N, K, group_size;
};

// y = x . dequant(W)^T for 4-bit weights with per-group scales (and zeros): the CUDA-core
// kernel for decode-sized M (any M works, in tiles of 16 rows).
cudaError_t w4a16_gemm(const W4A16Params& p, cudaStream_t stream);
// K and group_size multiples of 32, K a multiple of group_size.
bool w4a16_supported(int K, int group_size);

// The tensor-core W4A16 kernel (w4a16_mma.cu) on weights repacked into its layout.
struct W4A16MmaParams {
  DType dtype;              // of x, scales and out
  const void* x;            // [M, K]
  const uint32_t* packed;   // [N / 16, K / 64, 32, 4] from w4a16_repack
  const void* scales_t;     // [K / group_size, N]
  const uint8_t* zeros_t;   // [K / group_size, N], or nullptr: symmetric (zero point 8)
  void* out;                // [M, N]
  int M, N, K, group_size;
  int config = -1;          // -1: chosen by M; else an index below w4a16_mma_num_configs() (tuning)
};

// N % 16 == 0, K % 64 == 0, group_size % 64 == 0 and K % group_size == 0.
bool w4a16_mma_supported(int N, int K, int group_size);
int w4a16_mma_num_configs();
int w4a16_mma_config(int M);  // the configuration w4a16_mma_gemm uses for M rows
// Canonical (qweight uint8 [N, K / 2], scales [N, G], zeros uint8 [N, G] or nullptr) -> the
// kernel's layout (packed, scales_t [G, N], zeros_t [G, N]). Run once at load.
cudaError_t w4a16_repack(DType dtype, const uint8_t* qweight, const void* scales, const uint8_t* zeros,
                         uint32_t* packed, void* scales_t, uint8_t* zeros_t, int N, int K, int group_size,
                         cudaStream_t stream);
cudaError_t w4a16_mma_gemm(const W4A16MmaParams& p, cudaStream_t stream);
// Rows [row_begin, row_begin + rows) of the repacked weights -> dense out [rows, K] in dtype, for
// large M (then a dense GEMM). row_begin and rows are multiples of 16.
cudaError_t w4a16_dequantize(DType dtype, const uint32_t* packed, const void* scales_t, const uint8_t* zeros_t,
                             void* out, int N, int K, int group_size, int row_begin, int rows, cudaStream_t stream);

// x [M, K] -> xq int8 [M, K] and scales float32 [M]: symmetric per row, scale = amax / 127,
// rounding half to even (as torch.round).
cudaError_t quantize_per_token_int8(DType dtype, const void* x, int8_t* xq, float* scales, int M, int K,
                                    cudaStream_t stream);
// The same into fp8 e4m3 (xq: [M, K] bytes): scale = amax / 448, round to nearest even, saturating.
cudaError_t quantize_per_token_fp8(DType dtype, const void* x, void* xq, float* scales, int M, int K,
                                   cudaStream_t stream);

struct W8A8Params {
  DType dtype;              // of out
  const int8_t* xq;         // [M, K], from quantize_per_token_int8
  const float* x_scales;    // [M]
  const int8_t* wq;         // [N, K]: canonical int8, rows = output channels
  const float* w_scales;    // [N]
  void* out;                // [M, N]
  int M, N, K;              // K % 16 == 0
};

// y = (xq . wq^T) * x_scale * w_scale, the dot products exact in int32 (CUDA-core __dp4a).
cudaError_t w8a8_gemm(const W8A8Params& p, cudaStream_t stream);
// out [M, N] in dtype = acc (int32 [M, N]) * x_scales[m] * w_scales[n].
cudaError_t w8a8_scale_output(DType dtype, const int32_t* acc, const float* x_scales, const float* w_scales, void* out,
                              int M, int N, cudaStream_t stream);

// out[i] = src[rows[i]] for rows of row_bytes bytes (embedding lookups: rows are token ids;
// the rows that need logits).
cudaError_t gather_rows(void* out, const void* src, const int32_t* rows, int n, int64_t row_bytes,
                        cudaStream_t stream);
// y[r, 0:n] += bias[0:n] for `rows` rows of stride ldy.
cudaError_t add_bias(DType dtype, void* y, int64_t ldy, const void* bias, int rows, int n, cudaStream_t stream);
// out[i] = float(in[i]) (logits for the sampler).
cudaError_t widen_to_float(DType dtype, float* out, const void* in, int64_t n, cudaStream_t stream);

}  // namespace flashpage::cuda
