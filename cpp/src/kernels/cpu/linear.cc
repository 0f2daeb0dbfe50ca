// Linear layers y = x . W^T (+ bias), compiled once per ISA level.
//
// Weights are packed once at load (pack_linear) into panels of kNr = 2 * kLanes output
// columns: panel p holds columns [p * kNr, p * kNr + kNr) (zeros past N) as K rows of kNr
// values, row k holding w[n][k] for the panel's n, in the checkpoint's dtype (bf16 stays bf16:
// a decode step streams half the bytes). Multiplying is then a run of broadcast FMAs of one
// input value into two vectors of output columns, and a decode step reads each panel as one
// sequential stream (many short weight rows read side by side, as Hugging Face's [out, in]
// layout gives, left the hardware prefetcher behind: ~65 % of the bandwidth at K = 768).
//
// Every output is one FMA chain over k = 0 .. K-1 in order, then the bias is added. Nothing in
// that depends on M, on the other rows or on how the columns are split, so the results are
// bitwise batch-invariant for free; the blocking below only decides when each step runs.
#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/linear_bf16.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {

constexpr int kNr = 2 * kLanes;  // output columns per panel (two vectors)
// Input rows per micro-tile: kMr x 2 accumulators, 2 weight vectors and a broadcast must fit in
// the register file (32 zmm / 16 ymm).
constexpr int kMr = kLanes == 16 ? 12 : 6;
// k steps per piece: a panel's piece (kChunk x kNr values) stays in L1 while a group of tiles
// passes over it.
constexpr int64_t kChunk = 192;
// Tiles per group: their accumulators stay in L1 across the pieces.
constexpr int64_t kGroupTiles = 8;

// Panel columns [n0, n0 + cols) of w (cols <= kNr; the rest zero), transposed kLanes x kLanes
// at a time into K rows of kNr.
template <class W>
void pack_panel(W* dst, const W* w, int64_t K, int64_t n0, int cols) {
  const int64_t kv = K - K % kLanes;
  for (int h = 0; h < 2; ++h) {
    const int valid = std::clamp(cols - h * kLanes, 0, kLanes);
    const W* rows = w + (n0 + h * kLanes) * K;
    W* out = dst + h * kLanes;
    for (int64_t k = 0; k < kv; k += kLanes) {
      Vec r[kLanes];
      const W* src = rows + k;
#pragma GCC unroll 16
      for (int c = 0; c < kLanes; ++c, src += K) r[c] = c < valid ? vload_as_f32(src) : vzero();
      vtranspose(r);
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j) vstore_as(out + (k + j) * kNr, r[j]);
    }
    for (int64_t k = kv; k < K; ++k)
      for (int c = 0; c < kLanes; ++c) out[k * kNr + c] = c < valid ? rows[c * K + k] : W(0);
  }
}

// The micro-kernel variant a tile of `rows` input rows runs: fewer rows, fewer FMAs. Each row's
// arithmetic is the same in every variant.
inline int tile_width(int64_t rows) {
  if (rows == 1) return 1;
  if (rows == 2) return 2;
  if (rows <= kMr / 3) return kMr / 3;
  if (rows <= 2 * kMr / 3) return 2 * kMr / 3;
  return kMr;
}

using Tile = Vec[kMr][2];

// acc[r][v] += x[r * ldx + s] * w[s][v] over `steps` k steps, for rows r < MR. The inputs are
// read where they lie: packing them into a tile layout cost a pass over all M rows for every
// chunk of panels a thread claimed (~8 a call), half the Linear's time in a long prefill,
// against no measurable gain per FMA. With `ahead` set, also prefetches one weight row per step
// from there (the next piece).
template <int MR, class W, class A>
inline void fma_steps(Tile& acc, const float* x, int64_t ldx, const W* wp, int64_t steps, const A* ahead) {
  // Rows in threes from one base pointer each, addressed as base + ldx * 4 or * 8: left to
  // itself GCC made every row its own induction pointer, and twelve of them spilled to the stack
  // (five reloads a step). The empty asm keeps the bases opaque so that it cannot.
  static_assert(MR <= 12);
  const float* b0 = x;
  const float* b1 = MR > 3 ? x + 3 * ldx : x;
  const float* b2 = MR > 6 ? x + 6 * ldx : x;
  const float* b3 = MR > 9 ? x + 9 * ldx : x;
  Vec a[MR][2];  // a local copy: the input rows' loads cannot alias it
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) a[r][0] = acc[r][0], a[r][1] = acc[r][1];
  for (int64_t s = 0; s < steps; ++s, wp += kNr) {
    asm("" : "+r"(b0));
    if constexpr (MR > 3) asm("" : "+r"(b1));
    if constexpr (MR > 6) asm("" : "+r"(b2));
    if constexpr (MR > 9) asm("" : "+r"(b3));
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + s * kNr), _MM_HINT_T0);
    const Vec w0 = vload_as_f32(wp), w1 = vload_as_f32(wp + kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const float* b = r < 3 ? b0 : r < 6 ? b1 : r < 9 ? b2 : b3;
      const Vec xv = vset1(b[(r % 3) * ldx]);
      a[r][0] = vfma(xv, w0, a[r][0]);
      a[r][1] = vfma(xv, w1, a[r][1]);
    }
    ++b0, ++b1, ++b2, ++b3;
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r) acc[r][0] = a[r][0], acc[r][1] = a[r][1];
}

template <class W, class A>
inline void fma_tile(Tile& acc, const float* x, int64_t ldx, const W* wp, int64_t steps, int width, const A* ahead) {
  if (width == 1) fma_steps<1>(acc, x, ldx, wp, steps, ahead);
  else if (width == 2) fma_steps<2>(acc, x, ldx, wp, steps, ahead);
  else if (width == kMr / 3) fma_steps<kMr / 3>(acc, x, ldx, wp, steps, ahead);
  else if (width == 2 * kMr / 3) fma_steps<2 * kMr / 3>(acc, x, ldx, wp, steps, ahead);
  else fma_steps<kMr>(acc, x, ldx, wp, steps, ahead);
}

// Adds the bias (padded to kNr, or null) and stores rows x cols of the tile into y (row stride N).
void store_output(float* y, int64_t N, Tile& acc, const float* bias, int64_t rows, int cols) {
  for (int64_t r = 0; r < rows; ++r) {
    if (bias) {
      acc[r][0] = vadd(acc[r][0], vload(bias));
      acc[r][1] = vadd(acc[r][1], vload(bias + kLanes));
    }
    if (cols == kNr) {
      vstore(y + r * N, acc[r][0]);
      vstore(y + r * N + kLanes, acc[r][1]);
    } else {
      vstore_first(y + r * N, acc[r][0], std::min(cols, kLanes));
      if (cols > kLanes) vstore_first(y + r * N + kLanes, acc[r][1], cols - kLanes);
    }
  }
}

// One panel against rows [0, rows) of x (kMr-row tiles; `tail`, when given, holds the last
// partial tile's rows zero-padded to its width, row stride K): for each group of tiles, piece by
// piece, each tile's chains resume from `state` (an exact fp32 store and load) so the arithmetic
// is one chain per output whatever the blocking. With several tiles in a group, a bf16 piece is
// widened once into `wide` rather than by every tile.
template <class W>
void panel_times_rows(float* y, int64_t N, const float* x, const float* tail, const W* wp, int64_t K,
                      const float* bias, int64_t rows, int cols, float* state, float* wide) {
  const int64_t tiles = (rows + kMr - 1) / kMr;
  for (int64_t g0 = 0; g0 < tiles; g0 += kGroupTiles) {
    const int64_t g1 = std::min(tiles, g0 + kGroupTiles);
    for (int64_t off = 0; off < K; off += kChunk) {
      const int64_t steps = std::min(kChunk, K - off);
      const W* piece = wp + off * kNr;
      const bool widen = sizeof(W) == 2 && g1 - g0 > 1;
      if (widen)
        for (int64_t i = 0; i < steps * kNr; i += kLanes) vstore(wide + i, vload_as_f32(piece + i));
      for (int64_t t = g0; t < g1; ++t) {
        const int64_t tile_rows = std::min<int64_t>(kMr, rows - t * kMr);
        const int width = tile_width(tile_rows);
        float* st = state + (t - g0) * kMr * kNr;
        Tile acc;
        for (int r = 0; r < width; ++r)
          for (int v = 0; v < 2; ++v) acc[r][v] = off == 0 ? vzero() : vload(st + r * kNr + v * kLanes);
        const float* xt = (tile_rows < width ? tail : x + t * kMr * K) + off;
        // The first tile of the first group fetches the next piece (or panel: they follow in
        // memory) while it computes, so the weight stream overlaps the FMAs.
        const W* ahead = t == 0 ? piece + steps * kNr : nullptr;
        if (widen) fma_tile(acc, xt, K, wide, steps, width, ahead);
        else fma_tile(acc, xt, K, piece, steps, width, ahead);
        if (off + steps < K) {
          for (int r = 0; r < width; ++r)
            for (int v = 0; v < 2; ++v) vstore(st + r * kNr + v * kLanes, acc[r][v]);
        } else {
          store_output(y + t * kMr * N, N, acc, bias, tile_rows, cols);
        }
      }
    }
  }
}

// Up to 6 rows straight from x, P panels side by side: P sequential weight streams and
// P x MR x 2 independent chains per thread keep enough loads in flight for one decode row (a
// single panel stream per core reached ~75 % of what several do; 6 were no better, and software
// prefetching on top made it slower). Each output's chain is the same as in panel_times_rows.
template <int MR, int P, class W>
void rows_times_panels(float* y, int64_t N, const float* x, const W* wp, const float* bias, int64_t K,
                       int64_t n0, int64_t n_end) {
  Vec acc[P][MR][2];
  for (int p = 0; p < P; ++p)
    for (int r = 0; r < MR; ++r) acc[p][r][0] = acc[p][r][1] = vzero();
  const W* w[P];
  for (int p = 0; p < P; ++p) w[p] = wp + p * K * kNr;
  for (int64_t k = 0; k < K; ++k) {
    // The rows' broadcasts first, then one panel's two weight vectors at a time: MR + 2
    // registers besides the accumulators (not 2P + 1), which lets 2-4 rows run 3-4 panels.
    Vec xv[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) xv[r] = vset1(x[r * K + k]);
#pragma GCC unroll 8
    for (int p = 0; p < P; ++p) {
      const Vec w0 = vload_as_f32(w[p] + k * kNr), w1 = vload_as_f32(w[p] + k * kNr + kLanes);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        acc[p][r][0] = vfma(xv[r], w0, acc[p][r][0]);
        acc[p][r][1] = vfma(xv[r], w1, acc[p][r][1]);
      }
    }
  }
  for (int p = 0; p < P; ++p) {
    const int64_t c0 = n0 + p * kNr;
    if (c0 >= n_end) break;
    const int cols = static_cast<int>(std::min<int64_t>(kNr, n_end - c0));
    float bias_pad[kNr] = {};
    if (bias) std::copy(bias + c0, bias + c0 + cols, bias_pad);
    Tile tile;
    for (int r = 0; r < MR; ++r) tile[r][0] = acc[p][r][0], tile[r][1] = acc[p][r][1];
    store_output(y + c0, N, tile, bias ? bias_pad : nullptr, MR, cols);
  }
}

template <int MR, int P, class W>
void small_m(float* y, const float* x, const W* w, const float* bias, int64_t N, int64_t K, int64_t n_begin,
             int64_t n_end) {
  int64_t n0 = n_begin;
  for (; n0 + (P - 1) * kNr < n_end; n0 += P * kNr) rows_times_panels<MR, P>(y, N, x, w + n0 * K, bias, K, n0, n_end);
  // The last 1 .. P-1 panels side by side too: one at a time, a thread's single weight stream
  // read at ~75 % of the rate of several (40 % of a SmolLM2 decode step ran so).
  if constexpr (P > 1)
    if (n0 < n_end) small_m<MR, P - 1>(y, x, w, bias, N, K, n0, n_end);
}

// A per-thread buffer that grows to the largest request and is then reused; 64-byte aligned so
// that no vector load splits a cache line.
float* scratch(std::vector<float>& buf, int64_t floats) {
  if (static_cast<int64_t>(buf.size()) < floats + 16) buf.resize(floats + 16);
  const auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - addr % 64) % 64) / sizeof(float);
}

template <class W>
void run(float* y, const float* x, const W* w, const float* bias, int64_t M, int64_t N, int64_t K,
         int64_t n_begin, int64_t n_end) {
  // Registers: P x MR x 2 accumulators + MR broadcasts + 2 weights (32 zmm / 16 ymm).
  constexpr bool kWide = kLanes == 16;
  switch (M) {
    case 1: return small_m<1, 4>(y, x, w, bias, N, K, n_begin, n_end);
    case 2: return small_m<2, kWide ? 4 : 2>(y, x, w, bias, N, K, n_begin, n_end);
    case 3: return small_m<3, kWide ? 4 : 1>(y, x, w, bias, N, K, n_begin, n_end);
    case 4: return small_m<4, kWide ? 3 : 1>(y, x, w, bias, N, K, n_begin, n_end);
    // 5 and 6 rows: the tiled path would run them as an 8-row tile, one panel at a time.
    case 5: if constexpr (kWide) return small_m<5, 2>(y, x, w, bias, N, K, n_begin, n_end); else break;
    case 6: if constexpr (kWide) return small_m<6, 2>(y, x, w, bias, N, K, n_begin, n_end); else break;
    default: break;
  }
  thread_local std::vector<float> tail_buf, state_buf, wide_buf;
  float* state = scratch(state_buf, kGroupTiles * kMr * kNr);
  float* wide = scratch(wide_buf, kChunk * kNr);
  // The last tile, when partial, zero-padded to its micro-kernel's width (the others read x).
  const int64_t tail_rows = M % kMr, tail_width = tail_rows ? tile_width(tail_rows) : 0;
  float* tail = nullptr;
  if (tail_rows < tail_width) {
    tail = scratch(tail_buf, tail_width * K);
    std::copy(x + (M - tail_rows) * K, x + M * K, tail);
    std::fill(tail + tail_rows * K, tail + tail_width * K, 0.f);
  }
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNr) {
    const int cols = static_cast<int>(std::min<int64_t>(kNr, n_end - n0));
    float bias_pad[kNr] = {};
    if (bias) std::copy(bias + n0, bias + n0 + cols, bias_pad);
    panel_times_rows(y + n0, N, x, tail, w + n0 * K, K, bias ? bias_pad : nullptr, M, cols, state, wide);
  }
}

}  // namespace

int64_t linear_panel() { return kNr; }

// bf16 weights on a level with bf16 dot products compute in bf16 (linear_bf16.cc, panels of 32
// columns = kNr on AVX-512); everything else here, in fp32.
#if defined(__AVX512BF16__)
constexpr bool kBf16Dot = true;
#else
constexpr bool kBf16Dot = false;
#endif

int64_t packed_linear_elems(bool w_bf16, int64_t N, int64_t K) {
  return linear_panels(kNr, N) * kNr * (kBf16Dot && w_bf16 ? bf16_input_stride(K) : K);
}

void pack_linear(void* dst, const void* w, bool w_bf16, int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  if (n_begin % kNr != 0)
    throw std::invalid_argument("pack_linear: n_begin " + std::to_string(n_begin) + " is not a multiple of the panel width " +
                                std::to_string(kNr));
#if defined(__AVX512BF16__)
  if (w_bf16) return pack_linear_bf16(static_cast<uint16_t*>(dst), static_cast<const uint16_t*>(w), N, K, n_begin, n_end);
#endif
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kNr) {
    const int cols = static_cast<int>(std::min<int64_t>(kNr, N - n0));
    if (w_bf16) pack_panel(static_cast<uint16_t*>(dst) + n0 * K, static_cast<const uint16_t*>(w), K, n0, cols);
    else pack_panel(static_cast<float*>(dst) + n0 * K, static_cast<const float*>(w), K, n0, cols);
  }
}

void linear(float* y, const void* x, const void* w, bool w_bf16, const float* bias, int64_t M, int64_t N, int64_t K,
            int64_t n_begin, int64_t n_end) {
  if (n_begin >= n_end || M <= 0) return;
  if (n_begin % kNr != 0)
    throw std::invalid_argument("linear: n_begin " + std::to_string(n_begin) + " is not a multiple of the panel width " +
                                std::to_string(kNr));
#if defined(__AVX512BF16__)
  if (w_bf16)
    return linear_bf16(y, static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(w), bias, M, N, K, n_begin, n_end);
#endif
  const float* xf = static_cast<const float*>(x);
  if (w_bf16) run(y, xf, static_cast<const uint16_t*>(w), bias, M, N, K, n_begin, n_end);
  else run(y, xf, static_cast<const float*>(w), bias, M, N, K, n_begin, n_end);
}

bool gate_up_silu(uint16_t* out, const void* x, const void* gate, const void* up, int64_t M, int64_t K, int64_t inter,
                  int64_t p_begin, int64_t p_end) {
#if defined(__AVX512BF16__)
  return gate_up_silu_bf16(out, static_cast<const uint16_t*>(x), static_cast<const uint16_t*>(gate),
                           static_cast<const uint16_t*>(up), M, K, inter, p_begin, p_end);
#else
  (void)out, (void)x, (void)gate, (void)up, (void)M, (void)K, (void)inter, (void)p_begin, (void)p_end;
  return false;  // fp32 compute: gate_up and silu_and_mul run apart
#endif
}

void linear_input(uint16_t* dst, const float* x, int64_t M, int64_t K) {
#if defined(__AVX512BF16__)
  to_bf16_rows(dst, x, M, K);
#else
  ref::linear_input(dst, x, M, K);  // the layout only: no level below avx512_bf16 computes in bf16
#endif
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
