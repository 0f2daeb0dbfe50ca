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
// Tiles of at most this many rows (a decode's heads of one KV head) run attend_few (measured
// with bench_attention on AVX-512, 64 decodes of 320 positions: 3 rows per KV head 1.6x faster
// than attend_tile, 8 rows ~10 % slower).
constexpr int kFewRows = 4;
// Key groups whose scores attend_few computes together: independent FMA chains to fill the
// pipeline (one group's are only `rows` chains of head_dim dependent FMAs).
constexpr int kFewGroups = 4;

// Per-thread tile scratch: Q^T and O^T ([d][lane]), the group's K and V widened ([key][d]), P
// ([key][lane]); attend_few keeps Q and O as [row][d], and K^T ([group][d][key]) and V for
// kFewGroups groups. Used as head_dim packs it, so a small head keeps what it uses in L1.
struct TileScratch {
  alignas(64) float qt[kMaxHeadDim * kLanes];
  alignas(64) float ot[kMaxHeadDim * kLanes];
  alignas(64) float kw[kFewGroups * kLanes * kMaxHeadDim];
  alignas(64) float vw[kFewGroups * kLanes * kMaxHeadDim];
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
    l = opaque(vmul(l, corr));
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

// A tile of few rows with the keys in lanes instead (K transposed as it is widened): per row, a
// vector of scores per key group, O a row of vectors. Bit for bit attend_tile's arithmetic: each
// score the same FMA chain over d in order, the same vexp for each P and rescale factor, l and
// each output summed over the keys in the same order, the same steps past a row's position
// skipped. At 3 rows (a SmolLM2 decode) it does ~40 % of attend_tile's work, which would
// compute 13 empty lanes. Needs head_dim % kLanes == 0. q holds the rows' scaled queries [row][d].
template <int HD, class KV>
void attend_few(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, float* const (&outs)[kLanes],
                const float (&posf)[kLanes], int nt, int64_t max_pos, TileScratch& t) {
  const int64_t D = HD > 0 ? HD : a.head_dim, bs = a.block_size, nkv = a.num_kv_heads;
  const KV* kc = static_cast<const KV*>(a.k_cache);
  const KV* vc = static_cast<const KV*>(a.v_cache);
  const float* q = t.qt;  // [row][d]
  float* o = t.ot;        // [row][d]
  float m[kFewRows], l[kFewRows];
  for (int i = 0; i < nt; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
    std::fill(o + i * D, o + (i + 1) * D, 0.f);
  }
  const Vec lane = vload(kLaneIndex);
  for (int64_t g0 = 0; g0 <= max_pos; g0 += kFewGroups * kLanes) {
    const int groups = int(std::min<int64_t>(kFewGroups, (max_pos - g0) / kLanes + 1));
    // K^T of each group ([group][d][key]; keys past max_pos zero) and V ([group][key][d]).
    for (int g = 0; g < groups; ++g) {
      const int64_t p0 = g0 + g * kLanes;
      const int ng = int(std::min<int64_t>(kLanes, max_pos - p0 + 1));
      int64_t off[kLanes];
      for (int j = 0; j < ng; ++j) off[j] = ((int64_t(bt[(p0 + j) / bs]) * nkv + kvh) * bs + (p0 + j) % bs) * D;
      float* kt = t.kw + g * D * kLanes;
      for (int64_t d0 = 0; d0 < D; d0 += kLanes) {
        Vec r[kLanes];
#pragma GCC unroll 16
        for (int j = 0; j < kLanes; ++j) r[j] = j < ng ? vload_as_f32(kc + off[j] + d0) : vzero();
        vtranspose(r);
#pragma GCC unroll 16
        for (int j = 0; j < kLanes; ++j) vstore(kt + (d0 + j) * kLanes, r[j]);
      }
      float* vw = t.vw + g * kLanes * D;
      for (int j = 0; j < ng; ++j)
        for (int64_t d = 0; d < D; d += kLanes) vstore(vw + j * D + d, vload_as_f32(vc + off[j] + d));
    }
    for (int i = 0; i < nt; ++i) {
      if (posf[i] < float(g0)) continue;  // every key of this pass lies past the row
      // Scores of all the pass's groups first: independent chains (they do not depend on the
      // softmax state), then the groups' softmax and P . V in order.
      Vec s[kFewGroups];
      for (int g = 0; g < kFewGroups; ++g) s[g] = vzero();
      const float* qi = q + i * D;
      for (int64_t d = 0; d < D; ++d) {
        const Vec qd = vset1(qi[d]);
#pragma GCC unroll 4
        for (int g = 0; g < kFewGroups; ++g)
          if (g < groups) s[g] = vfma(qd, vload(t.kw + (g * D + d) * kLanes), s[g]);
      }
      float* oi = o + i * D;
      for (int g = 0; g < groups; ++g) {
        const int64_t p0 = g0 + g * kLanes;
        if (posf[i] < float(p0)) break;
        const Vec valid = vsub(vset1(posf[i] - float(p0)), lane);  // >= 0 where key p0 + j counts
        const Vec sg = vselect_ge(valid, vzero(), s[g], vset1(-INFINITY));
        const float m_new = std::max(m[i], vmax_all(sg));
        alignas(64) float pr[kLanes];
        vstore(pr, vselect_ge(valid, vzero(), vexp(vsub(sg, vset1(m_new))), vzero()));
        const Vec corr = vexp(vset1(m[i] - m_new));
        float li = opaque(l[i] * vfirst(corr));
        const int nk = int(std::min<float>(float(kLanes), posf[i] - float(p0) + 1.f));
        for (int j = 0; j < nk; ++j) li += pr[j];
        l[i] = li;
        m[i] = m_new;
        const float* vw = t.vw + g * kLanes * D;
        for (int64_t d = 0; d < D; d += kLanes) {
          Vec acc = vmul(vload(oi + d), corr);
          for (int j = 0; j < nk; ++j) acc = vfma(vset1(pr[j]), vload(vw + j * D + d), acc);
          vstore(oi + d, acc);
        }
      }
    }
  }
  for (int i = 0; i < nt; ++i) {
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (int64_t d = 0; d < D; ++d) outs[i][d] = o[i * D + d] * inv;
  }
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
        const bool few = n_rows - t0 <= kFewRows && D % kLanes == 0;
        float* outs[kLanes] = {};
        alignas(64) float posf[kLanes];
        int64_t max_pos = 0;
        for (int i = 0; i < kLanes; ++i) {
          if (t0 + i >= n_rows) {  // an empty lane: before every key, never written out
            posf[i] = -1.f;
            if (!few)
              for (int64_t d = 0; d < D; ++d) t.qt[d * kLanes + i] = 0.f;
            continue;
          }
          const int64_t r = (t0 + i) / group, h = kvh * group + (t0 + i) % group;
          const float* q = a.q + ((r0 + r) * a.num_q_heads + h) * D;
          for (int64_t d = 0; d < D; ++d) t.qt[few ? i * D + d : d * kLanes + i] = q[d] * a.scale;
          outs[i] = a.out + ((r0 + r) * a.num_q_heads + h) * D;
          posf[i] = float(ctx - q_len + r);
          max_pos = std::max(max_pos, ctx - q_len + r);
        }
        if (few) attend_few<HD, KV>(a, bt, kvh, outs, posf, int(n_rows - t0), max_pos, t);
        else attend_tile<HD, KV>(a, bt, kvh, outs, posf, max_pos, t);
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
