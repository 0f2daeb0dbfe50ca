// Paged attention over the flattened batch (see PagedAttentionArgs), compiled once per ISA
// level. Keys are taken kLanes positions at a time: kLanes dot products (each a lane-split chain
// over head_dim) are reduced by one transpose into a vector of scores, the softmax is updated
// once per group (vectorised exp), then the values are accumulated. Up to kTile query rows of
// one KV head (query positions x the heads of its GQA group) share each group of keys while it
// is in L1. A row's arithmetic depends only on that row (its groups start at position 0 and
// stop at its own position), so results do not depend on the tile or batch it runs in.
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
constexpr int kTile = 8;

struct Row {
  float* out;
  int64_t pos;
  float m, l;
};

template <class KV>
void attend(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  const int64_t D = a.head_dim, bs = a.block_size, nkv = a.num_kv_heads;
  const int64_t group = a.num_q_heads / nkv;
  const int64_t vec_end = D - D % kLanes;
  const KV* kc = static_cast<const KV*>(a.k_cache);
  const KV* vc = static_cast<const KV*>(a.v_cache);
  alignas(64) float qs[kTile][kMaxHeadDim];
  alignas(64) float acc[kTile][kMaxHeadDim];
  alignas(64) float sc[kLanes];
  Row rows[kTile];
  const KV* keys[kLanes];
  const KV* vals[kLanes];
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    const int64_t r0 = a.query_start_loc[s], q_len = a.query_start_loc[s + 1] - r0;
    const int64_t ctx = a.context_lens[s];
    const int32_t* bt = a.block_tables + s * a.block_table_stride;
    const int64_t kv_end = a.kv_head_end > 0 ? a.kv_head_end : nkv;
    for (int64_t kvh = a.kv_head_begin; kvh < kv_end; ++kvh) {
      const int64_t n_rows = a.row_end > 0 ? std::min(a.row_end, q_len * group) : q_len * group;
      for (int64_t t0 = a.row_begin; t0 < n_rows; t0 += kTile) {
        const int nt = int(std::min<int64_t>(kTile, n_rows - t0));
        int64_t max_pos = 0;
        for (int i = 0; i < nt; ++i) {
          const int64_t r = (t0 + i) / group, h = kvh * group + (t0 + i) % group;
          const float* q = a.q + ((r0 + r) * a.num_q_heads + h) * D;
          for (int64_t d = 0; d < D; ++d) {
            qs[i][d] = q[d] * a.scale;
            acc[i][d] = 0.f;
          }
          rows[i] = {a.out + ((r0 + r) * a.num_q_heads + h) * D, ctx - q_len + r, -INFINITY, 0.f};
          max_pos = std::max(max_pos, rows[i].pos);
        }
        for (int64_t p0 = 0; p0 <= max_pos; p0 += kLanes) {
          const int ng = int(std::min<int64_t>(kLanes, max_pos - p0 + 1));
          for (int j = 0; j < ng; ++j) {
            const int64_t p = p0 + j;
            const int64_t off = ((int64_t(bt[p / bs]) * nkv + kvh) * bs + p % bs) * D;
            keys[j] = kc + off;
            vals[j] = vc + off;
          }
          for (int i = 0; i < nt; ++i) {
            Row& R = rows[i];
            if (R.pos < p0) continue;
            const int nv = int(std::min<int64_t>(kLanes, R.pos - p0 + 1));
            Vec part[kLanes];
            for (int j = 0; j < kLanes; ++j) {
              part[j] = vzero();
              if (j >= nv) continue;
              for (int64_t d = 0; d < vec_end; d += kLanes)
                part[j] = vfma(vload(qs[i] + d), vload_as_f32(keys[j] + d), part[j]);
            }
            vtranspose(part);
            Vec score = part[0];
            for (int j = 1; j < kLanes; ++j) score = vadd(score, part[j]);
            if (vec_end < D) {  // head_dim not a multiple of kLanes: the rest per key
              vstore(sc, score);
              for (int j = 0; j < nv; ++j)
                for (int64_t d = vec_end; d < D; ++d) sc[j] += qs[i][d] * scalar_as_f32(keys[j] + d);
              score = vload(sc);
            }
            score = vfill_from(score, nv, -INFINITY);
            const float gmax = vmax_all(score);
            if (gmax > R.m) {  // new maximum: rescale what was accumulated
              const float corr = std::exp(R.m - gmax);
              R.l *= corr;
              const Vec cv = vset1(corr);
              for (int64_t d = 0; d < vec_end; d += kLanes) vstore(acc[i] + d, vmul(vload(acc[i] + d), cv));
              for (int64_t d = vec_end; d < D; ++d) acc[i][d] *= corr;
              R.m = gmax;
            }
            const Vec pw = vfill_from(vexp(vadd(score, vset1(-R.m))), nv, 0.f);
            R.l += vsum(pw);
            vstore(sc, pw);
            for (int j = 0; j < nv; ++j) {
              const Vec w = vset1(sc[j]);
              for (int64_t d = 0; d < vec_end; d += kLanes)
                vstore(acc[i] + d, vfma(w, vload_as_f32(vals[j] + d), vload(acc[i] + d)));
              for (int64_t d = vec_end; d < D; ++d) acc[i][d] += sc[j] * scalar_as_f32(vals[j] + d);
            }
          }
        }
        for (int i = 0; i < nt; ++i) {
          const float inv = rows[i].l > 0.f ? 1.f / rows[i].l : 0.f;
          for (int64_t d = 0; d < D; ++d) rows[i].out[d] = acc[i][d] * inv;
        }
      }
    }
  }
}

}  // namespace

void paged_attention(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  if (a.head_dim > kMaxHeadDim)
    throw std::invalid_argument("paged_attention: head_dim " + std::to_string(a.head_dim) +
                                " exceeds " + std::to_string(kMaxHeadDim));
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (kv_tile_layout(a.kv_bf16, a.head_dim, a.block_size)) return paged_attention_tiles(a, seq_begin, seq_end);
#endif
  if (a.kv_bf16) attend<uint16_t>(a, seq_begin, seq_end);
  else attend<float>(a, seq_begin, seq_end);
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
