// Vector helpers for the per-ISA kernel sources: the widest float vector the compile flags of
// this object allow (AVX-512: 16 lanes, else AVX2: 8). Include only from files compiled through
// flashpage_add_isa_kernels, inside their FLASHPAGE_ISA namespace.
#pragma once

#include <immintrin.h>

#include <cstdint>

// Inside the ISA's namespace: the AVX2 and AVX-512 objects each get their own definitions
// (same names, different vector types), which the one-definition rule requires.
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
// kLanes bf16 values (raw uint16) widened to fp32.
inline Vec vload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
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
inline Vec vload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
#endif

// kLanes elements of an fp32 array, or of a bf16 one held as raw uint16, as fp32; and one.
template <class T>
inline Vec vload_as_f32(const T* p) {
  if constexpr (sizeof(T) == 2) return vload_bf16(reinterpret_cast<const uint16_t*>(p));
  else return vload(p);
}
template <class T>
inline float scalar_as_f32(const T* p) {
  if constexpr (sizeof(T) == 2) {
    const uint32_t bits = uint32_t(*reinterpret_cast<const uint16_t*>(p)) << 16;
    float f;
    __builtin_memcpy(&f, &bits, 4);
    return f;
  } else {
    return *p;
  }
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
