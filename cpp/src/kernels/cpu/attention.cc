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
// bf16 caches of the usual shapes are in the pair layout (attention_tiles.h): a load is two rows
// of K^T for kLanes keys, or two keys' rows of V, so decodes (attend_few_pairs) read them where
// they lie, with no transposition (it was most of a decode's attention time).
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
// than one 16-row tile, 8 rows ~10 % slower).
constexpr int kFewRows = 4;
// Key groups whose scores attend_few computes together: independent FMA chains to fill the
// pipeline (one group's are only `rows` chains of head_dim dependent FMAs).
constexpr int kFewGroups = 4;

// Per-thread tile scratch: Q^T and O^T ([tile][d][lane]), the group's K and V widened
// ([key][d]), P ([tile][key][lane]); attend_few keeps Q and O as [row][d], and K^T
// ([group][d][key]) and V for kFewGroups groups. Sized by head_dim, so a small head keeps what
// it uses in L1; one heap buffer per thread for every kernel instance (a thread_local array in
// each template instance was 24 x 386 KB of static TLS, more than a thread's 8 MB stack).
struct TileScratch {
  float *qt, *ot, *kw, *vw, *p;
};
TileScratch tile_scratch(int64_t D) {
  thread_local runtime::AlignedVector<float> buf;
  const int64_t tiles = 2 * D * kLanes, groups = kFewGroups * kLanes * D;
  const size_t need = size_t(2 * tiles + 2 * groups + 2 * kLanes * kLanes);
  if (buf.size() < need) buf.resize(need);
  float* b = buf.data();
  return {b, b + tiles, b + 2 * tiles, b + 2 * tiles + groups, b + 2 * tiles + 2 * groups};
}

// The kLanes keys and values from position p0 (ng of them before max_pos) widened to fp32 into
// the tile scratch: K as [key][d] (keys from ng on zero: finite, masked later), V as [key][d].
template <class KV>
void widen_rows(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, int64_t p0, int ng, int64_t D,
                const TileScratch& t) {
  const KV* kc = static_cast<const KV*>(a.k_cache);
  const KV* vc = static_cast<const KV*>(a.v_cache);
  for (int j = 0; j < kLanes; ++j) {
    float* kj = t.kw + j * D;
    float* vj = t.vw + j * D;
    if (j >= ng) {
      std::fill(kj, kj + D, 0.f);
      continue;
    }
    const int64_t off = kv_row_offset(a, bt, kvh, p0 + j);
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
}

// The pair layout's first word of the kLanes keys from position p0 (p0 % kLanes == 0, so they
// lie in one block and start a pair): K's pair row dp at k + dp * block_size * 2, V's rows of
// keys 2jp and 2jp + 1 at v + jp * head_dim * 2.
struct PairGroup {
  const uint16_t *k, *v;
};
inline PairGroup pair_group(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, int64_t p0) {
  const int64_t base = (int64_t(bt[p0 / a.block_size]) * a.num_kv_heads + kvh) * a.block_size * a.head_dim;
  const int64_t off = p0 % a.block_size;
  return {static_cast<const uint16_t*>(a.k_cache) + base + off * 2,
          static_cast<const uint16_t*>(a.v_cache) + base + off * a.head_dim};
}

// widen_rows from the pair layout, K as K^T ([d][key]) this time: two rows of it per load.
inline void widen_pairs(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, int64_t p0, int ng, int64_t D,
                        const TileScratch& t) {
  const PairGroup g = pair_group(a, bt, kvh, p0);
  const int64_t k_row = a.block_size * 2;
  const Vec live = vsub(vset1(float(ng - 1)), vload(kLaneIndex)), zero = vzero();  // >= 0: j < ng
  for (int64_t dp = 0; dp < D / 2; ++dp) {
    Vec lo, hi;
    vload_bf16_pairs(g.k + dp * k_row, lo, hi);
    vstore(t.kw + 2 * dp * kLanes, vselect_ge(live, zero, lo, zero));
    vstore(t.kw + (2 * dp + 1) * kLanes, vselect_ge(live, zero, hi, zero));
  }
  for (int j = 0; j < ng; j += 2)
    for (int64_t d = 0; d < D; d += kLanes) {
      Vec lo, hi;
      vload_bf16_pairs(g.v + (j / 2 * D + d) * 2, lo, hi);
      vstore(t.vw + j * D + d, lo);
      if (j + 1 < ng) vstore(t.vw + (j + 1) * D + d, hi);
    }
}

// T tiles (1 or 2) of up to kLanes rows each. HD is the head dim when known at compile time
// (0: a.head_dim), so that the broadcasts of the widened keys are fixed offsets from one pointer.
// Pairs: the cache is in the pair layout (attention_tiles.h); the group's keys are widened as
// K^T ([d][key], two rows of it per load) rather than as K ([key][d]).
// Two tiles share each widened key group, and each broadcast key or value then feeds two FMAs:
// one tile's products issue a load per FMA, which the two load ports, not the FMA units, bound.
template <int HD, int T, class KV, bool Pairs>
void attend_tiles(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, float* const (&outs)[2][kLanes],
                  const float (&posf)[2][kLanes], int64_t max_pos, const TileScratch& t) {
  static_assert(T == 1 || T == 2);
  constexpr int kHalf = kLanes / 2, kChunk2 = kOutChunk / 2;
  const int64_t D = HD > 0 ? HD : a.head_dim;
  // Where key j's element d lies in the widened group.
  auto key_at = [](int j, int64_t d, int64_t D) { return Pairs ? d * kLanes + j : j * D + d; };
  const Vec neg_inf = vset1(-INFINITY), one = vset1(1.f);
  Vec pos[T], m[T], l[T], corr[T];
  float* qt[T];
  float* ot[T];
  float* pt[T];
  for (int u = 0; u < T; ++u) {
    pos[u] = vload(posf[u]);
    m[u] = neg_inf;
    l[u] = vzero();
    qt[u] = t.qt + u * D * kLanes;
    ot[u] = t.ot + u * D * kLanes;
    pt[u] = t.p + u * kLanes * kLanes;
    for (int64_t d = 0; d < D; ++d) vstore(ot[u] + d * kLanes, vzero());
  }
  for (int64_t p0 = 0; p0 <= max_pos; p0 += kLanes) {
    const int ng = int(std::min<int64_t>(kLanes, max_pos - p0 + 1));
    if constexpr (Pairs) widen_pairs(a, bt, kvh, p0, ng, D, t);
    else widen_rows<KV>(a, bt, kvh, p0, ng, D, t);
    // S^T: one vector per key, the rows in lanes (each an FMA chain over d).
    Vec s[T][kLanes];
    if constexpr (T == 1) {
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) s[0][j] = vzero();
      for (int64_t d = 0; d < D; ++d) {
        const Vec q = vload(qt[0] + d * kLanes);
#pragma GCC unroll 16
        for (int j = 0; j < kLanes; ++j) s[0][j] = vfma(q, vset1(t.kw[key_at(j, d, D)]), s[0][j]);
      }
    } else {
      for (int h = 0; h < kLanes; h += kHalf) {  // half the keys at a time: 2 x kHalf chains
        Vec s0[kHalf], s1[kHalf];
#pragma GCC unroll 8
        for (int j = 0; j < kHalf; ++j) s0[j] = s1[j] = vzero();
        for (int64_t d = 0; d < D; ++d) {
          const Vec q0 = vload(qt[0] + d * kLanes), q1 = vload(qt[1] + d * kLanes);
#pragma GCC unroll 8
          for (int j = 0; j < kHalf; ++j) {
            const Vec k = vset1(t.kw[key_at(h + j, d, D)]);
            s0[j] = vfma(q0, k, s0[j]);
            s1[j] = vfma(q1, k, s1[j]);
          }
        }
#pragma GCC unroll 8
        for (int j = 0; j < kHalf; ++j) s[0][h + j] = s0[j], s[1][h + j] = s1[j];
      }
    }
    // Online softmax, lane by lane; key j counts for rows at positions >= p0 + j.
    for (int u = 0; u < T; ++u) {
      Vec gmax = neg_inf;
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) {
        s[u][j] = vselect_ge(pos[u], vset1(float(p0 + j)), s[u][j], neg_inf);
        gmax = vmax(gmax, s[u][j]);
      }
      const Vec m_new = vmax(m[u], gmax);
      corr[u] = vselect_ge(pos[u], vset1(float(p0)), vexp(vsub(m[u], m_new)), one);
      l[u] = opaque(vmul(l[u], corr[u]));
      for (int j = 0; j < ng; ++j) {
        const Vec pj = vselect_ge(pos[u], vset1(float(p0 + j)), vexp(vsub(s[u][j], m_new)), vzero());
        l[u] = vadd(l[u], pj);
        vstore(pt[u] + j * kLanes, pj);
      }
      m[u] = m_new;
    }
    // O^T = O^T * corr + (P . V)^T, kOutChunk vectors of it at a time (half as many per tile
    // with two).
    constexpr int kStep = T == 1 ? kOutChunk : kChunk2;
    int64_t d0 = 0;
    for (; d0 + kStep <= D; d0 += kStep) {
      Vec acc[T][kStep];
      for (int u = 0; u < T; ++u)
#pragma GCC unroll 16
        for (int c = 0; c < kStep; ++c) acc[u][c] = vmul(vload(ot[u] + (d0 + c) * kLanes), corr[u]);
      for (int j = 0; j < ng; ++j) {
        Vec pj[T];
        for (int u = 0; u < T; ++u) pj[u] = vload(pt[u] + j * kLanes);
        const float* v = t.vw + j * D + d0;
#pragma GCC unroll 16
        for (int c = 0; c < kStep; ++c) {
          const Vec vv = vset1(v[c]);
          for (int u = 0; u < T; ++u) acc[u][c] = vfma(pj[u], vv, acc[u][c]);
        }
      }
      for (int u = 0; u < T; ++u)
#pragma GCC unroll 16
        for (int c = 0; c < kStep; ++c) vstore(ot[u] + (d0 + c) * kLanes, acc[u][c]);
    }
    if constexpr (HD == 0 || HD % kStep != 0)
      for (; d0 < D; ++d0)  // head_dim not a multiple of kStep: the rest a vector at a time
        for (int u = 0; u < T; ++u) {
          Vec acc = vmul(vload(ot[u] + d0 * kLanes), corr[u]);
          for (int j = 0; j < ng; ++j) acc = vfma(vload(pt[u] + j * kLanes), vset1(t.vw[j * D + d0]), acc);
          vstore(ot[u] + d0 * kLanes, acc);
        }
  }
  for (int u = 0; u < T; ++u) {
    alignas(64) float inv[kLanes];
    vstore(inv, vselect_ge(vzero(), l[u], vzero(), vdiv(one, l[u])));  // l > 0 ? 1 / l : 0
    for (int i = 0; i < kLanes && outs[u][i]; ++i)
      for (int64_t d = 0; d < D; ++d) outs[u][i][d] = ot[u][d * kLanes + i] * inv[i];
  }
}

// One row's online-softmax step over the kLanes keys from p0, the keys in lanes (attend_few and
// attend_few_pairs: one code, so one arithmetic): the row at position pos >= p0 with scores s
// gets P in pr, its running max m and sum l updated, and the keys it takes in nk; returns the
// rescale factor of its output.
inline Vec few_softmax_step(Vec s, float pos, int64_t p0, float& m, float& l, float* pr, int& nk) {
  const Vec valid = vsub(vset1(pos - float(p0)), vload(kLaneIndex));  // >= 0 where key p0 + j counts
  const Vec sg = vselect_ge(valid, vzero(), s, vset1(-INFINITY));
  const float m_new = std::max(m, vmax_all(sg));
  vstore(pr, vselect_ge(valid, vzero(), vexp(vsub(sg, vset1(m_new))), vzero()));
  const Vec corr = vexp(vset1(m - m_new));
  float li = opaque(l * vfirst(corr));
  nk = int(std::min<float>(float(kLanes), pos - float(p0) + 1.f));
  for (int j = 0; j < nk; ++j) li += pr[j];
  l = li;
  m = m_new;
  return corr;
}

// The few-row state of rows [0, n) before their first key: O ([row][d]) zero, max -inf, sum 0.
inline void few_start(float* o, float* m, float* l, int n, int64_t D) {
  for (int i = 0; i < n; ++i) {
    m[i] = -INFINITY;
    l[i] = 0.f;
    std::fill(o + i * D, o + (i + 1) * D, 0.f);
  }
}

// Rows [0, n) of O ([row][d]) divided by their sums into outs.
inline void few_finish(float* const (&outs)[kLanes], const float* o, const float* l, int n, int64_t D) {
  for (int i = 0; i < n; ++i) {
    const float inv = l[i] > 0.f ? 1.f / l[i] : 0.f;
    for (int64_t d = 0; d < D; ++d) outs[i][d] = o[i * D + d] * inv;
  }
}

// A tile of few rows with the keys in lanes instead (K transposed as it is widened): per row, a
// vector of scores per key group, O a row of vectors. Bit for bit attend_tiles' arithmetic: each
// score the same FMA chain over d in order, the same vexp for each P and rescale factor, l and
// each output summed over the keys in the same order, the same steps past a row's position
// skipped. At 3 rows (a SmolLM2 decode) it does ~40 % of attend_tiles' work, which would
// compute 13 empty lanes. Needs head_dim % kLanes == 0. q holds the rows' scaled queries [row][d].
template <int HD, class KV>
void attend_few(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, float* const (&outs)[kLanes],
                const float (&posf)[kLanes], int nt, int64_t max_pos, const TileScratch& t) {
  const int64_t D = HD > 0 ? HD : a.head_dim;
  const KV* kc = static_cast<const KV*>(a.k_cache);
  const KV* vc = static_cast<const KV*>(a.v_cache);
  const float* q = t.qt;  // [row][d]
  float* o = t.ot;        // [row][d]
  float m[kFewRows], l[kFewRows];
  few_start(o, m, l, nt, D);
  for (int64_t g0 = 0; g0 <= max_pos; g0 += kFewGroups * kLanes) {
    const int groups = int(std::min<int64_t>(kFewGroups, (max_pos - g0) / kLanes + 1));
    // K^T of each group ([group][d][key]; keys past max_pos zero) and V ([group][key][d]).
    for (int g = 0; g < groups; ++g) {
      const int64_t p0 = g0 + g * kLanes;
      const int ng = int(std::min<int64_t>(kLanes, max_pos - p0 + 1));
      int64_t off[kLanes];
      for (int j = 0; j < ng; ++j) off[j] = kv_row_offset(a, bt, kvh, p0 + j);
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
        alignas(64) float pr[kLanes];
        int nk;
        const Vec corr = few_softmax_step(s[g], posf[i], p0, m[i], l[i], pr, nk);
        const float* vw = t.vw + g * kLanes * D;
        for (int64_t d = 0; d < D; d += kLanes) {
          Vec acc = vmul(vload(oi + d), corr);
          for (int j = 0; j < nk; ++j) acc = vfma(vset1(pr[j]), vload(vw + j * D + d), acc);
          vstore(oi + d, acc);
        }
      }
    }
  }
  few_finish(outs, o, l, nt, D);
}

// attend_few on the pair layout, NT rows: each group's K and V come straight from the cache and
// are unpacked once for all the rows (a shift and a mask per two rows of K^T or two keys of V:
// no transposition, no scratch copy), and the rows' FMA chains interleave. Bit for bit
// attend_few's arithmetic: every score the same chain over d in order, the same exps, l and each
// output summed over the keys in order, a row's steps past its position skipped.
template <int HD, int NT>
void attend_few_pairs(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, float* const (&outs)[kLanes],
                      const float (&posf)[kLanes], int64_t max_pos, const TileScratch& t) {
  // Groups whose scores accumulate at once, and output vectors per pass of P . V: NT times
  // either in registers, with two more (AVX2 has 16: four rows take two; three take four,
  // without spills and ~5 % faster than two).
  constexpr int kWide = kLanes == 16 || NT <= 3 ? 4 : 2;
  constexpr int kScoreGroups = std::min(kWide, kFewGroups), kPvChunk = kWide;
  const int64_t D = HD > 0 ? HD : a.head_dim, k_row = a.block_size * 2;
  const float* q = t.qt;  // [row][d]
  float* o = t.ot;        // [row][d]
  float m[NT], l[NT];
  few_start(o, m, l, NT, D);
  const Vec one = vset1(1.f);
  for (int64_t g0 = 0; g0 <= max_pos; g0 += kFewGroups * kLanes) {
    const int groups = int(std::min<int64_t>(kFewGroups, (max_pos - g0) / kLanes + 1));
    PairGroup pg[kFewGroups];
    for (int g = 0; g < groups; ++g) pg[g] = pair_group(a, bt, kvh, g0 + g * kLanes);
    // Scores of all the pass's groups first: independent chains.
    Vec s[NT][kFewGroups];
    auto scores = [&]<int G>(int g_first) {
      Vec acc[NT][G];
      for (int i = 0; i < NT; ++i)
        for (int g = 0; g < G; ++g) acc[i][g] = vzero();
      for (int64_t dp = 0; dp < D / 2; ++dp) {
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
          Vec k0, k1;
          vload_bf16_pairs(pg[g_first + g].k + dp * k_row, k0, k1);
          for (int i = 0; i < NT; ++i) acc[i][g] = vfma(vset1(q[i * D + 2 * dp]), k0, acc[i][g]);
          for (int i = 0; i < NT; ++i) acc[i][g] = vfma(vset1(q[i * D + 2 * dp + 1]), k1, acc[i][g]);
        }
      }
      for (int i = 0; i < NT; ++i)
        for (int g = 0; g < G; ++g) s[i][g_first + g] = acc[i][g];
    };
    for (int g = 0; g < groups;) {
      const int left = std::min(kScoreGroups, groups - g), step = left >= 4 ? 4 : left >= 2 ? 2 : 1;
      if (step == 4) scores.template operator()<4>(g);
      else if (step == 2) scores.template operator()<2>(g);
      else scores.template operator()<1>(g);
      g += step;
    }
    for (int g = 0; g < groups; ++g) {
      const int64_t p0 = g0 + g * kLanes;
      // Softmax step of each row: a row before this group keeps its state (rescale 1, no keys).
      alignas(64) float pr[NT][kLanes];
      Vec corr[NT];
      int nk[NT], nk_all = kLanes, nk_any = 0;
      for (int i = 0; i < NT; ++i) {
        corr[i] = one;
        nk[i] = 0;
        if (posf[i] >= float(p0)) corr[i] = few_softmax_step(s[i][g], posf[i], p0, m[i], l[i], pr[i], nk[i]);
        nk_all = std::min(nk_all, nk[i]);
        nk_any = std::max(nk_any, nk[i]);
      }
      // O = O * corr + P . V, kPvChunk vectors of each row at a time.
      const uint16_t* v = pg[g].v;
      auto pv = [&]<int C>(int64_t d0) {
        Vec acc[NT][C];
        for (int i = 0; i < NT; ++i)
          for (int c = 0; c < C; ++c) acc[i][c] = vmul(vload(o + i * D + d0 + c * kLanes), corr[i]);
        int j = 0;
        for (; j + 1 < nk_all; j += 2) {
#pragma GCC unroll 4
          for (int c = 0; c < C; ++c) {
            Vec v0, v1;
            vload_bf16_pairs(v + (j / 2 * D + d0 + c * kLanes) * 2, v0, v1);
            for (int i = 0; i < NT; ++i) acc[i][c] = vfma(vset1(pr[i][j]), v0, acc[i][c]);
            for (int i = 0; i < NT; ++i) acc[i][c] = vfma(vset1(pr[i][j + 1]), v1, acc[i][c]);
          }
        }
        for (; j < nk_any; ++j)  // keys that only some rows take
          for (int c = 0; c < C; ++c) {
            Vec v0, v1;
            vload_bf16_pairs(v + (j / 2 * D + d0 + c * kLanes) * 2, v0, v1);
            const Vec vj = j % 2 ? v1 : v0;
            for (int i = 0; i < NT; ++i)
              if (j < nk[i]) acc[i][c] = vfma(vset1(pr[i][j]), vj, acc[i][c]);
          }
        for (int i = 0; i < NT; ++i)
          for (int c = 0; c < C; ++c) vstore(o + i * D + d0 + c * kLanes, acc[i][c]);
      };
      int64_t d0 = 0;
      for (; d0 + kPvChunk * kLanes <= D; d0 += kPvChunk * kLanes) pv.template operator()<kPvChunk>(d0);
      for (; d0 < D; d0 += kLanes) pv.template operator()<1>(d0);
    }
  }
  few_finish(outs, o, l, NT, D);
}

template <int HD, class KV, bool Pairs>
void attend(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  const int64_t D = HD > 0 ? HD : a.head_dim, nkv = a.num_kv_heads, group = a.num_q_heads / nkv;
  const TileScratch t = tile_scratch(D);
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    const int64_t r0 = a.query_start_loc[s], q_len = a.query_start_loc[s + 1] - r0;
    const int64_t ctx = a.context_lens[s];
    const int32_t* bt = a.block_tables + s * a.block_table_stride;
    const int64_t kv_end = a.kv_head_end > 0 ? a.kv_head_end : nkv;
    const int64_t n_rows = a.row_end > 0 ? std::min(a.row_end, q_len * group) : q_len * group;
    for (int64_t kvh = a.kv_head_begin; kvh < kv_end; ++kvh) {
      for (int64_t t0 = a.row_begin; t0 < n_rows;) {
        const int64_t left = n_rows - t0;
        const bool few = left <= kFewRows && D % kLanes == 0;
        const int tiles = few || left <= kLanes ? 1 : 2;
        float* outs[2][kLanes] = {};
        alignas(64) float posf[2][kLanes];
        int64_t max_pos = 0;
        for (int u = 0; u < tiles; ++u) {
          float* qt = t.qt + u * D * kLanes;
          for (int i = 0; i < kLanes; ++i) {
            const int64_t row = t0 + u * kLanes + i;
            if (row >= n_rows) {  // an empty lane: before every key, never written out
              posf[u][i] = -1.f;
              if (!few)
                for (int64_t d = 0; d < D; ++d) qt[d * kLanes + i] = 0.f;
              continue;
            }
            const int64_t r = row / group, h = kvh * group + row % group;
            const float* q = a.q + ((r0 + r) * a.num_q_heads + h) * D;
            for (int64_t d = 0; d < D; ++d) qt[few ? i * D + d : d * kLanes + i] = q[d] * a.scale;
            outs[u][i] = a.out + ((r0 + r) * a.num_q_heads + h) * D;
            posf[u][i] = float(ctx - q_len + r);
            max_pos = std::max(max_pos, ctx - q_len + r);
          }
        }
        if (few && Pairs) {
          if (left == 1) attend_few_pairs<HD, 1>(a, bt, kvh, outs[0], posf[0], max_pos, t);
          else if (left == 2) attend_few_pairs<HD, 2>(a, bt, kvh, outs[0], posf[0], max_pos, t);
          else if (left == 3) attend_few_pairs<HD, 3>(a, bt, kvh, outs[0], posf[0], max_pos, t);
          else attend_few_pairs<HD, 4>(a, bt, kvh, outs[0], posf[0], max_pos, t);
        } else if (few) {
          attend_few<HD, KV>(a, bt, kvh, outs[0], posf[0], int(left), max_pos, t);
        } else if (tiles == 2) {
          attend_tiles<HD, 2, KV, Pairs>(a, bt, kvh, outs, posf, max_pos, t);
        } else {
          attend_tiles<HD, 1, KV, Pairs>(a, bt, kvh, outs, posf, max_pos, t);
        }
        t0 += tiles * kLanes;
      }
    }
  }
}

template <class KV, bool Pairs = false>
void attend_any(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  if (a.head_dim == 64) attend<64, KV, Pairs>(a, seq_begin, seq_end);
  else if (a.head_dim == 128) attend<128, KV, Pairs>(a, seq_begin, seq_end);
  else attend<0, KV, Pairs>(a, seq_begin, seq_end);
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  if (a.head_dim > kMaxHeadDim)
    throw std::invalid_argument("paged_attention: head_dim " + std::to_string(a.head_dim) +
                                " exceeds " + std::to_string(kMaxHeadDim));
  if (kv_pair_layout(a.kv_bf16, a.head_dim, a.block_size))
#if defined(FLASHPAGE_ATTENTION_TILES)
    return paged_attention_tiles(a, seq_begin, seq_end);
#elif defined(FLASHPAGE_ATTENTION_PAIRS_BF16)
    return paged_attention_pairs_bf16(a, seq_begin, seq_end);
#else
    return attend_any<uint16_t, true>(a, seq_begin, seq_end);
#endif
  if (a.kv_bf16) attend_any<uint16_t>(a, seq_begin, seq_end);
  else attend_any<float>(a, seq_begin, seq_end);
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
