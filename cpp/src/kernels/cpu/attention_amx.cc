// Paged attention on AMX tiles for bf16 caches in the pair layout (attention_tiles.h): a
// flash-attention loop over 16-row tiles of one KV head's rows (query positions x the heads of
// its GQA group), keys 64 at a time from position 0:
//   S = Q . K^T     four 16 x 16 tiles, Q (scaled, rounded to bf16) against the cached K tiles
//   online softmax  per row in vector registers: mask keys past the row's position, new
//                   maximum, rescale factor, P = exp(S - max) (fp32 sum, bf16 for the product)
//   O = O * c + P . V   per 16 columns of head_dim, P . V on tiles, O in fp32 memory
// A row's arithmetic depends only on that row: the key steps are fixed (64 from 0), a step past
// a row's position changes nothing of it (its P row is zero, its rescale exactly 1, and the
// tile sums of zero products leave its values as they were), and every product is per element.
// So a row gives the same bits alone (a decode), in any tile and in any chunk of its prompt.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/amx.h"
#include "kernels/cpu/attention_tiles.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {

constexpr int kRows = 16;       // rows of a tile
constexpr int kGroup = 16;      // keys per K/V tile
constexpr int kGroups = 4;      // key groups per step: the per-step softmax bookkeeping is paid
                                // once per 64 keys (32 keys per step was ~20 % slower at decode)
constexpr int kStep = kGroups * kGroup;
constexpr int kMaxD = 256;
constexpr int kMaxHeads = 4;  // KV heads of a sequence in one pass over its keys

// 0-3: S of the step's key groups, then P . V for 16 columns; 4: Q (32 d); 5: K^T (16 d pairs x
// 16 keys); 6: P (16 keys); 7: V (8 key pairs x 16 d).
const TileConfig kAttentionTiles{{16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 32}, {8, 64}};

inline void store_bf16(uint16_t* dst, __m512 v) {
  _mm256_store_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(v));
}

// One KV head's 16-row tile (nt valid rows) against the keys [0, max_pos].
struct TileState {
  alignas(64) uint16_t q[kMaxD / 32][kRows * 32];  // A tiles of Q, one per 32 d
  alignas(64) float s[kRows * kStep];              // the step's scores
  alignas(64) uint16_t p[kGroups][kRows * kGroup]; // A tiles of P (rows >= nt stay zero)
  alignas(64) float pv[kRows * 64];
  alignas(64) float o[kRows * kMaxD];
  alignas(64) uint16_t v_clean[kGroup * kMaxD];    // a group reaching past the context, zeroed there
  alignas(64) float m[kRows], l[kRows], corr[kRows];  // every row, those past nt at -inf / 0
  int64_t pos[kRows];
  float* out[kRows];
};

// S for key group gi (tile gi) of keys at `k` (its first d-pair row; rows bs * 2 values apart).
// (GCC's tile intrinsics take the tile number as a literal, so each group is spelled out.)
#define FLASHPAGE_SCORES(S)                                  \
  do {                                                       \
    _tile_zero(S);                                           \
    for (int64_t db = 0; db < dblocks; ++db) {               \
      _tile_loadd(4, st.q[db], 64);                          \
      _tile_loadd(5, k + db * 16 * bs * 2, bs * 4);          \
      _tile_dpbf16ps(S, 4, 5);                               \
    }                                                        \
    _tile_stored(S, st.s + S * kGroup, kStep * 4);           \
  } while (0)

inline void scores(TileState& st, int gi, const uint16_t* k, int64_t dblocks, int64_t bs) {
  switch (gi) {
    case 0: FLASHPAGE_SCORES(0); break;
    case 1: FLASHPAGE_SCORES(1); break;
    case 2: FLASHPAGE_SCORES(2); break;
    default: FLASHPAGE_SCORES(3); break;
  }
}
#undef FLASHPAGE_SCORES

// P . V for head_dim columns [16 j, 16 j + 16) into tile C (then st.pv + 16 C): C = sum over
// the step's groups of P_g . V_g.
#define FLASHPAGE_VALUES(C)                                  \
  do {                                                       \
    _tile_zero(C);                                           \
    for (int gi = 0; gi < groups; ++gi) {                    \
      _tile_loadd(6, st.p[gi], kGroup * 2);                  \
      _tile_loadd(7, v[gi] + (j0 + C) * 32, D * 4);          \
      _tile_dpbf16ps(C, 6, 7);                               \
    }                                                        \
    _tile_stored(C, st.pv + C * 16, 64 * 4);                 \
  } while (0)

// Four 16-column pieces (fewer where head_dim ends), each its own accumulator.
inline void values(TileState& st, const uint16_t* const* v, int groups, int64_t D, int64_t j0, int64_t here) {
  FLASHPAGE_VALUES(0);
  if (here > 1) FLASHPAGE_VALUES(1);
  if (here > 2) FLASHPAGE_VALUES(2);
  if (here > 3) FLASHPAGE_VALUES(3);
}
#undef FLASHPAGE_VALUES

// Fetches the K and V of the key groups at positions first, first + 16, ... <= last of KV heads
// [kvh0, kvh0 + heads) into L2 (2 KB each per head and group at block_size 16): tile loads that
// miss the caches wait for memory one after another. The passes fetch each group a step (64
// keys) ahead, one group before each group's scores, into L2 rather than L1 (a step of three
// heads is L1's 48 KB): decode attention 9.2 -> 11.3 GB/s of K+V on one core. (Two steps ahead,
// fetching each step whole, or the next pass's first step during this one's last: no better.)
void prefetch_keys(const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh0, int64_t heads, int64_t first,
                   int64_t last) {
  const int64_t D = a.head_dim, bs = a.block_size, nkv = a.num_kv_heads;
  const auto* kc = static_cast<const uint16_t*>(a.k_cache);
  const auto* vc = static_cast<const uint16_t*>(a.v_cache);
  for (int64_t p0 = first; p0 <= last; p0 += kGroup)
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (int64_t(bt[p0 / bs]) * nkv + kvh0 + h) * bs * D;
      const char* k = reinterpret_cast<const char*>(kc + base + (p0 % bs) * 2);
      const char* v = reinterpret_cast<const char*>(vc + base + (p0 % bs / 2) * D * 2);
      for (int64_t r = 0; r < D / 2; ++r) prefetch_l2(k + r * bs * 4);  // 64 B of pairs per row
      for (int64_t line = 0; line < kGroup * D * 2 / 64; ++line) prefetch_l2(v + line * 64);
    }
}

// H KV heads of one sequence (the same rows and positions: decode rows, or a short chunk) in one
// pass over the keys, step by step: the heads' tile products and their vector softmaxes are
// independent, so the core overlaps one head's softmax with the next head's products (a decode
// step is a chain of tile products and tile <-> vector hand-offs for a few rows). Every head's
// arithmetic is the same as alone.
template <int H>
void attend_tiles(TileState* const* sts, int nt, int64_t max_pos, const PagedAttentionArgs& a, const int32_t* bt,
                  int64_t ctx, int64_t kvh0) {
  const int64_t D = a.head_dim, bs = a.block_size, nkv = a.num_kv_heads;
  const int64_t dblocks = D / 32, dtiles = D / 16;
  const auto* kc = static_cast<const uint16_t*>(a.k_cache);
  const auto* vc = static_cast<const uint16_t*>(a.v_cache);
  const __m512 neg_inf = _mm512_set1_ps(-INFINITY);
  prefetch_keys(a, bt, kvh0, H, 0, std::min<int64_t>(max_pos, kStep - 1));
  for (int64_t k0 = 0; k0 <= max_pos; k0 += kStep) {
    const int groups = int(std::min<int64_t>(kGroups, (max_pos - k0) / kGroup + 1));
    const uint16_t* v[H][kGroups];
    for (int h = 0; h < H; ++h) {
      TileState& st = *sts[h];
      for (int gi = 0; gi < groups; ++gi) {
        const int64_t p0 = k0 + gi * kGroup, off = p0 % bs;
        const int64_t base = (int64_t(bt[p0 / bs]) * nkv + kvh0 + h) * bs * D;
        if (p0 + kStep <= max_pos) prefetch_keys(a, bt, kvh0 + h, 1, p0 + kStep, p0 + kStep);
        scores(st, gi, kc + base + off * 2, dblocks, bs);
        v[h][gi] = vc + base + (off / 2) * D * 2;
        if (p0 + kGroup > ctx) {  // slots past the context may hold anything: their P is 0, V too
          const int64_t valid = ctx - p0;  // keys of the group in the context, 1..15
          for (int64_t r = 0; r < kGroup / 2; ++r) {  // pair row r: keys 2r (low halves), 2r + 1
            const __mmask32 keep = 2 * r + 1 < valid ? 0xFFFFFFFFu : 2 * r < valid ? 0x55555555u : 0u;
            for (int64_t d = 0; d < D; d += 16)
              _mm512_store_si512(st.v_clean + r * D * 2 + d * 2,
                                 _mm512_maskz_mov_epi16(keep, _mm512_loadu_si512(v[h][gi] + r * D * 2 + d * 2)));
          }
          v[h][gi] = st.v_clean;
        }
      }
    }
    for (int h = 0; h < H; ++h) {
      TileState& st = *sts[h];
      // The online softmax of the step: first every row's new maximum, then the rescale factors
      // of all 16 rows in one vector exp (a scalar exp per row cost as much as a group's P),
      // then P and its row sums.
      alignas(64) float mnew[kRows], sums[kRows];
      _mm512_store_ps(mnew, neg_inf);  // rows past nt: as they were (-inf, 0)
      _mm512_store_ps(sums, _mm512_setzero_ps());
      for (int i = 0; i < nt; ++i) {
        const int64_t valid = st.pos[i] - k0 + 1;  // keys of this step the row sees
        __m512 sc[kGroups];
        __mmask16 mask[kGroups];
        for (int gi = 0; gi < groups; ++gi) {
          mask[gi] = first_lanes(valid - gi * kGroup);
          sc[gi] = _mm512_load_ps(st.s + i * kStep + gi * kGroup);
        }
        sums[i] = softmax_row_step(sc, mask, groups, st.m[i], mnew[i], st.p[0] + i * kGroup, kRows * kGroup);
      }
      _mm512_store_ps(st.corr, softmax_rescale(st.m, st.l, mnew, sums));
    }
    for (int h = 0; h < H; ++h) {
      TileState& st = *sts[h];
      for (int64_t j0 = 0; j0 < dtiles; j0 += 4) {
        const int64_t here = std::min<int64_t>(4, dtiles - j0);
        values(st, v[h], groups, D, j0, here);
        for (int i = 0; i < nt; ++i) {
          const __m512 c = _mm512_set1_ps(st.corr[i]);
          for (int64_t j = 0; j < here; ++j) {
            float* o = st.o + i * kMaxD + (j0 + j) * 16;
            _mm512_store_ps(o, _mm512_fmadd_ps(_mm512_load_ps(o), c, _mm512_load_ps(st.pv + i * 64 + j * 16)));
          }
        }
      }
    }
  }
}

}  // namespace

void paged_attention_tiles(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  const int64_t D = a.head_dim, nkv = a.num_kv_heads, group = a.num_q_heads / nkv;
  const __m512 scale = _mm512_set1_ps(a.scale);
  // ~170 KB: per thread, not on the stack of whatever thread calls (an embedding program's
  // threads may have small stacks).
  static thread_local TileState states[kMaxHeads];
  for (TileState& st : states) std::memset(st.p, 0, sizeof st.p);
  TileState* const sts[kMaxHeads] = {&states[0], &states[1], &states[2], &states[3]};
  TileScope tiles(kAttentionTiles);
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    const int64_t r0 = a.query_start_loc[s], q_len = a.query_start_loc[s + 1] - r0, ctx = a.context_lens[s];
    const int32_t* bt = a.block_tables + s * a.block_table_stride;
    const int64_t kv_end = a.kv_head_end > 0 ? a.kv_head_end : nkv;
    const int64_t n_rows = a.row_end > 0 ? std::min(a.row_end, q_len * group) : q_len * group;
    // Rows t0 .. t0 + nt of KV head kvh into st (Q scaled to bf16, positions, outputs); returns
    // the last position they attend to.
    auto load = [&](TileState& st, int64_t kvh, int64_t t0, int nt) {
      for (int64_t db = 0; db < D / 32; ++db)  // rows past nt stay zero: padding of the A tiles
        std::memset(st.q[db] + nt * 32, 0, size_t(kRows - nt) * 64);
      int64_t max_pos = 0;
      for (int i = 0; i < nt; ++i) {
        const int64_t r = (t0 + i) / group, h = kvh * group + (t0 + i) % group;
        const float* q = a.q + ((r0 + r) * a.num_q_heads + h) * D;
        for (int64_t db = 0; db < D / 32; ++db) {
          store_bf16(st.q[db] + i * 32, _mm512_mul_ps(_mm512_loadu_ps(q + db * 32), scale));
          store_bf16(st.q[db] + i * 32 + 16, _mm512_mul_ps(_mm512_loadu_ps(q + db * 32 + 16), scale));
        }
        st.pos[i] = ctx - q_len + r;
        st.out[i] = a.out + ((r0 + r) * a.num_q_heads + h) * D;
        std::memset(st.o + i * kMaxD, 0, size_t(D) * 4);
        max_pos = std::max(max_pos, st.pos[i]);
      }
      std::fill_n(st.m, kRows, -INFINITY);
      std::fill_n(st.l, kRows, 0.f);
      return max_pos;
    };
    auto store = [&](const TileState& st, int nt) {
      for (int i = 0; i < nt; ++i) {
        const __m512 inv = _mm512_set1_ps(st.l[i] > 0.f ? 1.f / st.l[i] : 0.f);
        for (int64_t d = 0; d < D; d += 16)
          _mm512_storeu_ps(st.out[i] + d, _mm512_mul_ps(_mm512_load_ps(st.o + i * kMaxD + d), inv));
      }
    };
    // Rows that fit one tile per head (decodes, short chunks) go several KV heads at a time, the
    // same rows of each (the same positions); longer chunks one head, a row tile at a time.
    const bool one_tile = n_rows > a.row_begin && n_rows - a.row_begin <= kRows;
    for (int64_t kvh = a.kv_head_begin; kvh < kv_end;) {
      const int64_t together = one_tile ? std::min<int64_t>(kMaxHeads, kv_end - kvh) : 1;
      for (int64_t t0 = a.row_begin; t0 < n_rows; t0 += kRows) {
        const int nt = int(std::min<int64_t>(kRows, n_rows - t0));
        const int64_t max_pos = load(states[0], kvh, t0, nt);
        for (int64_t h = 1; h < together; ++h) load(states[h], kvh + h, t0, nt);
        switch (together) {
          case 1: attend_tiles<1>(sts, nt, max_pos, a, bt, ctx, kvh); break;
          case 2: attend_tiles<2>(sts, nt, max_pos, a, bt, ctx, kvh); break;
          case 3: attend_tiles<3>(sts, nt, max_pos, a, bt, ctx, kvh); break;
          default: attend_tiles<4>(sts, nt, max_pos, a, bt, ctx, kvh); break;
        }
        for (int64_t h = 0; h < together; ++h) store(states[h], nt);
      }
      kvh += together;
    }
  }
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
