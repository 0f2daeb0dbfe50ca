// Paged attention over the flattened batch (see PagedAttentionArgs), compiled once per ISA
// level. One pass over the keys with an online softmax; vectorised over the head dimension.
#include <cmath>
#include <stdexcept>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {

constexpr int64_t kMaxHeadDim = 512;

template <class KV>
void attend(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  const int64_t D = a.head_dim, bs = a.block_size;
  const int64_t group = a.num_q_heads / a.num_kv_heads;
  const int64_t vec_end = D - D % kLanes;
  const KV* kc = static_cast<const KV*>(a.k_cache);
  const KV* vc = static_cast<const KV*>(a.v_cache);
  alignas(64) float acc[kMaxHeadDim];
  alignas(64) float qs[kMaxHeadDim];
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    const int64_t r0 = a.query_start_loc[s], r1 = a.query_start_loc[s + 1];
    const int64_t ctx = a.context_lens[s];
    const int32_t* bt = a.block_tables + s * a.block_table_stride;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t pos = ctx - (r1 - r0) + (r - r0);
      const int64_t h_end = (a.kv_head_end > 0 ? a.kv_head_end : a.num_kv_heads) * group;
      for (int64_t h = a.kv_head_begin * group; h < h_end; ++h) {
        const int64_t kvh = h / group;
        const float* q = a.q + (r * a.num_q_heads + h) * D;
        for (int64_t i = 0; i < D; ++i) {
          qs[i] = q[i] * a.scale;
          acc[i] = 0.f;
        }
        float m = -INFINITY, l = 0.f;
        for (int64_t p = 0; p <= pos; ++p) {
          const int64_t row = ((int64_t(bt[p / bs]) * a.num_kv_heads + kvh) * bs + p % bs) * D;
          const KV* k = kc + row;
          Vec dv = vzero();
          for (int64_t i = 0; i < vec_end; i += kLanes) dv = vfma(vload(qs + i), vload_as_f32(k + i), dv);
          float dot = vsum(dv);
          for (int64_t i = vec_end; i < D; ++i) dot += qs[i] * scalar_as_f32(k + i);
          const KV* v = vc + row;
          if (dot > m) {  // new maximum: rescale what was accumulated
            const float corr = std::exp(m - dot);
            l *= corr;
            const Vec vc_ = vset1(corr);
            for (int64_t i = 0; i < vec_end; i += kLanes) vstore(acc + i, vmul(vload(acc + i), vc_));
            for (int64_t i = vec_end; i < D; ++i) acc[i] *= corr;
            m = dot;
          }
          const float w = std::exp(dot - m);
          l += w;
          const Vec wv = vset1(w);
          for (int64_t i = 0; i < vec_end; i += kLanes) vstore(acc + i, vfma(wv, vload_as_f32(v + i), vload(acc + i)));
          for (int64_t i = vec_end; i < D; ++i) acc[i] += w * scalar_as_f32(v + i);
        }
        float* out = a.out + (r * a.num_q_heads + h) * D;
        const float inv = l > 0.f ? 1.f / l : 0.f;
        for (int64_t i = 0; i < D; ++i) out[i] = acc[i] * inv;
      }
    }
  }
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  if (a.head_dim > kMaxHeadDim)
    throw std::invalid_argument("paged_attention: head_dim " + std::to_string(a.head_dim) +
                                " exceeds " + std::to_string(kMaxHeadDim));
  if (a.kv_bf16) attend<uint16_t>(a, seq_begin, seq_end);
  else attend<float>(a, seq_begin, seq_end);
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
