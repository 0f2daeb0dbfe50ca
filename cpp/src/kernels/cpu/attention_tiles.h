// The KV-cache layout of bf16 pairs that every vector level keeps for bf16 caches of common
// shapes, and paged attention with bf16 dot products over it: on AMX tiles (attention_amx.cc, the
// amx level) or with vdpbf16ps (attention_bf16.cc, the avx512_bf16 level).
// Include only from sources compiled per ISA level.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

// Whether bf16 caches of this shape are kept in the pair layout: head_dim a multiple of 32 (and
// at most 256) and blocks a multiple of 16 tokens. Within each [block, kv_head] of
// block_size x head_dim values (the standard layout's size and place):
//   K: [head_dim / 2][block_size][2] — 16 consecutive tokens' (d, d + 1) pairs side by side:
//      one vector load is K^T's rows d and d + 1 for 16 keys (the vector kernels' scores need
//      no transposition), and the B tile of Q . K^T is 16 rows of 64 bytes, one per pair of d;
//   V: [block_size / 2][head_dim][2] — (token, token + 1) pairs for each d: one vector load is
//      V's rows of two tokens, and the B tile of P . V.
// Other shapes (and fp32 caches, and the scalar reference) keep the standard
// [block_size][head_dim] layout.
inline bool kv_pair_layout(bool kv_bf16, int64_t head_dim, int64_t block_size) {
  return kv_bf16 && head_dim % 32 == 0 && head_dim <= 256 && block_size % 16 == 0;
}

#if defined(__AVX512BF16__)
// The online softmax of the bf16-dot kernels (amx and avx512_bf16: one code, one arithmetic),
// over a step of key groups of 16.

inline __mmask16 first_lanes(int64_t n) {  // lanes [0, n), n clamped to [0, 16]
  return n <= 0 ? 0 : n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
}

// One row's part of a step: scores s of `groups` groups, mask[g] the keys of group g it sees.
// Its new maximum (at least m_old) into m_new; P = exp(s - m_new), 0 where masked, rounded to
// bf16 with group g at p + g * p_stride; returns P's fp32 sum.
inline float softmax_row_step(const __m512* s, const __mmask16* mask, int groups, float m_old, float& m_new,
                              uint16_t* p, int64_t p_stride) {
  __m512 mx = _mm512_set1_ps(-INFINITY);
  for (int g = 0; g < groups; ++g) mx = _mm512_mask_max_ps(mx, mask[g], mx, s[g]);
  m_new = std::max(m_old, vmax_all(mx));
  const __m512 mv = _mm512_set1_ps(m_new);
  __m512 sum = _mm512_setzero_ps();
  for (int g = 0; g < groups; ++g) {
    const __m512 pg = _mm512_maskz_mov_ps(mask[g], vexp_nonpositive(_mm512_sub_ps(s[g], mv)));
    sum = _mm512_add_ps(sum, pg);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + g * p_stride), (__m256i)_mm512_cvtneps_pbh(pg));
  }
  return vsum(sum);
}

// The step's end for 16 rows' running maxima m and sums l (64-byte aligned): m becomes m_new,
// l becomes l * c + sums; returns the rescale factors c of their outputs, in one vector exp. A
// row's first step (m = -inf) rescales its zeros by exactly 0, a step that leaves the maximum as
// it was (or that the row sits out) by exactly 1 (vexp_nonpositive(0) is 1).
inline __m512 softmax_rescale(float* m, float* l, const float* m_new, const float* sums) {
  const __m512 m_old = _mm512_load_ps(m), mn = _mm512_load_ps(m_new);
  const __m512 c = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m_old, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                       vexp_nonpositive(_mm512_sub_ps(m_old, mn)));
  _mm512_store_ps(l, _mm512_fmadd_ps(_mm512_load_ps(l), c, _mm512_load_ps(sums)));
  _mm512_store_ps(m, mn);
  return c;
}
#endif

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FLASHPAGE_ATTENTION_TILES 1
void paged_attention_tiles(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end);
#elif defined(__AVX512BF16__)
// The same arithmetic with vdpbf16ps in vector registers (attention_bf16.cc, avx512_bf16).
#define FLASHPAGE_ATTENTION_PAIRS_BF16 1
void paged_attention_pairs_bf16(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end);
#endif

}  // namespace flashpage::cpu::FLASHPAGE_ISA
