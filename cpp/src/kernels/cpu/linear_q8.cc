// The int8, 4-bit and 5-bit Linears on AVX512-VNNI (the avx512_bf16 and amx levels, and the
// avx512 level's avx512_vnni build for CPUs with VNNI but no BF16), on the
// layout of q8_layout.h: one int32 lane per column of a 16-column panel, so that each VPDPBUSD
// multiplies 4 values of one input row (broadcast) by the same 4 positions of 16 weight rows.
// 8-bit weights are stored unsigned (w + 128, the instruction's unsigned operand) and the
// activation block's sum corrects it: sum((w + 128) x) - 128 sum(x) = sum(w x), exact in int32.
// Sub-byte weights (0..31) are unsigned already and need no correction.
//
// On the amx level, each 16 full rows run on AMX-INT8 tiles instead (linear_amx): the 8-bit
// layout above is already an 8 x 64-byte B tile per block (4 positions x 16 columns a row).
// Both paths get each block's integer dot products exactly and apply the same float operations
// in the same order per output, so a row's result does not depend on which path ran it (batch
// invariance across batch sizes holds bitwise).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/amx.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/q8_layout.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {
using q8::block_bytes;
using q8::kPanel;

// Groups i and i + 4 of a block (i < 4), the ones that share a byte in the sub-byte layouts. The
// 4-bit high nibble stays in place, 16 x its value: its dots are multiples of 16, shifted back
// exactly once per block (kHighShift), which saves a shift per 64 weights.
template <int kBits>
constexpr int kHighShift = kBits == 4 ? 4 : 0;
template <int kBits>
inline void load_group_pair(__m512i& lo, __m512i& hi, const uint8_t* blk, int i) {
  if constexpr (kBits == 8) {
    lo = _mm512_loadu_si512(blk + i * 64);
    hi = _mm512_loadu_si512(blk + (i + 4) * 64);
  } else {
    const __m512i z = _mm512_loadu_si512(blk + i * 64);
    lo = _mm512_and_si512(z, _mm512_set1_epi8(0x0F));
    if constexpr (kBits == 4) {
      hi = _mm512_and_si512(z, _mm512_set1_epi8(char(0xF0)));
    } else {
      hi = _mm512_and_si512(_mm512_srli_epi16(z, 4), _mm512_set1_epi8(0x0F));
      __mmask64 f_lo, f_hi;
      std::memcpy(&f_lo, blk + 256 + i * 8, 8);
      std::memcpy(&f_hi, blk + 256 + (i + 4) * 8, 8);
      lo = _mm512_mask_add_epi8(lo, f_lo, lo, _mm512_set1_epi8(16));
      hi = _mm512_mask_add_epi8(hi, f_hi, hi, _mm512_set1_epi8(16));
    }
  }
}

// The 16 columns' unsigned weights of block `blk`, as VPDPBUSD's 8 groups of 4 positions.
template <int kBits>
inline void load_groups(__m512i (&wv)[8], const uint8_t* blk) {
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    load_group_pair<kBits>(wv[i], wv[i + 4], blk, i);
    // The in-place high nibble back to its value: each byte's low 4 bits are zero, so the
    // 16-bit shift carries nothing across bytes.
    if constexpr (kHighShift<kBits> > 0) wv[i + 4] = _mm512_srli_epi16(wv[i + 4], kHighShift<kBits>);
  }
}

template <bool kHalf>
inline __m512 load_scales(const uint8_t* p) {
  if constexpr (kHalf) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

// One block's contribution to 16 outputs of a row, from its exact integer dots s (level 1) and
// s2 (level 2) and the row's d and du for the block: the one sequence of float operations both
// paths (and the reference) use.
inline __m512 add_block(__m512 acc, __m512i s, __m512i s2, float d, float du, __m512 ws, __m512 wm) {
  const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2), _mm512_set1_ps(kQ8Level2), _mm512_cvtepi32_ps(s));
  acc = _mm512_fmadd_ps(t, _mm512_mul_ps(ws, _mm512_set1_ps(d)), acc);
  return _mm512_fmadd_ps(wm, _mm512_set1_ps(du), acc);
}

// kR rows [m0, m0 + kR) x kP adjacent panels from `panel` (16 columns each, from column c0) with
// VPDPBUSD. Two panels are two weight streams a panel apart: one core reads them markedly
// faster than one stream (M = 1: ~14 against ~11 GB/s), and they share the activations'
// broadcasts. Each (row, panel) keeps four integer chains a block: groups 0-3 and 4-7, per
// activation level; integer sums, so their order does not change the result.
template <int kBits, bool kHalf, int kR, int kP>
void vnni_tile(float* y, const Q8Rows& x, const uint8_t* panel, const float* bias, int64_t m0, int64_t ldy,
               int64_t K, int64_t c0, int64_t n_end, bool prefetch) {
  const int64_t B = K / 32, bb = block_bytes<kBits, kHalf>(), pstride = B * bb;
  // The unsigned 8-bit weights are w + 128: each level's dot carries 128 x its block sum.
  constexpr int32_t kBias128 = kBits < 8 ? 0 : -128;
  const int64_t xstep = x.tiled ? 512 : 32;  // a row's next block in Q8Rows::qs
  const int64_t ahead = (q8::kPairPrefetchBytes + bb - 1) / bb;  // blocks
  const int8_t *xq[kR], *xq2[kR];
  for (int r = 0; r < kR; ++r) {
    const int64_t at = q8_offset(x.tiled, m0 + r, 0, K);
    xq[r] = x.qs + at;
    xq2[r] = x.qs2 + at;
  }
  __m512 acc[kR][kP];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = panel + b * bb;
    if (prefetch) {  // the first rows' pass brings the panels in; the others find them in L2
      if constexpr (kP == 1) {
        q8::prefetch_ahead<block_bytes<kBits, kHalf>()>(blk);
      } else {
        // Each stream's block `ahead` further on: in these panels, or past their end in the
        // next pair's (a short K's panels end within the distance).
        const int64_t t = b + ahead;
        const uint8_t* at = t < B ? panel + t * bb : panel + 2 * pstride + (t - B) * bb;
        for (int j = 0; j < kP; ++j) q8::prefetch_ahead<block_bytes<kBits, kHalf>(), 0>(at + j * pstride);
      }
    }
    __m512i lo[kR][kP], hi[kR][kP], lo2[kR][kP], hi2[kR][kP];
    for (int r = 0; r < kR; ++r)
      for (int j = 0; j < kP; ++j) {
        lo[r][j] = _mm512_set1_epi32(kBias128 * x.sums[(m0 + r) * B + b]);
        lo2[r][j] = _mm512_set1_epi32(kBias128 * x.sums2[(m0 + r) * B + b]);
        hi[r][j] = hi2[r][j] = _mm512_setzero_si512();
      }
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      __m512i wl[kP], wh[kP];
      for (int j = 0; j < kP; ++j) load_group_pair<kBits>(wl[j], wh[j], blk + j * pstride, i);
      for (int r = 0; r < kR; ++r) {
        const int8_t *q = xq[r] + b * xstep, *q2 = xq2[r] + b * xstep;
        int32_t f, f2, h, h2;  // the row's 4 values of groups i and i + 4, both levels
        std::memcpy(&f, q + 4 * i, 4);
        std::memcpy(&f2, q2 + 4 * i, 4);
        std::memcpy(&h, q + 16 + 4 * i, 4);
        std::memcpy(&h2, q2 + 16 + 4 * i, 4);
        const __m512i F = _mm512_set1_epi32(f), F2 = _mm512_set1_epi32(f2), H = _mm512_set1_epi32(h),
                      H2 = _mm512_set1_epi32(h2);
        for (int j = 0; j < kP; ++j) {
          lo[r][j] = _mm512_dpbusd_epi32(lo[r][j], wl[j], F);
          lo2[r][j] = _mm512_dpbusd_epi32(lo2[r][j], wl[j], F2);
          hi[r][j] = _mm512_dpbusd_epi32(hi[r][j], wh[j], H);
          hi2[r][j] = _mm512_dpbusd_epi32(hi2[r][j], wh[j], H2);
        }
      }
    }
    for (int j = 0; j < kP; ++j) {
      const uint8_t* pb = blk + j * pstride;
      const __m512 ws = load_scales<kHalf>(pb + q8::scales_at<kBits>());
      const __m512 wm = load_scales<kHalf>(pb + q8::mins_at<kBits, kHalf>());
      for (int r = 0; r < kR; ++r) {
        const __m512i s = _mm512_add_epi32(lo[r][j], _mm512_srai_epi32(hi[r][j], kHighShift<kBits>));
        const __m512i s2 = _mm512_add_epi32(lo2[r][j], _mm512_srai_epi32(hi2[r][j], kHighShift<kBits>));
        const int64_t at = (m0 + r) * B + b;
        acc[r][j] = add_block(acc[r][j], s, s2, x.d[at], x.du[at], ws, wm);
      }
    }
  }
  for (int j = 0; j < kP; ++j) {
    const int64_t c = c0 + j * kPanel, cols = std::min(kPanel, n_end - c);
    const __mmask16 mask = __mmask16((1u << cols) - 1);
    const __m512 bias_v = bias ? _mm512_maskz_loadu_ps(mask, bias + c) : _mm512_setzero_ps();
    for (int r = 0; r < kR; ++r)
      _mm512_mask_storeu_ps(y + (m0 + r) * ldy + c, mask, bias ? _mm512_add_ps(acc[r][j], bias_v) : acc[r][j]);
  }
}

// Rows [m_begin, M) with VPDPBUSD: panels in pairs (the last alone when their count is odd),
// rows two at a time (the last alone when odd).
template <int kBits, bool kHalf>
void linear_vnni(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t m_begin, int64_t M,
                 int64_t ldy, int64_t K, int64_t n_begin, int64_t n_end) {
  const int64_t pstride = K / 32 * block_bytes<kBits, kHalf>();
  const int64_t p_end = (n_end + kPanel - 1) / kPanel;
  for (int64_t p = n_begin / kPanel; p < p_end; p += 2) {
    const auto* panel = static_cast<const uint8_t*>(w) + p * pstride;
    const bool pair = p + 1 < p_end;
    for (int64_t m0 = m_begin; m0 < M; m0 += 2) {
      const bool two = m0 + 1 < M, first = m0 == m_begin;
      const int64_t c0 = p * kPanel;
      if (pair && two) vnni_tile<kBits, kHalf, 2, 2>(y, x, panel, bias, m0, ldy, K, c0, n_end, first);
      else if (pair) vnni_tile<kBits, kHalf, 1, 2>(y, x, panel, bias, m0, ldy, K, c0, n_end, first);
      else if (two) vnni_tile<kBits, kHalf, 2, 1>(y, x, panel, bias, m0, ldy, K, c0, n_end, first);
      else vnni_tile<kBits, kHalf, 1, 1>(y, x, panel, bias, m0, ldy, K, c0, n_end, first);
    }
  }
}

#if defined(__AMX_INT8__)
// Tiles: 0 and 1 the activations of 16 rows for one block (levels 1 and 2: 16 rows of 32 int8),
// 2 the block's weights (8 rows of 4 positions x 16 columns), 4 and 5 the two levels' int32 dots.
const TileConfig kQ8Tiles{{16, 32}, {16, 32}, {8, 64}, {0, 0}, {16, 64}, {16, 64}};

// Scratch of a thread: a panel's weights as signed bytes and the two C tiles. Grows once to the
// largest K; a step allocates nothing after the first.
struct AmxScratch {
  runtime::AlignedVector<int8_t> weights;
  runtime::AlignedVector<int32_t> c = runtime::AlignedVector<int32_t>(2 * 256);
};

// A panel's blocks as signed int8 in the B-tile layout (512 bytes a block): TDPBSSD then gives
// each block's exact dot with no correction term.
template <int kBits, bool kHalf>
void signed_panel(int8_t* dst, const uint8_t* panel, int64_t B) {
  const __m512i shift = _mm512_set1_epi8(kBits == 8 ? -128 : 0);  // 8 bits: u - 128; else q
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = panel + b * block_bytes<kBits, kHalf>();
    q8::prefetch_ahead<block_bytes<kBits, kHalf>()>(blk);
    __m512i wv[8];
    load_groups<kBits>(wv, blk);
    for (int g = 0; g < 8; ++g) _mm512_storeu_si512(dst + b * 512 + g * 64, _mm512_add_epi8(wv[g], shift));
  }
}

// Rows [0, M) (M a multiple of 16) on AMX-INT8. A panel's blocks are converted once and reused
// by every 16-row tile; each block's two dots (TDPBSSD: signed x signed, exact) go through
// memory to the vector registers that sum them as add_block does. (Two panels sharing the
// activation tiles, and the dots issued a block ahead of their sums, measured no faster: the
// tile stores and the float sums of each 32-wide block are the cost.)
template <int kBits, bool kHalf>
void linear_amx(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
                int64_t n_begin, int64_t n_end) {
  static thread_local AmxScratch scratch;
  const int64_t B = K / 32, bb = block_bytes<kBits, kHalf>();
  if (int64_t(scratch.weights.size()) < B * 512) scratch.weights.resize(size_t(B * 512));
  // Plain pointers: the thread_local's address is a call in a shared library, which would
  // clobber every vector register inside the loop.
  int32_t* const c = scratch.c.data();
  int8_t* const wts = scratch.weights.data();
  const int64_t a_stride = x.tiled ? 32 : K;
  const float* const xd = x.d;
  const float* const xdu = x.du;
  TileScope tiles(kQ8Tiles);
  for (int64_t p = n_begin / kPanel; p * kPanel < n_end; ++p) {
    const auto* panel = static_cast<const uint8_t*>(w) + p * B * bb;
    signed_panel<kBits, kHalf>(wts, panel, B);
    const int64_t c0 = p * kPanel, cols = std::min(kPanel, n_end - c0);
    const __mmask16 mask = __mmask16((1u << cols) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      __m512 acc[16];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t b = 0; b < B; ++b) {
        const int64_t at = q8_offset(x.tiled, m0, b * 32, K);
        _tile_loadd(0, x.qs + at, a_stride);
        _tile_loadd(1, x.qs2 + at, a_stride);
        _tile_loadd(2, wts + b * 512, 64);
        _tile_zero(4);
        _tile_zero(5);
        _tile_dpbssd(4, 0, 2);
        _tile_dpbssd(5, 1, 2);
        _tile_stored(4, c, 64);
        _tile_stored(5, c + 256, 64);
        const uint8_t* blk = panel + b * bb;
        const __m512 ws = load_scales<kHalf>(blk + q8::scales_at<kBits>());
        const __m512 wm = load_scales<kHalf>(blk + q8::mins_at<kBits, kHalf>());
        const int64_t r = m0 * B + b;
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          acc[i] = add_block(acc[i], _mm512_loadu_si512(c + 16 * i), _mm512_loadu_si512(c + 256 + 16 * i), xd[r + i * B],
                             xdu[r + i * B], ws, wm);
      }
      const __m512 bias_v = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
      for (int i = 0; i < 16; ++i)
        _mm512_mask_storeu_ps(y + (m0 + i) * ldy + c0, mask, bias ? _mm512_add_ps(acc[i], bias_v) : acc[i]);
    }
  }
}
#endif

template <int kBits, bool kHalf = false>
void linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
            int64_t n_begin, int64_t n_end) {
  int64_t m_begin = 0;
#if defined(__AMX_INT8__)
  m_begin = M / 16 * 16;
  if (m_begin) linear_amx<kBits, kHalf>(y, x, w, bias, m_begin, ldy, K, n_begin, n_end);
#endif
  if (m_begin < M) linear_vnni<kBits, kHalf>(y, x, w, bias, m_begin, M, ldy, K, n_begin, n_end);
}

}  // namespace

void q8_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
               int64_t n_begin, int64_t n_end) {
  linear<8>(y, x, w, bias, M, ldy, K, n_begin, n_end);
}
void qbits_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
                  int64_t n_begin, int64_t n_end, int bits, bool half_scales) {
  q8::with_qbits(bits, half_scales,
                 [&]<int kBits, bool kHalf>() { linear<kBits, kHalf>(y, x, w, bias, M, ldy, K, n_begin, n_end); });
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
