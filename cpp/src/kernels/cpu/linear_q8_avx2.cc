// The int8, 4-bit and 5-bit Linears on AVX2 (the avx2 level, and the avx512 level on CPUs
// without AVX512-VNNI), on q8_layout.h's layout, each 16-column panel as two halves of 8
// columns (one int32 lane a column). VPMADDUBSW multiplies unsigned weight bytes by signed
// activation bytes into int16 pairs, which must not saturate: a sub-byte weight (0..31) makes at
// most 2 x 31 x 127 a pair, so 8 groups of 4-bit (4 of 5-bit) add up in int16 before VPMADDWD
// widens them; 8-bit weights (w + 128, 0..255) run as their two nibbles (16 hi + lo), each a
// 4-bit dot. So each block's dot is the exact integer, and the float sums are the VNNI kernels'
// (linear_q8.cc): every level computes the same bits. Built again with AVX-VNNI (the avx_vnni
// variant, for CPUs with it but no AVX-512): VPDPBUSD on 8 lanes sums straight into int32, with
// no int16 step, and takes 8-bit weights whole.
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/q8_layout.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {
using q8::block_bytes;
using q8::kPanel;
constexpr int64_t kRows = 4;  // input rows that share each weight load
#if defined(__AVXVNNI__)
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif

// Half h (columns 8h..8h+7) of block `blk`: the 8 groups' low nibbles (sub-byte: the weights) in
// lo, and for 8-bit weights the high nibbles in hi.
template <int kBits>
inline void load_half(__m256i (&lo)[8], __m256i (&hi)[8], const uint8_t* blk, int h) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  auto at = [&](int64_t off) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + off + h * 32)); };
  if constexpr (kBits < 8) {
    for (int i = 0; i < 4; ++i) {
      const __m256i z = at(i * 64);
      lo[i] = _mm256_and_si256(z, low4);
      lo[i + 4] = _mm256_and_si256(_mm256_srli_epi16(z, 4), low4);
    }
    if constexpr (kBits == 5) {
      // Group g's plane: bit j = byte j's fifth bit; this half's 32 bits spread to its 32 bytes.
      const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                              3, 3, 3, 3, 3, 3, 3, 3);
      const __m256i bit = _mm256_set1_epi64x(int64_t(0x8040201008040201));
      for (int g = 0; g < 8; ++g) {
        int32_t plane;
        std::memcpy(&plane, blk + 256 + g * 8 + h * 4, 4);
        const __m256i v = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(plane), spread), bit);
        lo[g] = _mm256_add_epi8(lo[g], _mm256_and_si256(_mm256_cmpeq_epi8(v, bit), _mm256_set1_epi8(16)));
      }
    }
  } else if constexpr (kVnni) {
    for (int g = 0; g < 8; ++g) lo[g] = at(g * 64);
  } else {
    for (int g = 0; g < 8; ++g) {
      const __m256i z = at(g * 64);
      lo[g] = _mm256_and_si256(z, low4);
      hi[g] = _mm256_and_si256(_mm256_srli_epi16(z, 4), low4);
    }
  }
}

// sum over the 8 groups of w[g] x (the 4 activation bytes of group g, broadcast), exact: int16
// sums of kRun groups at a time, widened to int32 (with AVX-VNNI, int32 sums directly).
template <int kRun>
inline __m256i dot(const __m256i (&w)[8], const int8_t* xq) {
#if defined(__AVXVNNI__)
  __m256i a[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};  // two chains: the latency
  for (int g = 0; g < 8; ++g) {
    int32_t f;
    std::memcpy(&f, xq + 4 * g, 4);
    a[g % 2] = _mm256_dpbusd_avx_epi32(a[g % 2], w[g], _mm256_set1_epi32(f));
  }
  return _mm256_add_epi32(a[0], a[1]);
#else
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc = _mm256_setzero_si256(), run = _mm256_setzero_si256();
  for (int g = 0; g < 8; ++g) {
    int32_t f;
    std::memcpy(&f, xq + 4 * g, 4);
    run = _mm256_add_epi16(run, _mm256_maddubs_epi16(w[g], _mm256_set1_epi32(f)));
    if ((g + 1) % kRun == 0) {
      acc = _mm256_add_epi32(acc, _mm256_madd_epi16(run, ones));
      run = _mm256_setzero_si256();
    }
  }
  return acc;
#endif
}

// The exact dot of one level's block with the weights (the 8-bit correction included).
template <int kBits>
inline __m256i block_dot(const __m256i (&lo)[8], const __m256i (&hi)[8], const int8_t* xq, int32_t sum) {
  if constexpr (kBits == 8 && kVnni) return _mm256_add_epi32(dot<8>(lo, xq), _mm256_set1_epi32(-128 * sum));
  else if constexpr (kBits == 8)
    return _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(dot<8>(hi, xq), 4), dot<8>(lo, xq)),
                            _mm256_set1_epi32(-128 * sum));
  else return dot<kBits == 5 ? 4 : 8>(lo, xq);
}

template <bool kHalf>
inline __m256 load_scales(const uint8_t* p, int h) {  // 8 columns' scales (or mins) of half h
  if constexpr (kHalf) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * h)));
  else return _mm256_loadu_ps(reinterpret_cast<const float*>(p + 32 * h));
}

template <int kBits, bool kHalf>
void linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
            int64_t n_begin, int64_t n_end) {
  const int64_t B = K / 32, bb = block_bytes<kBits, kHalf>();
  for (int64_t p = n_begin / kPanel; p * kPanel < n_end; ++p) {
    const auto* panel = static_cast<const uint8_t*>(w) + p * B * bb;
    for (int h = 0; h < 2; ++h) {
      const int64_t c0 = p * kPanel + 8 * h, cols = std::min<int64_t>(8, n_end - c0);
      if (cols <= 0) break;
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(int32_t(cols)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
      const __m256 bias_v = bias ? _mm256_maskload_ps(bias + c0, mask) : _mm256_setzero_ps();
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        const int64_t rows = std::min(kRows, M - m0);
        __m256 acc[kRows] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        for (int64_t b = 0; b < B; ++b) {
          const uint8_t* blk = panel + b * bb;
          if (h == 0 && m0 == 0) q8::prefetch_ahead<block_bytes<kBits, kHalf>()>(blk);
          __m256i lo[8], hi[8];
          load_half<kBits>(lo, hi, blk, h);
          const __m256 ws = load_scales<kHalf>(blk + q8::scales_at<kBits>(), h);
          const __m256 wm = load_scales<kHalf>(blk + q8::mins_at<kBits, kHalf>(), h);
          for (int64_t i = 0; i < rows; ++i) {
            const int64_t m = m0 + i, at = q8_offset(x.tiled, m, b * 32, K), j = m * B + b;
            const __m256i s = block_dot<kBits>(lo, hi, x.qs + at, x.sums[j]);
            const __m256i s2 = block_dot<kBits>(lo, hi, x.qs2 + at, x.sums2[j]);
            // add_block of linear_q8.cc, 8 lanes wide
            const __m256 t = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2), _mm256_set1_ps(kQ8Level2), _mm256_cvtepi32_ps(s));
            acc[i] = _mm256_fmadd_ps(t, _mm256_mul_ps(ws, _mm256_set1_ps(x.d[j])), acc[i]);
            acc[i] = _mm256_fmadd_ps(wm, _mm256_set1_ps(x.du[j]), acc[i]);
          }
        }
        for (int64_t i = 0; i < rows; ++i)
          _mm256_maskstore_ps(y + (m0 + i) * ldy + c0, mask, bias ? _mm256_add_ps(acc[i], bias_v) : acc[i]);
      }
    }
  }
}

}  // namespace

void q8_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
               int64_t n_begin, int64_t n_end) {
  linear<8, false>(y, x, w, bias, M, ldy, K, n_begin, n_end);
}
void qbits_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
                  int64_t n_begin, int64_t n_end, int bits, bool half_scales) {
  q8::with_qbits(bits, half_scales,
                 [&]<int kBits, bool kHalf>() { linear<kBits, kHalf>(y, x, w, bias, M, ldy, K, n_begin, n_end); });
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
