// Vector helpers for the per-ISA kernel sources: the widest float vector the compile flags of
// this object allow (AVX-512: 16 lanes, else AVX2: 8). Include only from files compiled through
// flashpage_add_isa_kernels, inside their FLASHPAGE_ISA namespace.
#pragma once

#include <immintrin.h>

#include <cstdint>

// Inside the ISA's namespace: the AVX2 and AVX-512 objects each get their own definitions
// (same names, different vector types), which the one-definition rule requires.
namespace flashpage::cpu::FLASHPAGE_ISA {

// Software prefetches GCC cannot drop. __builtin_prefetch has no side effects, so GCC's IPA
// deems a function or lambda that only prefetches const and deletes the calls to it: every
// prefetch of the AMX attention's prefetch-ahead lambda was gone from the object (GCC 12, -O2).
// Every kernel's prefetch-only helper goes through these, inlined or not.
inline void prefetch_l1(const void* p) { asm volatile("prefetcht0 %0" : : "m"(*static_cast<const char*>(p))); }
inline void prefetch_l2(const void* p) { asm volatile("prefetcht1 %0" : : "m"(*static_cast<const char*>(p))); }

#if defined(__AVX512F__)
using Vec = __m512;
constexpr int kLanes = 16;
inline Vec vload(const float* p) { return _mm512_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm512_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm512_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm512_mul_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm512_sub_ps(a, b); }
inline Vec vdiv(Vec a, Vec b) { return _mm512_div_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm512_fmadd_ps(a, b, c); }
inline Vec vset1(float x) { return _mm512_set1_ps(x); }
inline Vec vzero() { return _mm512_setzero_ps(); }
// Stores lanes [0, n) of v.
inline void vstore_first(float* p, Vec v, int n) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), v);
}
// kLanes bf16 values (raw uint16) widened to fp32.
inline Vec vload_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
// kLanes 32-bit words of bf16 pairs (raw uint16 at p: element 2i low, 2i + 1 high), widened:
// `lo` the even elements, `hi` the odd ones, lane i from word i. A shift and a mask, no shuffle.
inline void vload_bf16_pairs(const uint16_t* p, Vec& lo, Vec& hi) {
  const __m512i w = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  hi = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(int(0xFFFF0000u))));
}
// GCC 12 warns (-Wuninitialized) on inlined intrinsics built on _mm512_undefined_ps (the
// 512-to-256 casts, shuffle_f32x4, permute_ps); their zero-masked forms with a full mask are
// the same instructions without that.
template <int imm>
inline Vec vshuf128(Vec a, Vec b) { return _mm512_maskz_shuffle_f32x4(__mmask16(0xffff), a, b, imm); }
template <int imm>
inline Vec vpermute(Vec a) { return _mm512_maskz_permute_ps(__mmask16(0xffff), a, imm); }
// Lanes summed as a halving tree: lane i + lane i+8, then i + i+4, i + i+2, i + i+1 (written
// out rather than _mm512_reduce_add_ps, whose order is the compiler's: a fixed order keeps the
// kernels that use it batch-invariant).
inline float vsum(Vec v) {
  v = _mm512_add_ps(v, vshuf128<0x4e>(v, v));
  v = _mm512_add_ps(v, vshuf128<0xb1>(v, v));
  v = _mm512_add_ps(v, vpermute<0x4e>(v));
  v = _mm512_add_ps(v, vpermute<0xb1>(v));
  return _mm512_cvtss_f32(v);
}
// In-place transpose of kLanes x kLanes floats held as kLanes row vectors (always inlined: as a
// call, the rows would go through memory).
__attribute__((always_inline)) inline void vtranspose(Vec (&r)[kLanes]) {
  Vec t[kLanes];
#pragma GCC unroll 16
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  auto lo = [](Vec a, Vec b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  auto hi = [](Vec a, Vec b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
#pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {
    r[4 * i] = lo(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4a + c]: 128-bit lane l holds rows 4a..4a+3 of column 4l + c.
#pragma GCC unroll 16
  for (int c = 0; c < 4; ++c) {
    t[c] = vshuf128<0x88>(r[c], r[4 + c]);
    t[4 + c] = vshuf128<0xdd>(r[c], r[4 + c]);
    t[8 + c] = vshuf128<0x88>(r[8 + c], r[12 + c]);
    t[12 + c] = vshuf128<0xdd>(r[8 + c], r[12 + c]);
  }
#pragma GCC unroll 16
  for (int c = 0; c < 4; ++c) {
    r[c] = vshuf128<0x88>(t[c], t[8 + c]);
    r[8 + c] = vshuf128<0xdd>(t[c], t[8 + c]);
    r[4 + c] = vshuf128<0x88>(t[4 + c], t[12 + c]);
    r[12 + c] = vshuf128<0xdd>(t[4 + c], t[12 + c]);
  }
}
#else
using Vec = __m256;
constexpr int kLanes = 8;
inline Vec vload(const float* p) { return _mm256_loadu_ps(p); }
inline void vstore(float* p, Vec v) { _mm256_storeu_ps(p, v); }
inline Vec vadd(Vec a, Vec b) { return _mm256_add_ps(a, b); }
inline Vec vmul(Vec a, Vec b) { return _mm256_mul_ps(a, b); }
inline Vec vsub(Vec a, Vec b) { return _mm256_sub_ps(a, b); }
inline Vec vdiv(Vec a, Vec b) { return _mm256_div_ps(a, b); }
inline Vec vfma(Vec a, Vec b, Vec c) { return _mm256_fmadd_ps(a, b, c); }
inline Vec vset1(float x) { return _mm256_set1_ps(x); }
inline Vec vzero() { return _mm256_setzero_ps(); }
inline void vstore_first(float* p, Vec v, int n) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane), v);
}
inline Vec vload_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(
      _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline void vload_bf16_pairs(const uint16_t* p, Vec& lo, Vec& hi) {
  const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  hi = _mm256_castsi256_ps(_mm256_and_si256(w, _mm256_set1_epi32(int(0xFFFF0000u))));
}
// The same halving tree: lane i + lane i+4, then i + i+2, then i + i+1.
inline float vsum(Vec v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
__attribute__((always_inline)) inline void vtranspose(Vec (&r)[kLanes]) {
  Vec t[kLanes];
#pragma GCC unroll 16
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  auto lo = [](Vec a, Vec b) {
    return _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
  };
  auto hi = [](Vec a, Vec b) {
    return _mm256_castpd_ps(_mm256_unpackhi_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
  };
#pragma GCC unroll 16
  for (int i = 0; i < 2; ++i) {
    r[4 * i] = lo(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
  }
  // r[4a + c]: 128-bit lane l holds rows 4a..4a+3 of column 4l + c.
#pragma GCC unroll 16
  for (int c = 0; c < 4; ++c) {
    t[c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x20);
    t[4 + c] = _mm256_permute2f128_ps(r[c], r[4 + c], 0x31);
  }
#pragma GCC unroll 16
  for (int c = 0; c < 8; ++c) r[c] = t[c];
}
#endif

// kLanes elements of an fp32 array, or of a bf16 one held as raw uint16, as fp32; and one.
template <class T>
inline Vec vload_as_f32(const T* p) {
  if constexpr (sizeof(T) == 2) return vload_bf16(reinterpret_cast<const uint16_t*>(p));
  else return vload(p);
}
// Stores kLanes fp32 values as T; for bf16 by truncation, exact for values that are
// bf16-representable (which is all this is used for: weights widened from bf16).
template <class T>
inline void vstore_as(T* p, Vec v) {
  if constexpr (sizeof(T) == 2) {
#if defined(__AVX512F__)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
#else
    const __m256i h = _mm256_srli_epi32(_mm256_castps_si256(v), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(h, h), 0x08);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
#endif
  } else {
    vstore(p, v);
  }
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

// Horizontal max, lane fills, and exp for softmax and SiLU.
#if defined(__AVX512F__)
inline float vmax_all(Vec v) { return _mm512_reduce_max_ps(v); }
// Lanes [n, kLanes) set to x.
inline Vec vfill_from(Vec v, int n, float x) {
  return _mm512_mask_blend_ps(static_cast<__mmask16>(~((1u << n) - 1)), v, _mm512_set1_ps(x));
}
inline Vec vround(Vec x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vpow2_times(Vec y, Vec n) { return _mm512_scalef_ps(y, n); }
inline Vec vmax(Vec a, Vec b) { return _mm512_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm512_min_ps(a, b); }
inline float vfirst(Vec v) { return _mm512_cvtss_f32(v); }
// Lane by lane: a >= b ? x : y.
inline Vec vselect_ge(Vec a, Vec b, Vec x, Vec y) { return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, b, _CMP_GE_OQ), y, x); }
#else
inline float vmax_all(Vec v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  return _mm_cvtss_f32(m);
}
inline Vec vfill_from(Vec v, int n, float x) {
  const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const Vec keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
  return _mm256_blendv_ps(_mm256_set1_ps(x), v, keep);
}
inline Vec vround(Vec x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline Vec vpow2_times(Vec y, Vec n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}
inline Vec vmax(Vec a, Vec b) { return _mm256_max_ps(a, b); }
inline Vec vmin(Vec a, Vec b) { return _mm256_min_ps(a, b); }
inline float vfirst(Vec v) { return _mm256_cvtss_f32(v); }
inline Vec vselect_ge(Vec a, Vec b, Vec x, Vec y) { return _mm256_blendv_ps(y, x, _mm256_cmp_ps(a, b, _CMP_GE_OQ)); }
#endif

// v, hidden from the optimiser: a product passed through it is never fused with a later add
// (GCC contracts a * b + c into an FMA where it sees one, so two code shapes of the same
// arithmetic could round differently).
template <class T>
inline T opaque(T v) {
  asm("" : "+v"(v));
  return v;
}

// 0, 1, ..., kLanes - 1 (the first kLanes of them).
alignas(64) inline constexpr float kLaneIndex[16] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// exp(x) (Cephes' expf polynomial, ~1 ulp) for x in [-87.3, 88.7]; below, ~1e-38 rather than 0;
// above, +inf (2^128).
inline Vec vexp(Vec x) {
  x = vmin(vmax(x, vset1(-87.33654f)), vset1(88.72283f));
  const Vec n = vround(vmul(x, vset1(1.44269504088896341f)));
  x = vfma(n, vset1(-0.693359375f), x);
  x = vfma(n, vset1(2.12194440e-4f), x);
  Vec y = vset1(1.9875691500e-4f);
  y = vfma(y, x, vset1(1.3981999507e-3f));
  y = vfma(y, x, vset1(8.3334519073e-3f));
  y = vfma(y, x, vset1(4.1665795894e-2f));
  y = vfma(y, x, vset1(1.6666665459e-1f));
  y = vfma(y, x, vset1(5.0000001201e-1f));
  y = vfma(vmul(y, x), x, vadd(x, vset1(1.f)));
  return vpow2_times(y, n);
}

// exp(x) for x <= 0, to ~3e-6 relative: 2^(x log2 e) as 2^n times a degree-5 polynomial of 2^f,
// |f| <= 1/2 — for softmax probabilities that go to a product in bf16 (2^-9 relative), where the
// full-precision exp's extra terms buy nothing. Below -87 (-inf included) ~1e-38, a normal float
// (no denormal slow path; the callers mask what must be 0); 0 gives exactly 1.
inline Vec vexp_nonpositive(Vec x) {
  const Vec t = vmul(vmax(x, vset1(-87.f)), vset1(1.44269504088896341f));
  const Vec n = vround(t);
  const Vec f = vsub(t, n);
  Vec y = vset1(1.3333558146e-3f);  // ln2^5 / 120 ... ln2, 1: the Taylor series of 2^f
  y = vfma(y, f, vset1(9.6181291076e-3f));
  y = vfma(y, f, vset1(5.5504108665e-2f));
  y = vfma(y, f, vset1(2.4022650696e-1f));
  y = vfma(y, f, vset1(6.9314718056e-1f));
  y = vfma(y, f, vset1(1.f));
  return vpow2_times(y, n);
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
