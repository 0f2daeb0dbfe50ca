// bf16 Linear layers on the levels with bf16 dot products (avx512_bf16, amx): bf16 inputs times
// bf16 weights, fp32 sums — what transformers and vLLM compute for a bf16 checkpoint.
//
// Weights are packed at load into panels of 32 output columns, K padded to a multiple of 32 with
// zeros. A panel is a run of K/32 blocks; block kb holds two 16-column halves, each 16 rows of
// 64 bytes: row r of half h holds, for the half's 16 columns n, the pair w[n][32 kb + 2r],
// w[n][32 kb + 2r + 1]. That is at once
//   - AMX's B-tile layout (a tile = one half of one block, loaded with a 64-byte stride), and
//   - vdpbf16ps's: one row of a half is a vector whose 32-bit lane n is column n's pair.
// The inputs (linear_input) are bf16, K rounded up to 32 and the rows up to 16 with zeros, in
// A-tile order: 16-row tiles one after the other, each a run of K/32 blocks of 16 rows x 32
// values (1 KB, contiguous: a tile whose rows straddle cache lines or sit a row stride apart
// loads markedly slower).
//
// Batch invariance: an output's sum runs over the 32-wide k blocks in order, from zero (a long K
// is done in slices one after the other, the fp32 sums parked in memory between them: the same
// additions in the same order; never split across threads); each block's products are summed by
// the same instruction whatever the other rows of the tile hold (the dot-product instructions
// define each output lane from its own row and column only). The bias is added last. So y[m, n] depends on nothing but row m, as the
// fp32 kernels guarantee too (tests/test_batch_invariance.py). The amx and avx512_bf16 levels
// differ from each other in the last bits; a process uses one.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/amx.h"
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/linear_bf16.h"
#include "kernels/cpu/simd.h"
#include "runtime/aligned.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {

constexpr int kPanel = 32;    // output columns per panel
constexpr int kKBlock = 32;   // k per block (one tile row of bf16)
constexpr int kHalf = 16 * kKBlock;   // bf16 elements per half block (a 1 KB tile)
constexpr int kBlock = 2 * kHalf;     // bf16 elements per block of a panel
// Rows of inputs whose bf16 copy (rows x K) fits half the L2 share a pass over the thread's panels
// (fewer passes over the weights: 1 MB beat 512 KB by 5-25 % at K = 2048 and 5632, M = 1024).
constexpr int64_t kChunkBytes = int64_t(1) << 20;
// K beyond this many k blocks is done in slices, so that a long K (an MLP's down projection) still
// shares each pass over the weights among 16 row tiles rather than 4.
constexpr int64_t kSliceBlocks = 64;

// Where input row m's block kb starts (see above).
inline const uint16_t* input_at(const uint16_t* x, int64_t Kp, int64_t m, int64_t kb) {
  return x + (m / 16) * 16 * Kp + kb * kHalf + (m % 16) * kKBlock;
}
static_assert(kHalf == 512 && kKBlock == 32, "the layout of kernels.h's bf16_input_index");

inline __m512 dot_pairs(__m512 acc, __m512i pairs, __m512i w) {
  return _mm512_dpbf16_ps(acc, (__m512bh)pairs, (__m512bh)w);
}

// Adds the bias (or nothing) and writes rows x cols of a block from `c` (row stride cs) to y (row
// stride ldy).
void store_block(float* y, int64_t ldy, const float* c, int64_t cs, const float* bias, int64_t rows, int64_t cols) {
  for (int64_t j = 0; j < cols; j += 16) {
    const __mmask16 m = static_cast<__mmask16>(cols - j >= 16 ? 0xFFFF : (1u << (cols - j)) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(m, bias + j) : _mm512_setzero_ps();
    for (int64_t r = 0; r < rows; ++r) {
      __m512 v = _mm512_maskz_loadu_ps(m, c + r * cs + j);
      if (bias) v = _mm512_add_ps(v, b);
      _mm512_mask_storeu_ps(y + r * ldy + j, m, v);
    }
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

// Tiles 0-3: C (row tile i, column half h at 2i + h); 4-5: A (row tiles); 6-7: B (halves): all
// 16 rows of 64 bytes.
const TileConfig kLinearTiles{{16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}, {16, 64}};

// Tile loads that miss the caches wait for memory one after another, so a weight stream on tiles
// alone reached ~5 GB/s on one core; fetching the blocks a little ahead lets the loads overlap
// (measured: 2 blocks ahead into L1 beat 1, 4, 8 and 16, and L2 hints).
constexpr int64_t kPrefetchBlocks = 2;

inline void prefetch_block(const uint16_t* block) {  // the 2 KB of a panel's k block
  for (int line = 0; line < kBlock * 2 / 64; ++line)
    prefetch_l1(reinterpret_cast<const char*>(block) + 64 * line);
}

// Where a row-tile pair's panel fetches ahead from, and how many lines a k block into L2.
struct Ahead {
  const uint16_t* at = nullptr;
  int64_t l2_lines = 0;  // 0: a whole block into L1 each step (prefetch_block)
};

// MT (1 or 2) row tiles of 16 inputs (x: the first tile's blocks, the next tile's 16 Kp values
// further) times one panel: C = A . B over kblocks k blocks in order, starting from zero or, with
// `resume`, from the sums in c (32 rows of 32 floats), where it leaves them. Fetches ahead as
// `ahead` says (see Ahead).
template <int MT>
void tile_block(float* c, const uint16_t* x, int64_t Kp, const uint16_t* panel, int64_t kblocks,
                Ahead ahead, bool resume = false) {
  constexpr int64_t cs = kPanel * 4;  // bytes per row of c
  if (resume) {
    _tile_loadd(0, c, cs);
    _tile_loadd(1, c + 16, cs);
    if constexpr (MT == 2) {
      _tile_loadd(2, c + 16 * kPanel, cs);
      _tile_loadd(3, c + 16 * kPanel + 16, cs);
    }
  } else {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (MT == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  }
  const char* l2 = reinterpret_cast<const char*>(ahead.at);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t* b = panel + kb * kBlock;
    if (ahead.l2_lines) {
      for (int64_t i = 0; i < ahead.l2_lines; ++i) prefetch_l2(l2 + 64 * i);
      l2 += 64 * ahead.l2_lines;
    } else if (ahead.at) {
      prefetch_block(ahead.at + kb * kBlock);
    }
    _tile_loadd(4, x + kb * kHalf, 64);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + kHalf, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (MT == 2) {
      _tile_loadd(5, x + 16 * Kp + kb * kHalf, 64);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, c, cs);
  _tile_stored(1, c + 16, cs);
  if constexpr (MT == 2) {
    _tile_stored(2, c + 16 * kPanel, cs);
    _tile_stored(3, c + 16 * kPanel + 16, cs);
  }
}

// One row tile times two adjacent panels (c: 16 rows of 64 columns): two weight streams, which
// keep more of the memory bandwidth busy than one when the rows are few (decode).
void tile_block_2panels(float* c, const uint16_t* x, int64_t Kp, const uint16_t* panel, int64_t kblocks) {
  const uint16_t* panel2 = panel + kPanel * Kp;
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    const uint16_t *b = panel + kb * kBlock, *b2 = panel2 + kb * kBlock;
    prefetch_block(b + kPrefetchBlocks * kBlock);
    prefetch_block(b2 + kPrefetchBlocks * kBlock);
    _tile_loadd(4, x + kb * kHalf, 64);
    _tile_loadd(5, b, 64);
    _tile_loadd(6, b + kHalf, 64);
    _tile_loadd(7, b2, 64);
    _tile_dpbf16ps(0, 4, 5);
    _tile_dpbf16ps(1, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
    _tile_loadd(5, b2 + kHalf, 64);
    _tile_dpbf16ps(3, 4, 5);
  }
  constexpr int64_t cs = 2 * kPanel * 4;
  _tile_stored(0, c, cs);
  _tile_stored(1, c + 16, cs);
  _tile_stored(2, c + 32, cs);
  _tile_stored(3, c + 48, cs);
}

void run_bf16(float* y, const uint16_t* x, const uint16_t* w, const float* bias, int64_t M, int64_t ldy,
              int64_t K, int64_t n_begin, int64_t n_end) {
  const int64_t Kp = bf16_input_stride(K), kblocks = Kp / kKBlock;
  const int64_t row_tiles = (M + 15) / 16;
  if (row_tiles == 1) {
    alignas(64) float c[16 * 2 * kPanel];
    TileScope tiles(kLinearTiles);
    int64_t n0 = n_begin;
    for (; n0 + kPanel < n_end; n0 += 2 * kPanel) {
      tile_block_2panels(c, x, Kp, w + n0 * Kp, kblocks);
      store_block(y + n0, ldy, c, 2 * kPanel, bias ? bias + n0 : nullptr, M, std::min<int64_t>(2 * kPanel, n_end - n0));
    }
    for (; n0 < n_end; n0 += kPanel) {
      tile_block<1>(c, x, Kp, w + n0 * Kp, kblocks, Ahead{});
      store_block(y + n0, ldy, c, kPanel, bias ? bias + n0 : nullptr, M, std::min<int64_t>(kPanel, n_end - n0));
    }
    return;
  }
  const int64_t slice = std::min(kblocks, kSliceBlocks);
  // Up to a quarter more than the chunk in one pass (x 1.25 MB of a 2 MB L2) rather than a second
  // pass over the weights: passes of fewer than ~16 tiles wait on the weights' stream.
  const int64_t chunk_max = std::max<int64_t>(2, kChunkBytes / (16 * slice * kKBlock * 2)) & ~int64_t(1);
  const int64_t chunk = balanced_piece(row_tiles, (chunk_max + chunk_max / 4) & ~int64_t(1), 2);
  const int64_t panels = (n_end - n_begin + kPanel - 1) / kPanel;
  // The sums of every (tile pair, panel) of a chunk between K slices; grown once per thread.
  static thread_local runtime::AlignedVector<float> parked;
  if (slice < kblocks) parked.resize(std::max<size_t>(parked.size(), size_t(chunk / 2 * panels * 32 * kPanel)));
  float* const parked_at = parked.data();  // (a thread_local's address is a call: once, here)
  alignas(64) float c[32 * kPanel];
  TileScope tiles(kLinearTiles);
  for (int64_t t0 = 0; t0 < row_tiles; t0 += chunk) {
    const int64_t t1 = std::min(row_tiles, t0 + chunk), pairs = (t1 - t0 + 1) / 2;
    for (int64_t k0 = 0; k0 < kblocks; k0 += slice) {
      const int64_t kn = std::min(slice, kblocks - k0);
      const bool first = k0 == 0, last = k0 + kn == kblocks;
      // With 4 or more row tiles, every pair fetches its share of the next panel's slice into L2
      // as it goes (+10-25 % over the first pair fetching all of it into L1: those fetches
      // crowded the tile loads); with fewer, the first pair this panel's blocks a little ahead.
      const int64_t spread = (32 + pairs - 1) / pairs;  // lines a pair fetches per k block (of 32)
      for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanel) {
        const uint16_t* panel = w + n0 * Kp + k0 * kBlock;
        const int cols = static_cast<int>(std::min<int64_t>(kPanel, n_end - n0));
        float* park = parked_at + (n0 - n_begin) / kPanel * 32 * kPanel;
        for (int64_t t = t0; t < t1; t += 2) {
          const int64_t m0 = t * 16, p = (t - t0) / 2;
          const uint16_t* xt = x + m0 * Kp + k0 * kHalf;  // row tile t, from k block k0
          Ahead ahead;
          if (t1 - t0 < 4) {
            if (t == t0) ahead.at = panel + kPrefetchBlocks * kBlock;
          } else if (n0 + kPanel < n_end && p * spread < 32) {
            ahead.at = panel + kPanel * Kp + p * spread * kn * 32;
            ahead.l2_lines = std::min(spread, 32 - p * spread);
          }
          float* cb = first && last ? c : park + p * panels * 32 * kPanel;
          if (t + 1 < t1) tile_block<2>(cb, xt, Kp, panel, kn, ahead, !first);
          else tile_block<1>(cb, xt, Kp, panel, kn, ahead, !first);
          if (last)
            store_block(y + m0 * ldy + n0, ldy, cb, kPanel, bias ? bias + n0 : nullptr,
                        std::min<int64_t>(M - m0, t + 1 < t1 ? 32 : 16), cols);
        }
      }
    }
  }
}

#else  // avx512_bf16: vdpbf16ps, broadcasting each row's k pair against a half-block row

// Lines [first, first + count) of each k block of a panel that the caller fetches into L1 while
// it works on another (see run_bf16).
struct Ahead {
  const uint16_t* panel = nullptr;
  int first = 0, count = 0;
};

// MR input rows times P panels side by side (P weight streams for small M, the decode case).
template <int MR, int P>
void rows_times_panels(float* y, int64_t ldy, const uint16_t* x, int64_t m0, int64_t Kp, const uint16_t* panel,
                       const float* bias, int64_t rows, int64_t n0, int64_t n_end, Ahead ahead = {}) {
  __m512 acc[P][MR][2];
  for (int p = 0; p < P; ++p)
    for (int i = 0; i < MR; ++i) acc[p][i][0] = acc[p][i][1] = _mm512_setzero_ps();
  const int64_t kblocks = Kp / kKBlock;
  for (int64_t kb = 0; kb < kblocks; ++kb) {
    if (ahead.panel) {
      const char* next = reinterpret_cast<const char*>(ahead.panel + kb * kBlock);
      for (int line = ahead.first; line < ahead.first + ahead.count; ++line) prefetch_l1(next + 64 * line);
    }
    for (int r = 0; r < 16; ++r) {
      __m512i wv[P][2];
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const uint16_t* b = panel + p * Kp * kPanel + kb * kBlock + r * 32;
        wv[p][0] = _mm512_loadu_si512(b);
        wv[p][1] = _mm512_loadu_si512(b + kHalf);
      }
#pragma GCC unroll 12
      for (int i = 0; i < MR; ++i) {
        int32_t pair;
        std::memcpy(&pair, input_at(x, Kp, m0 + i, kb) + 2 * r, 4);
        const __m512i xv = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int p = 0; p < P; ++p) {
          acc[p][i][0] = dot_pairs(acc[p][i][0], xv, wv[p][0]);
          acc[p][i][1] = dot_pairs(acc[p][i][1], xv, wv[p][1]);
        }
      }
    }
  }
  alignas(64) float c[MR * kPanel];
  for (int p = 0; p < P; ++p) {
    const int64_t c0 = n0 + p * kPanel;
    if (c0 >= n_end) break;
    for (int i = 0; i < MR; ++i) {
      _mm512_store_ps(c + i * kPanel, acc[p][i][0]);
      _mm512_store_ps(c + i * kPanel + 16, acc[p][i][1]);
    }
    store_block(y + c0, ldy, c, kPanel, bias ? bias + c0 : nullptr, rows, std::min<int64_t>(kPanel, n_end - c0));
  }
}

template <int MR, int P>
void panels_loop(float* y, int64_t ldy, const uint16_t* x, int64_t Kp, const uint16_t* w, const float* bias,
                 int64_t rows, int64_t n_begin, int64_t n_end) {
  int64_t n0 = n_begin;
  for (; n0 + (P - 1) * kPanel < n_end; n0 += P * kPanel)
    rows_times_panels<MR, P>(y, ldy, x, 0, Kp, w + n0 * Kp, bias, rows, n0, n_end);
  // The last 1 .. P-1 panels side by side too (one weight stream per core reads slower).
  if constexpr (P > 1)
    if (n0 < n_end) panels_loop<MR, P - 1>(y, ldy, x, Kp, w, bias, rows, n0, n_end);
}

// One group of up to 12 rows against one panel, by the variant for its row count (fewer rows,
// fewer FMAs; each row's arithmetic is the same in every variant).
void row_group(float* y, int64_t ldy, const uint16_t* x, int64_t m, int64_t Kp, const uint16_t* panel,
               const float* bias, int64_t rows, int64_t n0, int64_t n1, Ahead ahead) {
  if (rows > 8) rows_times_panels<12, 1>(y, ldy, x, m, Kp, panel, bias, rows, n0, n1, ahead);
  else if (rows > 4) rows_times_panels<8, 1>(y, ldy, x, m, Kp, panel, bias, rows, n0, n1, ahead);
  else if (rows > 2) rows_times_panels<4, 1>(y, ldy, x, m, Kp, panel, bias, rows, n0, n1, ahead);
  else if (rows > 1) rows_times_panels<2, 1>(y, ldy, x, m, Kp, panel, bias, rows, n0, n1, ahead);
  else rows_times_panels<1, 1>(y, ldy, x, m, Kp, panel, bias, rows, n0, n1, ahead);
}

constexpr int kMr = 12;  // rows of the largest micro-kernel

// Rows per pass over the panels: the bf16 inputs of a pass (rows x K) fit kChunkBytes.
int64_t pass_rows(int64_t M, int64_t Kp) {
  return balanced_piece(M, std::max<int64_t>(kMr, kChunkBytes / (Kp * 2) / kMr * kMr), kMr);
}

// Each row group fetches its share of the panel that comes next as it goes, so that the weights'
// stream from memory overlaps the products rather than stalling the first group of each panel
// (decode batches: bench_linear 1536 x 576 at M = 32, 0.126 -> 0.085 ms; SmolLM2 decode of 16
// sequences 950 -> 1,440 tok/s on Zen 5). Into L1: fetching into L2 gained half as much.
Ahead share_of(const uint16_t* next, int64_t m0, int64_t m1, int64_t m) {
  const int64_t groups = (m1 - m0 + kMr - 1) / kMr;
  const int spread = static_cast<int>((32 + groups - 1) / groups);
  const int g = static_cast<int>((m - m0) / kMr);
  if (!next || g * spread >= 32) return {};
  return {next, g * spread, std::min(spread, 32 - g * spread)};
}

void run_bf16(float* y, const uint16_t* x, const uint16_t* w, const float* bias, int64_t M, int64_t ldy,
              int64_t K, int64_t n_begin, int64_t n_end) {
  const int64_t Kp = bf16_input_stride(K);
  switch (M) {  // registers: P x MR x 2 accumulators + 2P weights + a broadcast (32 zmm)
    case 1: return panels_loop<1, 4>(y, ldy, x, Kp, w, bias, 1, n_begin, n_end);
    case 2: return panels_loop<2, 4>(y, ldy, x, Kp, w, bias, 2, n_begin, n_end);
    case 3: return panels_loop<3, 2>(y, ldy, x, Kp, w, bias, 3, n_begin, n_end);
    case 4: return panels_loop<4, 2>(y, ldy, x, Kp, w, bias, 4, n_begin, n_end);
    default: break;
  }
  const int64_t chunk_rows = pass_rows(M, Kp);
  for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
    const int64_t m1 = std::min(M, m0 + chunk_rows);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanel) {
      const int64_t n1 = std::min(n_end, n0 + kPanel);
      const uint16_t* panel = w + n0 * Kp;
      const uint16_t* next = n0 + kPanel < n_end ? panel + kPanel * Kp : nullptr;
      for (int64_t m = m0; m < m1; m += kMr)
        row_group(y + m * ldy, ldy, x, m, Kp, panel, bias, std::min<int64_t>(kMr, m1 - m), n0, n1,
                  share_of(next, m0, m1, m));
    }
  }
}

// gate_up and SiLU.mul per panel: a pass's rows of gate panel j and up panel j side by side in
// `s` ([rows][gate 32 | up 32], the layout silu_and_mul takes), then silu_and_mul and the
// rounding into block j of down's input. The same kernels, sums and roundings as the Linear
// into gate_up, silu_and_mul and to_bf16_rows (bitwise, where inter % 16 == 0: silu_and_mul's
// scalar tail is not reached here); gate_up's fp32 rows never leave the thread's cache.
void gate_up_silu_run(uint16_t* out, const uint16_t* x, const uint16_t* gate, const uint16_t* up, int64_t M,
                      int64_t K, int64_t inter, int64_t p_begin, int64_t p_end) {
  const int64_t Kp = bf16_input_stride(K), Ip = bf16_input_stride(inter), chunk_rows = pass_rows(M, Kp);
  static thread_local runtime::AlignedVector<float> scratch;  // grows to the largest pass, then reused
  if (int64_t(scratch.size()) < chunk_rows * 3 * kPanel) scratch.resize(size_t(chunk_rows * 3 * kPanel));
  float* s = scratch.data();
  float* act = s + chunk_rows * 2 * kPanel;
  for (int64_t m0 = 0; m0 < M; m0 += chunk_rows) {
    const int64_t m1 = std::min(M, m0 + chunk_rows), rows = m1 - m0;
    for (int64_t j = p_begin; j < p_end; ++j) {
      const int64_t cols = std::min<int64_t>(kPanel, inter - j * kPanel);
      const uint16_t* panels[2] = {gate + j * kPanel * Kp, up + j * kPanel * Kp};
      const uint16_t* next[2] = {panels[1], j + 1 < p_end ? gate + (j + 1) * kPanel * Kp : nullptr};
      for (int h = 0; h < 2; ++h)
        for (int64_t m = m0; m < m1; m += kMr)
          row_group(s + (m - m0) * 2 * kPanel + h * kPanel, 2 * kPanel, x, m, Kp, panels[h], nullptr,
                    std::min<int64_t>(kMr, m1 - m), 0, cols, share_of(next[h], m0, m1, m));
      if (cols < kPanel)  // past inter: zeros (silu(0) * 0), as linear_input pads
        for (int64_t r = 0; r < rows; ++r)
          for (int h = 0; h < 2; ++h) std::fill_n(s + r * 2 * kPanel + h * kPanel + cols, kPanel - cols, 0.f);
      silu_and_mul(act, s, rows, kPanel);
      for (int64_t r = 0; r < rows; ++r) {
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_load_ps(act + r * kPanel + 16), _mm512_load_ps(act + r * kPanel));
        _mm512_storeu_si512(const_cast<uint16_t*>(input_at(out, Ip, m0 + r, j)), (__m512i)h);
      }
    }
  }
  for (int64_t m = M; m < bf16_input_rows(M); ++m)  // the tile's padding rows, as linear_input writes them
    for (int64_t j = p_begin; j < p_end; ++j)
      _mm512_storeu_si512(const_cast<uint16_t*>(input_at(out, Ip, m, j)), _mm512_setzero_si512());
}

#endif

}  // namespace

void pack_linear_bf16(uint16_t* dst, const uint16_t* w, int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  const int64_t Kp = bf16_input_stride(K);
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kPanel) {
    uint16_t* panel = dst + n0 * Kp;
    for (int64_t kb = 0; kb < Kp / kKBlock; ++kb)
      for (int h = 0; h < 2; ++h)
        for (int r = 0; r < 16; ++r)
          for (int c = 0; c < 16; ++c)
            for (int j = 0; j < 2; ++j) {
              const int64_t n = n0 + 16 * h + c, k = kb * kKBlock + 2 * r + j;
              panel[kb * kBlock + h * kHalf + r * 32 + 2 * c + j] = n < N && k < K ? w[n * K + k] : uint16_t(0);
            }
  }
}

void linear_bf16(float* y, const uint16_t* x, const uint16_t* w, const float* bias, int64_t M, int64_t ldy,
                 int64_t K, int64_t n_begin, int64_t n_end) {
  run_bf16(y, x, w, bias, M, ldy, K, n_begin, n_end);
}

bool gate_up_silu_bf16(uint16_t* out, const uint16_t* x, const uint16_t* gate, const uint16_t* up, int64_t M,
                       int64_t K, int64_t inter, int64_t p_begin, int64_t p_end) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  (void)out, (void)x, (void)gate, (void)up, (void)M, (void)K, (void)inter, (void)p_begin, (void)p_end;
  return false;  // the tiles' passes are another code; the Linear and silu_and_mul run apart
#else
  // Decode batches (M <= 4) read several panels side by side (run_bf16's panels_loop): unfused.
  if (M <= 4) return false;
  if (p_begin < p_end) gate_up_silu_run(out, x, gate, up, M, K, inter, p_begin, p_end);
  return true;
#endif
}

void to_bf16_rows(uint16_t* dst, const float* x, int64_t M, int64_t K) {
  const int64_t Kp = bf16_input_stride(K), Mp = bf16_input_rows(M), full = K / kKBlock;
  // Every element through the same rounding (to nearest even): whole blocks 32 at a time, the
  // tail masked, padding rows zero.
  for (int64_t m = 0; m < Mp; ++m) {
    uint16_t* d = const_cast<uint16_t*>(input_at(dst, Kp, m, 0));
    const float* xm = x + m * K;
    int64_t kb = 0;
    if (m < M)
      for (; kb < full; ++kb) {
        const __m512bh h = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(xm + kb * kKBlock + 16), _mm512_loadu_ps(xm + kb * kKBlock));
        _mm512_storeu_si512(d + kb * kHalf, (__m512i)h);
      }
    for (; kb < Kp / kKBlock; ++kb)
      for (int64_t k = kb * kKBlock; k < (kb + 1) * kKBlock; k += 16) {
        const int64_t n = m < M ? std::clamp<int64_t>(K - k, 0, 16) : 0;
        const __mmask16 mask = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1);
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mask, xm + k));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(d + kb * kHalf + k - kb * kKBlock), (__m256i)h);
      }
  }
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
