// SiLU*mul, rotary embedding and the KV-cache write, compiled once per ISA level (vector code
// or plain loops the compiler vectorises for each level's flags). The scalar references are in
// dispatch.cc.
#include <immintrin.h>

#include <cmath>
#include <cstring>

#include "kernels/cpu/attention_tiles.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

void silu_and_mul(float* out, const float* in, int64_t tokens, int64_t inter) {
  // exp through the vector polynomial (libm's scalar expf was a tenth of a prefill step).
  const int64_t vec_end = inter - inter % kLanes;
  const Vec one = vset1(1.f), zero = vzero();
  for (int64_t t = 0; t < tokens; ++t) {
    const float* g = in + t * 2 * inter;
    const float* u = g + inter;
    float* o = out + t * inter;
    for (int64_t i = 0; i < vec_end; i += kLanes) {
      const Vec gv = vload(g + i);
      const Vec e = vexp(vsub(zero, gv));
      vstore(o + i, vmul(vdiv(gv, vadd(one, e)), vload(u + i)));
    }
    for (int64_t i = vec_end; i < inter; ++i) o[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
}

void rotary(float* x, const int32_t* positions, const float* cos_sin, int64_t tokens,
            int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos_sin + int64_t(positions[t]) * head_dim;
    const float* s = c + half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  }
}

namespace {

// The pair layout (attention_tiles.h): a token's K is whole words (its (d, d + 1) pairs, one per
// pair row, block_size words apart), its V one half of each word of its pair row. V goes by 16-bit
// (masked) stores, never a read-modify-write of a word: the pair's other token may be written by
// another thread at the same time.
void write_kv_cache_pairs(const float* key, const float* value, uint16_t* k_cache, uint16_t* v_cache,
                          const int32_t* slot_mapping, int64_t tokens, int64_t kv_heads, int64_t head_dim,
                          int64_t block_size) {
  const int64_t D = head_dim, bs = block_size;
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    const int64_t block = slot / bs, off = slot % bs;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const float* kr = key + (t * kv_heads + h) * D;
      const float* vr = value + (t * kv_heads + h) * D;
      uint16_t* kb = k_cache + (block * kv_heads + h) * bs * D + off * 2;
      uint16_t* vb = v_cache + (block * kv_heads + h) * bs * D + (off / 2) * D * 2;
#if defined(__AVX512BF16__)  // 16 values per rounding instruction (the same rounding, nearest even)
      const __mmask32 v_half = off % 2 ? 0xAAAAAAAAu : 0x55555555u;
      for (int64_t d = 0; d < D; d += 16) {
        alignas(32) uint32_t k16[8];
        _mm256_store_si256(reinterpret_cast<__m256i*>(k16), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(kr + d)));
        for (int64_t i = 0; i < 8; ++i) std::memcpy(kb + (d / 2 + i) * bs * 2, k16 + i, 4);
        const __m512i v32 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(vr + d)));
        _mm512_mask_storeu_epi16(vb + d * 2, v_half, off % 2 ? _mm512_slli_epi32(v32, 16) : v32);
      }
#else
      for (int64_t d = 0; d < D; ++d) {
        kb[(d / 2) * bs * 2 + d % 2] = bf16_round(kr[d]);
        vb[d * 2 + off % 2] = bf16_round(vr[d]);
      }
#endif
    }
  }
}

}  // namespace

void write_kv_cache(const float* key, const float* value, void* k_cache, void* v_cache,
                    bool cache_bf16, const int32_t* slot_mapping, int64_t tokens, int64_t kv_heads,
                    int64_t head_dim, int64_t block_size) {
  if (kv_pair_layout(cache_bf16, head_dim, block_size))
    return write_kv_cache_pairs(key, value, static_cast<uint16_t*>(k_cache), static_cast<uint16_t*>(v_cache),
                                slot_mapping, tokens, kv_heads, head_dim, block_size);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slot_mapping[t];
    if (slot < 0) continue;
    const int64_t block = slot / block_size, off = slot % block_size;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t src = (t * kv_heads + h) * head_dim;
      const int64_t dst = ((block * kv_heads + h) * block_size + off) * head_dim;
      if (cache_bf16) {
        auto* kc = static_cast<uint16_t*>(k_cache) + dst;
        auto* vc = static_cast<uint16_t*>(v_cache) + dst;
        for (int64_t i = 0; i < head_dim; ++i) {
          kc[i] = bf16_round(key[src + i]);
          vc[i] = bf16_round(value[src + i]);
        }
      } else {
        std::memcpy(static_cast<float*>(k_cache) + dst, key + src, head_dim * sizeof(float));
        std::memcpy(static_cast<float*>(v_cache) + dst, value + src, head_dim * sizeof(float));
      }
    }
  }
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
