// RMSNorm (+ fused residual add), compiled once per ISA level (see cmake/flashpage_isa.cmake).
#include <immintrin.h>

#include <cmath>

#include "kernels/cpu/kernels.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vzero() { return _mm512_setzero_ps(); }
inline float vsum(Vec v) { return _mm512_reduce_add_ps(v); }
#else
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

void rms_norm(float* out, const float* x, float* residual, const float* weight, int64_t rows,
              int64_t dim, float eps) {
  const int64_t vec_end = dim - dim % kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* res = residual ? residual + r * dim : nullptr;
    const float* src = res ? res : xr;
    float* o = out + r * dim;
    Vec acc = vzero();
    float tail = 0;
    for (int64_t i = 0; i < vec_end; i += kLanes) {
      Vec v = vload(xr + i);
      if (res) {
        v = vadd(v, vload(res + i));
        vstore(res + i, v);
      }
      acc = vfma(v, v, acc);
    }
    for (int64_t i = vec_end; i < dim; ++i) {
      const float v = res ? (res[i] += xr[i]) : xr[i];
      tail += v * v;
    }
    const float scale = 1.0f / std::sqrt((vsum(acc) + tail) / static_cast<float>(dim) + eps);
    const Vec vs = vset1(scale);
    for (int64_t i = 0; i < vec_end; i += kLanes)
      vstore(o + i, vmul(vmul(vload(src + i), vs), vload(weight + i)));
    for (int64_t i = vec_end; i < dim; ++i) o[i] = src[i] * scale * weight[i];
  }
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
