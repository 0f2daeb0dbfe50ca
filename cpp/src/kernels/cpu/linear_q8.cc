// The int8 Linear on AVX512-VNNI (the avx512_bf16 and amx levels): panels of 16 output
// columns, one int32 lane per column, so that each VPDPBUSD multiplies 4 values of one input
// row (broadcast) by the same 4 positions of 16 weight rows. The weights are stored unsigned
// (w + 128, the instruction's unsigned operand) and the activation block's sum corrects it:
// sum((w + 128) x) - 128 sum(x) = sum(w x), exact in int32. Layout of a panel, block after
// block along K: 8 groups of 4 positions x 16 columns (512 bytes: column c of group g at
// g * 64 + c * 4), then the 16 columns' scales (64 bytes).
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#include "kernels/cpu/kernels.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {
constexpr int64_t kPanel = 16;
constexpr int64_t kBlockBytes = 512 + 64;
constexpr int64_t kRows = 4;  // input rows that share each weight load
}  // namespace

int64_t q8_panel() { return kPanel; }

int64_t packed_q8_bytes(int64_t N, int64_t K) { return (N + kPanel - 1) / kPanel * (K / 32) * kBlockBytes; }

void pack_q8(void* dst, const int8_t* qs, const float* d, int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  const int64_t B = K / 32;
  for (int64_t p = n_begin / kPanel; p * kPanel < n_end; ++p) {
    auto* panel = static_cast<uint8_t*>(dst) + p * B * kBlockBytes;
    for (int64_t b = 0; b < B; ++b) {
      uint8_t* blk = panel + b * kBlockBytes;
      float scales[kPanel] = {};
      for (int64_t c = 0; c < kPanel; ++c) {
        const int64_t n = p * kPanel + c;
        for (int64_t k = 0; k < 32; ++k)  // padding columns: weight 0, scale 0
          blk[(k / 4) * 64 + c * 4 + k % 4] = n < N ? uint8_t(int(qs[n * K + b * 32 + k]) + 128) : uint8_t(128);
        if (n < N) scales[c] = d[n * B + b];
      }
      std::memcpy(blk + 512, scales, sizeof scales);
    }
  }
}

void q8_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
               int64_t n_begin, int64_t n_end) {
  const int64_t B = K / 32;
  for (int64_t p = n_begin / kPanel; p * kPanel < n_end; ++p) {
    const auto* panel = static_cast<const uint8_t*>(w) + p * B * kBlockBytes;
    const int64_t c0 = p * kPanel, cols = std::min(kPanel, n_end - c0);
    const __mmask16 mask = __mmask16((1u << cols) - 1);
    const __m512 bias_v = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
    for (int64_t m0 = 0; m0 < M; m0 += kRows) {
      const int64_t rows = std::min(kRows, M - m0);
      __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* blk = panel + b * kBlockBytes;
        __m512i wv[8];
        for (int g = 0; g < 8; ++g) wv[g] = _mm512_loadu_si512(blk + g * 64);
        const __m512 ws = _mm512_loadu_ps(reinterpret_cast<const float*>(blk + 512));
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t m = m0 + i;
          const int8_t* xq = x.qs + m * K + b * 32;
          __m512i s = _mm512_set1_epi32(-128 * x.sums[m * B + b]);
          for (int g = 0; g < 8; ++g) {
            int32_t four;
            std::memcpy(&four, xq + 4 * g, 4);
            s = _mm512_dpbusd_epi32(s, wv[g], _mm512_set1_epi32(four));
          }
          acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(ws, _mm512_set1_ps(x.d[m * B + b])), acc[i]);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const __m512 out = bias ? _mm512_add_ps(acc[i], bias_v) : acc[i];
        _mm512_mask_storeu_ps(y + (m0 + i) * ldy + c0, mask, out);
      }
    }
  }
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
