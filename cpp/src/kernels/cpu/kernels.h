// CPU kernels: one table of entry points per ISA level, plus the scalar reference that every
// vectorised kernel is tested against.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

#include "runtime/aligned.h"
#include "runtime/cpu_features.h"
#include "runtime/host_buffer.h"
#include "runtime/thread_pool.h"

namespace flashpage::cpu {

// Declares one ISA level's entry points (each ISA source defines them in its namespace).
#define FLASHPAGE_CPU_KERNEL_DECLS                                                         \
  /* RMSNorm over rows of x, fused with the residual add when residual is non-null:  */    \
  /* residual += x; out = residual * rsqrt(mean(residual^2) + eps) * weight.           */  \
  void rms_norm(float* out, const float* x, float* residual, const float* weight,          \
                int64_t rows, int64_t dim, float eps);                                     \
  /* Paged attention for a flattened batch (prefill chunks and decodes), see below.    */  \
  void paged_attention(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end);  \
  /* Output columns per panel of this level's packed Linear weights (1: plain rows).     */ \
  int64_t linear_panel();                                                                  \
  /* Elements (of w's type) of a Linear weight [N, K] packed by this level.              */ \
  int64_t packed_linear_elems(bool w_bf16, int64_t N, int64_t K);                          \
  /* A Linear weight w [N, K] (Hugging Face's [out, in], fp32 or bf16 as raw uint16) in   */ \
  /* this level's layout, written once at load: the panels covering columns [n_begin,     */ \
  /* n_end) (n_begin a multiple of linear_panel()) into dst, which holds                  */ \
  /* packed_linear_elems(w_bf16, N, K) elements. See linear.cc and linear_bf16.cc.         */ \
  void pack_linear(void* dst, const void* w, bool w_bf16, int64_t N, int64_t K,            \
                   int64_t n_begin, int64_t n_end);                                        \
  /* y[m * N + n] = x[m, :] . w[n, :] (+ bias[n]) for n in [n_begin, n_end), with w as     */ \
  /* pack_linear of the same level wrote it; n_begin a multiple of linear_panel(). x is    */ \
  /* [M, K] fp32, or, when the level computes in bf16 (takes_bf16_input), the bf16 rows    */ \
  /* linear_input wrote. N is only the row stride of y (>= n_end): y may point into a     */ \
  /* wider buffer. Batch-invariant: y[m, n] is bitwise the same whatever M, the other      */ \
  /* rows, the row's position and the split of columns (see linear.cc).                   */ \
  void linear(float* y, const void* x, const void* w, bool w_bf16, const float* bias,      \
              int64_t M, int64_t N, int64_t K, int64_t n_begin, int64_t n_end);            \
  /* x [M, K] rounded to bf16 (nearest even) into the input layout of the bf16 Linear:    */ \
  /* bf16_input_rows(M) rows of bf16_input_stride(K), zero-padded.                        */ \
  void linear_input(uint16_t* dst, const float* x, int64_t M, int64_t K);                  \
  /* out[t, i] = silu(in[t, i]) * in[t, inter + i] for in [tokens, 2 * inter].           */ \
  void silu_and_mul(float* out, const float* in, int64_t tokens, int64_t inter);           \
  /* gate_up's two Linears and SiLU.mul fused, for bf16 gate and up [inter, K] packed by   */ \
  /* this level and x as linear_input wrote it: down's input (linear_input's layout for K  */ \
  /* = inter) of silu(x . gate^T) * (x . up^T), the panels [p_begin, p_end) of inter's     */ \
  /* columns (linear_panel() wide) — bitwise what linear, silu_and_mul and linear_input   */ \
  /* give, where inter % 16 == 0. Returns whether the level fuses M rows (false: nothing   */ \
  /* written; the caller runs them apart); an empty range only asks.                      */ \
  bool gate_up_silu(uint16_t* out, const void* x, const void* gate, const void* up,         \
                    int64_t M, int64_t K, int64_t inter, int64_t p_begin, int64_t p_end);   \
  /* Rotate-half RoPE in place on x [tokens, heads, head_dim]; cos_sin [positions,        */ \
  /* head_dim]: cos in the first half, sin in the second (scaling folded in).            */ \
  void rotary(float* x, const int32_t* positions, const float* cos_sin, int64_t tokens,    \
              int64_t heads, int64_t head_dim);                                            \
  /* K/V rows [tokens, kv_heads, head_dim] into the paged caches at slot_mapping          */ \
  /* (negative: skip); caches fp32 or bf16 (rounded to nearest even).                     */ \
  void write_kv_cache(const float* key, const float* value, void* k_cache, void* v_cache,  \
                      bool cache_bf16, const int32_t* slot_mapping, int64_t tokens,         \
                      int64_t kv_heads, int64_t head_dim, int64_t block_size);

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
  // Only KV heads [kv_head_begin, kv_head_end) and their query heads; end 0 means all. Lets a
  // caller split one sequence's heads across threads.
  int64_t kv_head_begin = 0, kv_head_end = 0;
  // Only rows [row_begin, row_end) of each KV head's q_len x group rows (query position major,
  // then the heads of the group); end 0 means all. Lets a caller split a long prompt's query
  // tiles across threads. A row's result does not depend on the rows it is computed with.
  int64_t row_begin = 0, row_end = 0;
};

// Where position p's K (or V) row of KV head kv_head sits in a cache of the standard layout, in
// elements from the cache's start; bt is the sequence's block table.
inline int64_t kv_row_offset(const PagedAttentionArgs& a, const int32_t* bt, int64_t kv_head, int64_t p) {
  return ((int64_t(bt[p / a.block_size]) * a.num_kv_heads + kv_head) * a.block_size + p % a.block_size) * a.head_dim;
}

// Activations quantized for the int8 Linear: per row, blocks of 32 values in two int8 levels,
// x ~ d * (qs + qs2 / 254) (the second level holds the first's rounding error: ~15 bits in all,
// where one int8 level flipped near-tied tokens of real models), with each level's block sums
// (the min term, and the VNNI kernels' unsigned-weight correction). See quantize_q8_rows.
constexpr float kQ8Level2 = 1.f / 254.f;
struct Q8Rows {
  const int8_t* qs;      // [M, K], laid out as q8_offset says
  const int8_t* qs2;     // [M, K], the same
  const float* d;        // [M, K / 32]
  const int32_t* sums;   // [M, K / 32]: sum of qs per block
  const int32_t* sums2;  // [M, K / 32]: sum of qs2 per block
  const float* du;       // [M, K / 32]: d * (sums + sums2 / 254), the factor of the weights' min
  bool tiled = false;    // qs and qs2 in 16-row tiles (below)
};

// Where value k of row m is in Q8Rows::qs: row-major, or tiled: each 16 rows (M rounded up to 16)
// a run of K / 32 blocks of 16 rows x 32 values, 512 contiguous bytes — AMX's A tile of a block,
// which loads markedly faster than 16 rows a stride of K apart.
inline int64_t q8_offset(bool tiled, int64_t m, int64_t k, int64_t K) {
  return tiled ? (m / 16 * (K / 32) + k / 32) * 512 + m % 16 * 32 + k % 32 : m * K + k;
}

// The int8 Linear: weights in 32-value blocks along K, each int8 values q with an fp32 scale
// and min (w = q * scale + min: GGUF's Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K exactly), with
// int8 dot products where a level has them.
#define FLASHPAGE_CPU_Q8_DECLS                                                                 \
  /* Output columns per panel of this level's packed int8 weights.                       */ \
  int64_t q8_panel();                                                                      \
  /* Bytes of int8 weights [N, K] (K a multiple of 32) packed by this level.            */ \
  int64_t packed_q8_bytes(int64_t N, int64_t K);                                           \
  /* qs [N, K] int8, scales and mins [N, K / 32] into this level's layout, columns       */ \
  /* [n_begin, n_end).                                                                    */ \
  void pack_q8(void* dst, const int8_t* qs, const float* scales, const float* mins,        \
               int64_t N, int64_t K, int64_t n_begin, int64_t n_end);                      \
  /* y[m * ldy + n] = per block b, in order: t = fma(qs2_b . q_b, kQ8Level2, qs_b . q_b); */ \
  /* acc = fma(t, d_x,b * scale_b, acc); u = fma(sums2_b, kQ8Level2, sums_b);              */ \
  /* acc = fma(min_b, d_x,b * u, acc); then + bias[n]. The block dots are exact in int32: */ \
  /* the same bits on every level, whatever M, the other rows and the split.              */ \
  void q8_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M,   \
                 int64_t ldy, int64_t K, int64_t n_begin, int64_t n_end);                  \
  /* The same for sub-byte weights, q in [0, 2^bits) for bits 4 (GGUF's Q4_0, Q4_1, Q4_K) */ \
  /* or 5 (Q5_0, Q5_1, Q5_K), packed by the vector levels (4 bits two per byte, the fifth */ \
  /* as a bit plane; the reference keeps a byte each): the same results from fewer bytes. */ \
  /* With half_scales (every scale and min exactly an fp16), those are kept in fp16.       */ \
  int64_t packed_qbits_bytes(int64_t N, int64_t K, int bits, bool half_scales);            \
  void pack_qbits(void* dst, const int8_t* qs, const float* scales, const float* mins,     \
                  int64_t N, int64_t K, int64_t n_begin, int64_t n_end, int bits,          \
                  bool half_scales);                                                       \
  void qbits_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, \
                    int64_t ldy, int64_t K, int64_t n_begin, int64_t n_end, int bits,      \
                    bool half_scales);

namespace ref { FLASHPAGE_CPU_KERNEL_DECLS FLASHPAGE_CPU_Q8_DECLS }
namespace avx2 { FLASHPAGE_CPU_KERNEL_DECLS FLASHPAGE_CPU_Q8_DECLS }
namespace avx512 { FLASHPAGE_CPU_KERNEL_DECLS FLASHPAGE_CPU_Q8_DECLS }
namespace avx512_bf16 { FLASHPAGE_CPU_KERNEL_DECLS FLASHPAGE_CPU_Q8_DECLS }
namespace amx { FLASHPAGE_CPU_KERNEL_DECLS FLASHPAGE_CPU_Q8_DECLS }
namespace avx512_vnni { FLASHPAGE_CPU_Q8_DECLS }  // the avx512 level's int8 Linear where VNNI exists
namespace avx_vnni { FLASHPAGE_CPU_Q8_DECLS }     // the avx2 level's where AVX-VNNI exists
namespace generic { FLASHPAGE_CPU_KERNEL_DECLS }

struct KernelTable {
  runtime::Isa isa;
  decltype(&ref::rms_norm) rms_norm;
  decltype(&ref::paged_attention) paged_attention;
  decltype(&ref::linear_panel) linear_panel;
  decltype(&ref::packed_linear_elems) packed_linear_elems;
  decltype(&ref::pack_linear) pack_linear;
  decltype(&ref::linear) linear;
  decltype(&ref::linear_input) linear_input;
  decltype(&ref::silu_and_mul) silu_and_mul;
  decltype(&ref::gate_up_silu) gate_up_silu;
  decltype(&ref::rotary) rotary;
  decltype(&ref::write_kv_cache) write_kv_cache;
  // The int8 Linear: the level's own with VNNI (avx512_bf16, amx), the reference's elsewhere.
  decltype(&ref::q8_panel) q8_panel;
  decltype(&ref::packed_q8_bytes) packed_q8_bytes;
  decltype(&ref::pack_q8) pack_q8;
  decltype(&ref::q8_linear) q8_linear;
  decltype(&ref::packed_qbits_bytes) packed_qbits_bytes;
  decltype(&ref::pack_qbits) pack_qbits;
  decltype(&ref::qbits_linear) qbits_linear;
};

// Panels of `panel` columns covering N output columns (the last padded).
inline int64_t linear_panels(int64_t panel, int64_t N) { return (N + panel - 1) / panel; }
// Panels a thread should claim at a time for M input rows: the kernels for up to 6 rows read
// 2-4 panels side by side (several weight streams per core), so whole groups of four.
inline int64_t linear_grain(int64_t M) { return M <= 6 ? 4 : 1; }

// The input layout of the bf16 Linear: K rounded up to 32 (one AMX tile row) and the rows up to
// 16 (one tile), zero-padded, in A-tile order — tile after tile of 16 rows, each a run of K/32
// blocks of 16 x 32 values — so that every tile is 1 KB of contiguous memory.
inline int64_t bf16_input_stride(int64_t K) { return (K + 31) / 32 * 32; }
inline int64_t bf16_input_rows(int64_t M) { return (M + 15) / 16 * 16; }
inline int64_t bf16_input_elems(int64_t M, int64_t K) { return bf16_input_rows(M) * bf16_input_stride(K); }
inline int64_t bf16_input_index(int64_t m, int64_t k, int64_t K) {
  return (m / 16) * 16 * bf16_input_stride(K) + (k / 32) * 512 + (m % 16) * 32 + k % 32;
}

// The rows of a Linear call go through the weights in passes of at most `max_piece` (a multiple
// of `unit`) that share each weight's trip from memory. This is the pass size for n rows: the
// fewest passes, near-equal, rounded up to `unit` — 17 tiles as 10 + 7, not 16 + 1 (a pass for
// one tile costs a whole trip over the weights: ~80 ms a step on the 1.1B shape, what a 256-token
// prompt beside a few decodes paid).
inline int64_t balanced_piece(int64_t n, int64_t max_piece, int64_t unit) {
  const int64_t passes = std::max<int64_t>(1, (n + max_piece - 1) / max_piece);
  return ((n + passes - 1) / passes + unit - 1) / unit * unit;
}

// Whether table t multiplies weights of this dtype in bf16 (its linear wants linear_input's
// bf16 rows): bf16 weights on a level with bf16 dot products.
inline bool takes_bf16_input(const KernelTable& t, bool w_bf16) { return w_bf16 && runtime::isa_has_bf16_dot(t.isa); }

// Whether x is exactly an IEEE half (finite, normal or subnormal, or zero).
inline bool fp16_exact(float x) {
  const float a = x < 0 ? -x : x;
  if (a == 0.f) return true;
  if (!(a <= 65504.f) || a < 5.9604645e-8f) return false;  // beyond the range, or below its smallest subnormal
  uint32_t b;
  __builtin_memcpy(&b, &a, 4);
  const int exp = int(b >> 23) - 127;
  const int keep = exp >= -14 ? 10 : 10 - (-14 - exp);  // mantissa bits a half holds at this exponent
  return keep >= 0 && (b & ((1u << (23 - keep)) - 1)) == 0;
}

// fp32 to bf16 bits, rounded to nearest even; NaN stays NaN.
inline uint16_t bf16_round(float x) {
  uint32_t b;
  __builtin_memcpy(&b, &x, 4);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((b >> 16) | 0x40);
  return uint16_t((b + 0x7FFFu + ((b >> 16) & 1)) >> 16);
}

// A Linear weight packed by one kernel table (owning; use it only with that table's linear).
struct PackedLinear {
  runtime::HostBuffer data;
  bool bf16 = false;
  int64_t N = 0, K = 0;
};
// Packs w [N, K] with table t, split across the global thread pool: into a buffer of its own,
// or into dst (packed_linear_bytes of it).
PackedLinear pack_linear_weight(const KernelTable& t, const void* w, bool w_bf16, int64_t N, int64_t K);
size_t packed_linear_bytes(const KernelTable& t, bool w_bf16, int64_t N, int64_t K);
void pack_linear_weight(const KernelTable& t, void* dst, const void* w, bool w_bf16, int64_t N, int64_t K);
// What t's linear takes for weights of this dtype: x itself, or x rounded to bf16 into `buf`
// (resized) — after make(begin, end) has written rows [begin, end) of x, when given: the
// producing op and the rounding run in one parallel pass, each thread rounding the rows it has
// just made (whole 16-row tiles, the input layout's unit) while they are in its cache. Split
// over the global thread pool when large.
template <class Make>
const void* linear_input_for(const KernelTable& t, bool w_bf16, const float* x, int64_t M, int64_t K,
                             runtime::AlignedVector<uint16_t>& buf, Make&& make) {
  constexpr int64_t kMinParallelElems = int64_t(1) << 15;  // below this, waking the pool costs more
  auto& pool = runtime::ThreadPool::global();
  if (!takes_bf16_input(t, w_bf16)) {
    if (M < 2 || M * K < kMinParallelElems) make(0, M);
    else pool.parallel_for(M, make);
    return x;
  }
  if (int64_t(buf.size()) < bf16_input_elems(M, K)) buf.resize(size_t(bf16_input_elems(M, K)));
  const int64_t Kp = bf16_input_stride(K), tiles = bf16_input_rows(M) / 16;
  // A tile at a time: a thread's whole share of a long step's rows (megabytes) would leave its
  // L2 before the rounding read it back (a 1,024-token prefill: 2.4x the rounding's time).
  auto both = [&](int64_t tb, int64_t te) {
    for (int64_t tile = tb; tile < te; ++tile) {
      const int64_t b = tile * 16, e = std::min(M, b + 16);
      make(b, e);
      t.linear_input(buf.data() + b * Kp, x + b * K, e - b, K);
    }
  };
  if (tiles < 2 || M * K < kMinParallelElems) both(0, tiles);
  else pool.parallel_for(tiles, both);
  return buf.data();
}
inline const void* linear_input_for(const KernelTable& t, bool w_bf16, const float* x, int64_t M, int64_t K,
                                    runtime::AlignedVector<uint16_t>& buf) {
  return linear_input_for(t, w_bf16, x, M, K, buf, [](int64_t, int64_t) {});
}
// y[m * ldy + n] = x[m, :] . w[n, :] (+ bias[n]) for all N columns of w (packed by t), its panels
// split across the global thread pool when parallel; input is what linear_input_for gave.
void run_linear(const KernelTable& t, const PackedLinear& w, float* y, int64_t ldy, const void* input,
                const float* bias, int64_t M, bool parallel = true);

// x [M, K] (K a multiple of 32) quantized per row in blocks of 32: d = max |x| / 127, qs =
// round(x / d), qs2 = round((x - qs * d) * 254 / d) (ties away from zero), and the blocks' sums
// of each, and du (Q8Rows::du). qs2, sums2 and du may be null (one level: what weights are
// requantized to). qs and qs2 laid out as q8_offset(tiled) says (tiled: rounded up to 16 rows).
// Depends on each row alone.
void quantize_q8_rows(const float* x, int64_t M, int64_t K, int8_t* qs, float* d, int32_t* sums, int8_t* qs2 = nullptr,
                      int32_t* sums2 = nullptr, float* du = nullptr, bool tiled = false);

// The table for the active ISA (runtime::active_isa()).
const KernelTable& kernels();
// The table for a given level; throws std::invalid_argument if this build or CPU lacks it.
// With int8_variants (the default), a level takes the VNNI build of the int8 Linear where the
// CPU has the extension (avx2: AVX-VNNI, avx512: AVX512-VNNI); false keeps the level's own
// (tests run both).
const KernelTable& kernels_for(runtime::Isa isa, bool int8_variants = true);
// The table a model runs with, by its compute dtype: "auto" (the active level: bf16 weights
// compute in bf16 where the level has bf16 dot products), "float32" (the best fp32 level, for
// bf16 weights too: widened in registers) or "bfloat16" (needs bf16 weights and a level with
// bf16 dot products). Throws std::invalid_argument naming what is missing.
const KernelTable& kernels_for_compute(const std::string& compute_dtype, bool bf16_weights);

}  // namespace flashpage::cpu
