// Paged attention over the flattened batch (see PagedAttentionArgs), compiled once per ISA
// level: flash attention with the query rows in vector lanes. A tile is up to kLanes query rows
// of one KV head (query positions x the heads of its GQA group), one per lane; keys come kLanes
// positions at a time, widened to fp32 once for the whole tile. Then S = Q . K^T is kLanes
// vectors (one per key, the rows in lanes: each an FMA chain over head_dim of a query vector and
// a broadcast key value), the online softmax is lane by lane (no horizontal reductions), and
// O += P . V runs on O^T (one vector of rows per d) with broadcast values. Both products are
// plain broadcast-FMA GEMMs, ~4x the FLOP rate of dot products reduced by transposes (what this
// kernel did before: attention was 33 % of a 1,024-token SmolLM2 prefill on AVX-512 at 14 % of
// the FLOPs).
//
// A row's arithmetic depends only on that row: every step is lane by lane, its key groups start
// at position 0, and a group reaching past a row's position leaves it bit for bit as it was
// (its scores masked to -inf, its P to 0, its rescale factor to 1). So results do not depend on
// the tile, the other rows or the batch.
#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cpu/attention_tiles.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {

constexpr int64_t kMaxHeadDim = 512;
// O^T vectors per pass of P . V: accumulators + a P vector in the register file.
constexpr int kOutChunk = kLanes == 16 ? 16 : 8;

// Per-thread tile scratch: Q^T and O^T ([d][lane]), the group's K and V widened ([key][d]), P
// ([key][lane]). Sized by head_dim, so a small head keeps all of it in L1.
struct TileScratch {
  alignas(64) float qt[kMaxHeadDim * kLanes];
  alignas(64) float ot[kMaxHeadDim * kLanes];
  alignas(64) float kw[kLanes * kMaxHeadDim];
  alignas(64) float vw[kLanes * kMaxHeadDim];
  alignas(64) float p[kLanes * kLanes];
};

// One tile. HD is the head dim when known at compile time (0: a.head_dim), so that the
// broadcasts of the widened keys are fixed offsets from one pointer.
template <int HD, class KV>
void attend_tile(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, float* const (&outs)[kLanes],
                 const float (&posf)[kLanes], int64_t max_pos, TileScratch& t) {
  const int64_t D = HD > 0 ? HD : a.head_dim, bs = a.block_size, nkv = a.num_kv_heads;
  const KV* kc = static_cast<const KV*>(a.k_cache);
  const KV* vc = static_cast<const KV*>(a.v_cache);
  const Vec pos = vload(posf), neg_inf = vset1(-INFINITY), one = vset1(1.f);
  for (int64_t d = 0; d < D; ++d) vstore(t.ot + d * kLanes, vzero());
  Vec m = neg_inf, l = vzero();
  for (int64_t p0 = 0; p0 <= max_pos; p0 += kLanes) {
    const int ng = int(std::min<int64_t>(kLanes, max_pos - p0 + 1));
    for (int j = 0; j < kLanes; ++j) {
      float* kj = t.kw + j * D;
      float* vj = t.vw + j * D;
      if (j >= ng) {  // past every row: finite zeros, masked below
        std::fill(kj, kj + D, 0.f);
        continue;
      }
      const int64_t pj = p0 + j, off = ((int64_t(bt[pj / bs]) * nkv + kvh) * bs + pj % bs) * D;
      int64_t d = 0;
      for (; d + kLanes <= D; d += kLanes) {
        vstore(kj + d, vload_as_f32(kc + off + d));
        vstore(vj + d, vload_as_f32(vc + off + d));
      }
      for (; d < D; ++d) {
        kj[d] = scalar_as_f32(kc + off + d);
        vj[d] = scalar_as_f32(vc + off + d);
      }
    }
    // S^T: one vector per key, the rows in lanes.
    Vec s[kLanes];
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) s[j] = vzero();
    for (int64_t d = 0; d < D; ++d) {
      const Vec q = vload(t.qt + d * kLanes);
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) s[j] = vfma(q, vset1(t.kw[j * D + d]), s[j]);
    }
    // Online softmax, lane by lane; key j counts for rows at positions >= p0 + j.
    Vec gmax = neg_inf;
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) {
      s[j] = vselect_ge(pos, vset1(float(p0 + j)), s[j], neg_inf);
      gmax = vmax(gmax, s[j]);
    }
    const Vec m_new = vmax(m, gmax);
    const Vec corr = vselect_ge(pos, vset1(float(p0)), vexp(vsub(m, m_new)), one);
    l = vmul(l, corr);
    for (int j = 0; j < ng; ++j) {
      const Vec pj = vselect_ge(pos, vset1(float(p0 + j)), vexp(vsub(s[j], m_new)), vzero());
      l = vadd(l, pj);
      vstore(t.p + j * kLanes, pj);
    }
    m = m_new;
    // O^T = O^T * corr + (P . V)^T, kOutChunk vectors of it at a time.
    for (int64_t d0 = 0; d0 < D; d0 += kOutChunk) {
      const int nc = int(std::min<int64_t>(kOutChunk, D - d0));
      float* o = t.ot + d0 * kLanes;
      if (nc == kOutChunk) {
        Vec acc[kOutChunk];
#pragma GCC unroll 16
        for (int c = 0; c < kOutChunk; ++c) acc[c] = vmul(vload(o + c * kLanes), corr);
        for (int j = 0; j < ng; ++j) {
          const Vec pj = vload(t.p + j * kLanes);
          const float* v = t.vw + j * D + d0;
#pragma GCC unroll 16
          for (int c = 0; c < kOutChunk; ++c) acc[c] = vfma(pj, vset1(v[c]), acc[c]);
        }
#pragma GCC unroll 16
        for (int c = 0; c < kOutChunk; ++c) vstore(o + c * kLanes, acc[c]);
      } else {  // head_dim not a multiple of kOutChunk: the rest a vector at a time
        for (int c = 0; c < nc; ++c) {
          Vec acc = vmul(vload(o + c * kLanes), corr);
          for (int j = 0; j < ng; ++j) acc = vfma(vload(t.p + j * kLanes), vset1(t.vw[j * D + d0 + c]), acc);
          vstore(o + c * kLanes, acc);
        }
      }
    }
  }
  alignas(64) float inv[kLanes];
  vstore(inv, vselect_ge(vzero(), l, vzero(), vdiv(one, l)));  // l > 0 ? 1 / l : 0
  for (int i = 0; i < kLanes && outs[i]; ++i)
    for (int64_t d = 0; d < D; ++d) outs[i][d] = t.ot[d * kLanes + i] * inv[i];
}

template <int HD, class KV>
void attend(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  const int64_t D = HD > 0 ? HD : a.head_dim, nkv = a.num_kv_heads, group = a.num_q_heads / nkv;
  thread_local TileScratch t;
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    const int64_t r0 = a.query_start_loc[s], q_len = a.query_start_loc[s + 1] - r0;
    const int64_t ctx = a.context_lens[s];
    const int32_t* bt = a.block_tables + s * a.block_table_stride;
    const int64_t kv_end = a.kv_head_end > 0 ? a.kv_head_end : nkv;
    const int64_t n_rows = a.row_end > 0 ? std::min(a.row_end, q_len * group) : q_len * group;
    for (int64_t kvh = a.kv_head_begin; kvh < kv_end; ++kvh) {
      for (int64_t t0 = a.row_begin; t0 < n_rows; t0 += kLanes) {
        float* outs[kLanes] = {};
        alignas(64) float posf[kLanes];
        int64_t max_pos = 0;
        for (int i = 0; i < kLanes; ++i) {
          if (t0 + i >= n_rows) {  // an empty lane: before every key, never written out
            posf[i] = -1.f;
            for (int64_t d = 0; d < D; ++d) t.qt[d * kLanes + i] = 0.f;
            continue;
          }
          const int64_t r = (t0 + i) / group, h = kvh * group + (t0 + i) % group;
          const float* q = a.q + ((r0 + r) * a.num_q_heads + h) * D;
          for (int64_t d = 0; d < D; ++d) t.qt[d * kLanes + i] = q[d] * a.scale;
          outs[i] = a.out + ((r0 + r) * a.num_q_heads + h) * D;
          posf[i] = float(ctx - q_len + r);
          max_pos = std::max(max_pos, ctx - q_len + r);
        }
        attend_tile<HD, KV>(a, bt, kvh, outs, posf, max_pos, t);
      }
    }
  }
}

template <class KV>
void attend_any(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  if (a.head_dim == 64) attend<64, KV>(a, seq_begin, seq_end);
  else if (a.head_dim == 128) attend<128, KV>(a, seq_begin, seq_end);
  else attend<0, KV>(a, seq_begin, seq_end);
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  if (a.head_dim > kMaxHeadDim)
    throw std::invalid_argument("paged_attention: head_dim " + std::to_string(a.head_dim) +
                                " exceeds " + std::to_string(kMaxHeadDim));
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (kv_tile_layout(a.kv_bf16, a.head_dim, a.block_size)) return paged_attention_tiles(a, seq_begin, seq_end);
#endif
  if (a.kv_bf16) attend_any<uint16_t>(a, seq_begin, seq_end);
  else attend_any<float>(a, seq_begin, seq_end);
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
