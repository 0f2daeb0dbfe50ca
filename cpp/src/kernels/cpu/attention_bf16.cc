// Paged attention with bf16 dot products (vdpbf16ps) for bf16 caches in the pair layout
// (attention_tiles.h), the avx512_bf16 level: the arithmetic of the amx level's tiles
// (attention_amx.cc) in vector registers. Q (scaled) and the probabilities are rounded to bf16,
// every sum is fp32 — what flash attention does on GPUs and what transformers' bf16 attention
// computes. The pair layout is the instruction's: one vector load is 16 keys' (d, d + 1) pairs
// (K^T) or 16 d's (key, key + 1) pairs (V), so
//   S = Q . K^T   per row, a vector of 16 keys per key group: a chain of vdpbf16ps over the d
//                 pairs in order, a broadcast Q pair against a load of K;
//   O += P . V    per row, head_dim / 16 vectors: a chain over the key pairs in order, a
//                 broadcast P pair against a load of V.
// Each instruction does 32 multiply-adds and the cache needs no widening: about half the
// instructions of the fp32 kernels (attention.cc), which remain for other levels and layouts.
// Rows go up to kMaxRows at a time (a decode's heads of one KV head, or two positions of a
// prompt chunk), sharing each load of K and V; keys 64 at a time from position 0.
//
// A row's arithmetic depends only on that row: the key steps are fixed (64 from 0), a key group
// that lies past a row's position is skipped for it (masked products, its state untouched),
// and every other operation is per row and lane. So a row gives the same bits alone (a decode),
// with any other rows and in any chunk of its prompt (tests/test_cpu_attention.py).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/attention_tiles.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {

constexpr int kGroup = 16;   // keys per vector of scores
constexpr int kGroups = 4;   // key groups per step: the softmax bookkeeping is paid per 64 keys
constexpr int kStep = kGroups * kGroup;
constexpr int kMaxRows = 6;  // rows x 4 accumulators + 4 loads + a broadcast: 29 of 32 registers
constexpr int kMaxD = 256;

struct RowState {
  alignas(64) uint32_t q[kMaxRows][kMaxD / 2];  // Q * scale in bf16, (d, d + 1) pairs
  alignas(64) float o[kMaxRows][kMaxD];
  alignas(64) uint16_t p[kMaxRows][kStep];      // the step's P in bf16
  alignas(64) uint16_t v_clean[kGroup * kMaxD]; // a group reaching past the context, zeroed there
  alignas(64) float m[16], l[16];               // lanes past the rows: -inf, 0
  float pos[kMaxRows];
  float* out[kMaxRows];
};

inline __m512 dot_pairs(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, (__m512bh)a, (__m512bh)b);
}
inline __m512 dot_pairs(__m512 acc, __mmask16 keep, __m512i a, __m512i b) {
  return _mm512_mask_dpbf16_ps(acc, keep, (__m512bh)a, (__m512bh)b);
}
inline __m512i broadcast_pair(const void* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return _mm512_set1_epi32(int(w));
}

// NT rows (HD: head_dim when known at compile time, else 0) against the keys [0, max_pos] of
// KV head kvh of the sequence with block table bt and context ctx.
template <int HD, int NT, bool Fetch>
void attend_rows(RowState& st, const PagedAttentionArgs& a, const int32_t* bt, int64_t kvh, int64_t ctx,
                 int64_t max_pos, const uint16_t* const (&after)[kGroups]) {
  const int64_t D = HD > 0 ? HD : a.head_dim, bs = a.block_size, k_row = bs * 2;
  const auto* kc = static_cast<const uint16_t*>(a.k_cache);
  const auto* vc = static_cast<const uint16_t*>(a.v_cache);
  for (int64_t k0 = 0; k0 <= max_pos; k0 += kStep) {
    const int groups = int(std::min<int64_t>(kGroups, (max_pos - k0) / kGroup + 1));
    const uint16_t *k[kGroups], *v[kGroups], *v_cached[kGroups], *k_next[kGroups] = {};
    // The next step's K chunks (after a last step: those of the caller's next rows' first step),
    // fetched during this step's P . V (below).
    if constexpr (Fetch) {
      if (k0 + kStep > max_pos)
        std::copy_n(after, kGroups, k_next);
      else
        for (int g = 0; g < kGroups && k0 + kStep + g * kGroup <= max_pos; ++g) {
          const int64_t p0 = k0 + kStep + g * kGroup;
          k_next[g] = kc + (int64_t(bt[p0 / bs]) * a.num_kv_heads + kvh) * bs * D + (p0 % bs) * 2;
        }
    }
    for (int g = 0; g < groups; ++g) {
      const int64_t p0 = k0 + g * kGroup, off = p0 % bs;
      const int64_t base = (int64_t(bt[p0 / bs]) * a.num_kv_heads + kvh) * bs * D;
      k[g] = kc + base + off * 2;
      v[g] = v_cached[g] = vc + base + off * D;
      if (p0 + kGroup > ctx) {  // slots past the context may hold anything: their V is 0 here
        const int64_t valid = ctx - p0;  // keys of the group in the context, 1..15
        for (int64_t r = 0; r < kGroup / 2; ++r) {  // pair row r: keys 2r (low halves), 2r + 1
          const __mmask32 keep = 2 * r + 1 < valid ? 0xFFFFFFFFu : 2 * r < valid ? 0x55555555u : 0u;
          for (int64_t d = 0; d < D; d += 16)
            _mm512_store_si512(st.v_clean + (r * D + d) * 2,
                               _mm512_maskz_mov_epi16(keep, _mm512_loadu_si512(v[g] + (r * D + d) * 2)));
        }
        v[g] = st.v_clean;
      }
    }
    // S: all the step's groups at once (NT x groups independent chains).
    __m512 s[NT][kGroups];
    auto scores = [&]<int G>() {
      for (int i = 0; i < NT; ++i)
        for (int g = 0; g < G; ++g) s[i][g] = _mm512_setzero_ps();
      for (int64_t dp = 0; dp < D / 2; ++dp) {
        // This step's V, a line of each group's chunk per d pair (a chunk is D / 2 lines): its
        // loads come only after the softmax, too late to overlap the scores' K misses.
        if constexpr (Fetch)
          for (int g = 0; g < G; ++g) prefetch_l1(v_cached[g] + dp * 32);
        __m512i kv[G];
        for (int g = 0; g < G; ++g) kv[g] = _mm512_loadu_si512(k[g] + dp * k_row);
        for (int i = 0; i < NT; ++i) {
          const __m512i qp = _mm512_set1_epi32(int(st.q[i][dp]));
          for (int g = 0; g < G; ++g) s[i][g] = dot_pairs(s[i][g], qp, kv[g]);
        }
      }
    };
    if (groups == 4) scores.template operator()<4>();
    else if (groups == 3) scores.template operator()<3>();
    else if (groups == 2) scores.template operator()<2>();
    else scores.template operator()<1>();
    // The online softmax of the step: each row's new maximum, P (bf16 for the product) and its
    // sum, then every row's rescale factor in one vector exp (attention_tiles.h).
    alignas(64) float mnew[16], sums[16];
    std::memcpy(mnew, st.m, sizeof mnew);
    std::memset(sums, 0, sizeof sums);
    __mmask16 active[NT][kGroups];  // the groups a row takes part in: those starting at or before it
    for (int i = 0; i < NT; ++i) {
      const int64_t valid = int64_t(st.pos[i]) - k0 + 1;  // keys of this step the row sees
      for (int g = 0; g < kGroups; ++g) active[i][g] = 0;
      if (valid <= 0) continue;
      __mmask16 mask[kGroups];
      for (int g = 0; g < groups; ++g) {
        mask[g] = first_lanes(valid - g * kGroup);
        active[i][g] = mask[g] ? 0xFFFF : 0;
      }
      sums[i] = softmax_row_step(s[i], mask, groups, st.m[i], mnew[i], st.p[i], kGroup);
    }
    const __m512 c = softmax_rescale(st.m, st.l, mnew, sums);
    alignas(64) float corr[16];
    _mm512_store_ps(corr, c);
    // O = O * c + P . V, four vectors of head_dim at a time; a row's products only in its groups.
    int64_t it = 0;  // iterations of P . V in this step: one line of each next K chunk per one
    auto values = [&]<int C>(int64_t d0) {
      __m512 acc[NT][C];
      for (int i = 0; i < NT; ++i) {
        const __m512 ci = _mm512_set1_ps(corr[i]);
        for (int j = 0; j < C; ++j) acc[i][j] = _mm512_mul_ps(_mm512_load_ps(st.o[i] + d0 + 16 * j), ci);
      }
      for (int g = 0; g < groups; ++g)
        for (int r = 0; r < kGroup / 2; ++r, ++it) {
          if constexpr (Fetch)
            if (it < D / 2)
              for (int gn = 0; gn < kGroups; ++gn)
                if (k_next[gn]) prefetch_l1(k_next[gn] + it * 32);
          __m512i vv[C];
          for (int j = 0; j < C; ++j) vv[j] = _mm512_loadu_si512(v[g] + (r * D + d0 + 16 * j) * 2);
          for (int i = 0; i < NT; ++i) {
            const __m512i pp = broadcast_pair(st.p[i] + g * kGroup + 2 * r);
            for (int j = 0; j < C; ++j) acc[i][j] = dot_pairs(acc[i][j], active[i][g], pp, vv[j]);
          }
        }
      for (int i = 0; i < NT; ++i)
        for (int j = 0; j < C; ++j) _mm512_store_ps(st.o[i] + d0 + 16 * j, acc[i][j]);
    };
    int64_t d0 = 0;
    for (; d0 + 64 <= D; d0 += 64) values.template operator()<4>(d0);
    if (d0 < D) values.template operator()<2>(d0);  // D % 64 == 32
  }
}

template <int HD>
void attend_seqs(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  const int64_t D = HD > 0 ? HD : a.head_dim, nkv = a.num_kv_heads, group = a.num_q_heads / nkv;
  const __m512 scale = _mm512_set1_ps(a.scale);
  // ~45 KB: per thread, not on the stack of whatever thread calls (an embedding program's
  // threads may have small stacks).
  static thread_local RowState st;
  const auto* kc = static_cast<const uint16_t*>(a.k_cache);
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    const int64_t r0 = a.query_start_loc[s], q_len = a.query_start_loc[s + 1] - r0, ctx = a.context_lens[s];
    const int32_t* bt = a.block_tables + s * a.block_table_stride;
    const int64_t kv_end = a.kv_head_end > 0 ? a.kv_head_end : nkv;
    const int64_t n_rows = a.row_end > 0 ? std::min(a.row_end, q_len * group) : q_len * group;
    for (int64_t kvh = a.kv_head_begin; kvh < kv_end; ++kvh)
      for (int64_t t0 = a.row_begin; t0 < n_rows; t0 += kMaxRows) {
        const int nt = int(std::min<int64_t>(kMaxRows, n_rows - t0));
        int64_t max_pos = 0;
        for (int i = 0; i < nt; ++i) {
          const int64_t r = (t0 + i) / group, h = kvh * group + (t0 + i) % group;
          const float* q = a.q + ((r0 + r) * a.num_q_heads + h) * D;
          for (int64_t d = 0; d < D; d += 16)
            _mm256_store_si256(reinterpret_cast<__m256i*>(st.q[i] + d / 2),
                               (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(q + d), scale)));
          const int64_t pos = ctx - q_len + r;
          st.pos[i] = float(pos);
          st.out[i] = a.out + ((r0 + r) * a.num_q_heads + h) * D;
          std::fill_n(st.o[i], D, 0.f);
          max_pos = std::max(max_pos, pos);
        }
        // The first step's K chunks of the rows that come next (these rows' next block, the next
        // KV head, or the next sequence's first), fetched during these rows' last step.
        // Only rows that read their keys once (a decode, a short chunk): more rows of the same
        // head find them in L2, where the fetches only cost issue slots (1,024-token prefill -8 %).
        const bool fetch = n_rows - a.row_begin <= kMaxRows;
        const uint16_t* after[kGroups] = {};
        if (fetch) {
          int64_t ns = s, nh = kvh;
          if (t0 + kMaxRows >= n_rows && ++nh >= kv_end) ns = s + 1, nh = a.kv_head_begin;
          if (ns < seq_end) {
            const int32_t* nbt = a.block_tables + ns * a.block_table_stride;
            for (int g = 0; g < kGroups && g * kGroup < a.context_lens[ns]; ++g)
              after[g] = kc + (int64_t(nbt[g * kGroup / a.block_size]) * nkv + nh) * a.block_size * D +
                         (g * kGroup % a.block_size) * 2;
          }
        }
        std::fill_n(st.m, 16, -INFINITY);
        std::fill_n(st.l, 16, 0.f);
        auto run = [&]<bool Fetch>() {
          switch (nt) {
            case 1: return attend_rows<HD, 1, Fetch>(st, a, bt, kvh, ctx, max_pos, after);
            case 2: return attend_rows<HD, 2, Fetch>(st, a, bt, kvh, ctx, max_pos, after);
            case 3: return attend_rows<HD, 3, Fetch>(st, a, bt, kvh, ctx, max_pos, after);
            case 4: return attend_rows<HD, 4, Fetch>(st, a, bt, kvh, ctx, max_pos, after);
            case 5: return attend_rows<HD, 5, Fetch>(st, a, bt, kvh, ctx, max_pos, after);
            default: return attend_rows<HD, 6, Fetch>(st, a, bt, kvh, ctx, max_pos, after);
          }
        };
        if (fetch) run.template operator()<true>();
        else run.template operator()<false>();
        for (int i = 0; i < nt; ++i) {
          const __m512 inv = _mm512_set1_ps(st.l[i] > 0.f ? 1.f / st.l[i] : 0.f);
          for (int64_t d = 0; d < D; d += 16)
            _mm512_storeu_ps(st.out[i] + d, _mm512_mul_ps(_mm512_load_ps(st.o[i] + d), inv));
        }
      }
  }
}

}  // namespace

void paged_attention_pairs_bf16(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  if (a.head_dim == 64) attend_seqs<64>(a, seq_begin, seq_end);
  else if (a.head_dim == 128) attend_seqs<128>(a, seq_begin, seq_end);
  else attend_seqs<0>(a, seq_begin, seq_end);
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
