// CPU kernels: one table of entry points per ISA level, plus the scalar reference that every
// vectorised kernel is tested against.
#pragma once

#include <cstdint>

#include "runtime/cpu_features.h"

namespace flashpage::cpu {

// Declares one ISA level's entry points (each ISA source defines them in its namespace).
#define FLASHPAGE_CPU_KERNEL_DECLS                                                         \
  /* RMSNorm over rows of x, fused with the residual add when residual is non-null:  */    \
  /* residual += x; out = residual * rsqrt(mean(residual^2) + eps) * weight.           */  \
  void rms_norm(float* out, const float* x, float* residual, const float* weight,          \
                int64_t rows, int64_t dim, float eps);                                     \
  /* Paged attention for a flattened batch (prefill chunks and decodes), see below.    */  \
  void paged_attention(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end);  \
  /* y[m, n] = x[m, :] . w[n, :] (+ bias[n]) for n in [n_begin, n_end): a Linear layer  */  \
  /* with Hugging Face's [out, in] weights, fp32 or bf16 (raw uint16). y is [M, N].     */  \
  void linear(float* y, const float* x, const void* w, bool w_bf16, const float* bias,     \
              int64_t M, int64_t N, int64_t K, int64_t n_begin, int64_t n_end);

// Causal attention of each sequence's query rows over its paged KV. Sequence s owns rows
// [query_start_loc[s], query_start_loc[s + 1]) of q and out ([rows, num_q_heads, head_dim]
// fp32); its context_lens[s] cached tokens include those rows' own K/V (written already), so
// row j sits at position context_len - q_len + j. The caches are [num_blocks, num_kv_heads,
// block_size, head_dim], fp32 or bf16 (raw uint16). Rows of one call may be split by sequence
// range across threads.
struct PagedAttentionArgs {
  float* out;
  const float* q;
  const void* k_cache;
  const void* v_cache;
  bool kv_bf16;
  const int32_t* block_tables;
  int64_t block_table_stride;
  const int32_t* query_start_loc;
  const int32_t* context_lens;
  int64_t num_q_heads, num_kv_heads, head_dim, block_size;
  float scale;
};



namespace ref { FLASHPAGE_CPU_KERNEL_DECLS }
namespace avx2 { FLASHPAGE_CPU_KERNEL_DECLS }
namespace avx512 { FLASHPAGE_CPU_KERNEL_DECLS }
namespace generic { FLASHPAGE_CPU_KERNEL_DECLS }

struct KernelTable {
  runtime::Isa isa;
  decltype(&ref::rms_norm) rms_norm;
  decltype(&ref::paged_attention) paged_attention;
  decltype(&ref::linear) linear;
};

// The table for the active ISA (runtime::active_isa()).
const KernelTable& kernels();
// The table for a given level; throws std::invalid_argument if this build or CPU lacks it.
const KernelTable& kernels_for(runtime::Isa isa);

}  // namespace flashpage::cpu
