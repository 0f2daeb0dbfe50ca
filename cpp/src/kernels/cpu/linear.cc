// Linear layers y = x . W^T (+ bias), compiled once per ISA level, in two flavours.
//
// linear (batch-invariant): every output is reduced in one fixed order, whatever M, the row's
// position or the split of n: lane j of a kLanes-wide accumulator runs one FMA chain over
// k = j (mod kLanes) in increasing k; the lanes are added by vsum's halving tree; the
// K % kLanes tail is FMA'd on in k order; then the bias is added. Small M runs that directly
// (register tiles of input rows x weight rows, each weight row read once per pass, so decode
// runs at the speed of reading the weights). Large M runs the very same arithmetic as a packed
// GEMM: x and a panel of weight columns are packed with k permuted to (k % kLanes, k / kLanes),
// which turns each lane's chain into a run of broadcast FMAs over a vector of output columns,
// and the kLanes chain results are then added by the same halving tree on whole vectors.
//
// linear_packed: the same packed GEMM in natural k order (one chain per output over all of K),
// which skips the lane bookkeeping; its rounding differs from linear's in the last bits, and it
// takes the direct path for small M, so its results depend on M.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {

// ---- direct path: lane-split dot products, R input rows x C weight rows in registers ------

// Weight rows per block of the direct path: the block stays in L2 while each group of input
// rows passes over it, so the weights come from memory once per call.
constexpr int64_t kDirectBlockRows = 64;

template <class W, int R, int C>
void direct_tile(float* y, const float* x, const W* w, const float* bias, int64_t N, int64_t K,
                 int64_t n) {
  const int64_t kv = K - K % kLanes;
  Vec acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = vzero();
  for (int64_t k = 0; k < kv; k += kLanes) {
    Vec wv[C];
    for (int c = 0; c < C; ++c) wv[c] = vload_as_f32(w + (n + c) * K + k);
    for (int r = 0; r < R; ++r) {
      const Vec xv = vload(x + r * K + k);
      for (int c = 0; c < C; ++c) acc[r][c] = vfma(xv, wv[c], acc[r][c]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      float s = vsum(acc[r][c]);
      // std::fma, not a * b + s: the packed path does this step with vector FMAs.
      for (int64_t k = kv; k < K; ++k) s = std::fma(x[r * K + k], scalar_as_f32(w + (n + c) * K + k), s);
      if (bias) s += bias[n + c];
      y[r * N + n + c] = s;
    }
}

template <class W, int R>
void direct_rows(float* y, const float* x, const W* w, const float* bias, int64_t N, int64_t K,
                 int64_t n_begin, int64_t n_end) {
  // Decode (R = 1): 8 independent FMA chains. AVX2 has 16 registers: R x C accumulators + C
  // weights + 1 input must fit.
  constexpr int C = R == 1 ? 8 : (kLanes == 16 ? 4 : 2);
  int64_t n = n_begin;
  for (; n + C <= n_end; n += C) direct_tile<W, R, C>(y, x, w, bias, N, K, n);
  for (; n < n_end; ++n) direct_tile<W, R, 1>(y, x, w, bias, N, K, n);
}

template <class W>
void direct(float* y, const float* x, const W* w, const float* bias, int64_t M, int64_t N,
            int64_t K, int64_t n_begin, int64_t n_end) {
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kDirectBlockRows) {
    const int64_t n1 = std::min(n_end, n0 + kDirectBlockRows);
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) direct_rows<W, 4>(y + m * N, x + m * K, w, bias, N, K, n0, n1);
    switch (M - m) {
      case 3: direct_rows<W, 3>(y + m * N, x + m * K, w, bias, N, K, n0, n1); break;
      case 2: direct_rows<W, 2>(y + m * N, x + m * K, w, bias, N, K, n0, n1); break;
      case 1: direct_rows<W, 1>(y + m * N, x + m * K, w, bias, N, K, n0, n1); break;
      default: break;
    }
  }
}

// ---- packed path: broadcast-FMA micro-kernel over packed panels ----------------------------

constexpr int kNr = 2 * kLanes;  // output columns per panel (two vectors)
// Input rows per micro-tile: kMr x 2 accumulators, 2 weight vectors and a broadcast must fit in
// the register file (32 zmm / 16 ymm).
constexpr int kMr = kLanes == 16 ? 12 : 6;
// At and above this M, linear and linear_packed run the packed path (below it, packing the
// weight panels costs more than re-reading them from L2 in the direct path: measured).
constexpr int64_t kPackedMinRows = 16;

// Packed k position of k: lanesplit puts the chain of lane k % kLanes in one contiguous run.
inline int64_t packed_k(int64_t k, int64_t kv, bool lanesplit) {
  return lanesplit && k < kv ? (k % kLanes) * (kv / kLanes) + k / kLanes : k;
}

// Weight columns [n0, n0 + cols) (cols <= kNr, the rest zero) as rows of kNr fp32: row
// packed_k(k) holds w[n0 .. n0 + kNr)[k]. Transposed kLanes x kLanes at a time.
template <class W>
void pack_panel(float* dst, const W* w, int64_t K, int64_t n0, int cols, bool lanesplit) {
  const int64_t kv = K - K % kLanes, chain = kv / kLanes;
  for (int h = 0; h < 2; ++h) {
    const int valid = std::clamp(cols - h * kLanes, 0, kLanes);
    const W* rows = w + (n0 + h * kLanes) * K;
    float* out = dst + h * kLanes;
    for (int64_t k = 0; k < kv; k += kLanes) {
      Vec r[kLanes];
      const W* src = rows + k;
#pragma GCC unroll 16
      for (int c = 0; c < kLanes; ++c, src += K) r[c] = c < valid ? vload_as_f32(src) : vzero();
      vtranspose(r);
      // Row packed_k(k + j): k + j for linear_packed, j * chain + k / kLanes for linear.
      float* o = out + (lanesplit ? k / kLanes : k) * kNr;
      const int64_t step = (lanesplit ? chain : 1) * kNr;
#pragma GCC unroll 16
      for (int j = 0; j < kLanes; ++j, o += step) vstore(o, r[j]);
    }
    for (int64_t k = kv; k < K; ++k)
      for (int c = 0; c < kLanes; ++c) out[k * kNr + c] = c < valid ? scalar_as_f32(rows + c * K + k) : 0.f;
  }
}

// Packed k steps per pass of a tile over a panel: the panel's rows for one piece (kChunk x kNr
// fp32) stay in L1 while a group of tiles passes over them.
constexpr int64_t kChunk = 192;
// Tiles per group: their chain states stay in L1/L2 across the pieces.
constexpr int64_t kGroupTiles = 8;

// How one pass (`tiles` tiles of kMr rows) cuts the packed k positions: `chains` runs of `chain`
// positions (kLanes lane chains for linear, one for linear_packed), each cut into pieces of up
// to kChunk, then the tail [chains * chain, K). The packed inputs are stored piece-major (all
// tiles' rows for a piece together, tile after tile), so a group's inputs for a piece are one
// sequential stream.
struct Plan {
  int64_t K, chains, chain, tiles;

  Plan(int64_t K_, bool lanesplit, int64_t tiles_)
      : K(K_), chains(lanesplit ? kLanes : 1), chain(lanesplit ? K_ / kLanes : K_), tiles(tiles_) {}
  int64_t chained() const { return chains * chain; }
  // The piece [off, off + steps) holding packed position p.
  void piece(int64_t p, int64_t& off, int64_t& steps) const {
    if (p >= chained()) {
      off = chained();
      steps = K - off;
      return;
    }
    const int64_t c = p / chain, c0 = (p - c * chain) / kChunk * kChunk;
    off = c * chain + c0;
    steps = std::min(kChunk, chain - c0);
  }
  // Where tile t's inputs for the piece at `off` start, in floats.
  int64_t x_at(int64_t off, int64_t steps, int64_t t) const { return (off * tiles + t * steps) * kMr; }
};

// Input rows [0, rows) of x (rows <= kMr; the rest zero) as tile t of the pass: position
// packed_k(k) of row r at x_at(piece) + (packed_k(k) - off) * kMr + r. Transposed kLanes x kLanes
// at a time like the panels.
void pack_rows(float* xp, const Plan& plan, int64_t t, const float* x, int64_t rows, bool lanesplit) {
  static_assert(kMr <= kLanes);
  const int64_t K = plan.K, kv = K - K % kLanes;
  int64_t off, steps;
  for (int64_t k = 0; k < kv; k += kLanes) {
    Vec r[kLanes];
#pragma GCC unroll 16
    for (int i = 0; i < kLanes; ++i) r[i] = i < rows ? vload(x + i * K + k) : vzero();
    vtranspose(r);
#pragma GCC unroll 16
    for (int j = 0; j < kLanes; ++j) {
      const int64_t p = packed_k(k + j, kv, lanesplit);
      plan.piece(p, off, steps);
      vstore_first(xp + plan.x_at(off, steps, t) + (p - off) * kMr, r[j], kMr);
    }
  }
  for (int64_t k = kv; k < K; ++k) {
    plan.piece(k, off, steps);
    for (int i = 0; i < kMr; ++i) xp[plan.x_at(off, steps, t) + (k - off) * kMr + i] = i < rows ? x[i * K + k] : 0.f;
  }
}

using Tile = Vec[kMr][2];

// acc[r][v] += x_r[s] * w[s][v] over `steps` packed k positions, for rows r < MR.
template <int MR>
inline void fma_steps(Tile& acc, const float* xp, const float* wp, int64_t steps) {
  for (int64_t s = 0; s < steps; ++s, xp += kMr, wp += kNr) {
    const Vec w0 = vload(wp), w1 = vload(wp + kLanes);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const Vec xv = vset1(xp[r]);
      acc[r][0] = vfma(xv, w0, acc[r][0]);
      acc[r][1] = vfma(xv, w1, acc[r][1]);
    }
  }
}

// fma_steps for a tile holding `rows` input rows: a partly filled last tile (M = 16 is one full
// tile and 4 rows) runs a third or two thirds of the micro-kernel. Each row's arithmetic is the
// same whichever is used.
inline void fma_rows(Tile& acc, const float* xp, const float* wp, int64_t steps, int64_t rows) {
  if (rows <= kMr / 3) fma_steps<kMr / 3>(acc, xp, wp, steps);
  else if (rows <= 2 * kMr / 3) fma_steps<2 * kMr / 3>(acc, xp, wp, steps);
  else fma_steps<kMr>(acc, xp, wp, steps);
}

inline void load_tile(Tile& acc, const float* p) {
  for (int r = 0; r < kMr; ++r) {
    acc[r][0] = vload(p + r * kNr);
    acc[r][1] = vload(p + r * kNr + kLanes);
  }
}

inline void store_tile(float* p, const Tile& acc) {
  for (int r = 0; r < kMr; ++r) {
    vstore(p + r * kNr, acc[r][0]);
    vstore(p + r * kNr + kLanes, acc[r][1]);
  }
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

// One panel of columns against the pass's packed rows. Each output's FMA chains run piece by
// piece, their state kept in `part` between pieces (which does not change their arithmetic);
// then the chains are combined by vsum's halving tree, the tail is FMA'd on in k order, and the
// bias added.
void panel_times_rows(float* y, int64_t N, const float* xp, const float* wp, const Plan& plan,
                      const float* bias, int64_t rows, int cols, float* part) {
  constexpr int64_t tile_floats = kMr * kNr;
  const int64_t chains = plan.chains, chain = plan.chain;
  auto tile_rows = [&](int64_t t) { return std::min<int64_t>(kMr, rows - t * kMr); };
  for (int64_t g0 = 0; g0 < plan.tiles; g0 += kGroupTiles) {
    const int64_t g1 = std::min(plan.tiles, g0 + kGroupTiles);
    for (int64_t c = 0; c < chains; ++c)
      for (int64_t c0 = 0; c0 == 0 || c0 < chain; c0 += kChunk) {  // once if chain == 0
        const int64_t steps = std::min(kChunk, chain - c0), off = c * chain + c0;
        for (int64_t t = g0; t < g1; ++t) {
          float* pt = part + ((t - g0) * chains + c) * tile_floats;
          Tile acc;
          if (c0 == 0) {
            for (auto& row : acc) row[0] = row[1] = vzero();
          } else {
            load_tile(acc, pt);
          }
          fma_rows(acc, xp + plan.x_at(off, steps, t), wp + off * kNr, steps, tile_rows(t));
          store_tile(pt, acc);
        }
      }
    for (int64_t t = g0; t < g1; ++t) {
      float* pt = part + (t - g0) * chains * tile_floats;
      for (int64_t h = chains / 2; h >= 1; h /= 2)
        for (int64_t c = 0; c < h; ++c)
          for (int64_t i = 0; i < tile_floats; i += kLanes)
            vstore(pt + c * tile_floats + i,
                   vadd(vload(pt + c * tile_floats + i), vload(pt + (c + h) * tile_floats + i)));
      Tile acc;
      load_tile(acc, pt);
      const int64_t off = plan.chained(), steps = plan.K - off;
      fma_rows(acc, xp + plan.x_at(off, steps, t), wp + off * kNr, steps, tile_rows(t));
      store_output(y + t * kMr * N, N, acc, bias, tile_rows(t), cols);
    }
  }
}

// A per-thread buffer that grows to the largest request and is then reused; 64-byte aligned so
// that no packed vector load splits a cache line.
float* scratch(std::vector<float>& buf, int64_t floats) {
  if (static_cast<int64_t>(buf.size()) < floats + 16) buf.resize(floats + 16);
  const auto addr = reinterpret_cast<uintptr_t>(buf.data());
  return buf.data() + ((64 - addr % 64) % 64) / sizeof(float);
}

// The packed input rows of one pass are capped at this many floats (a thread_local buffer).
constexpr int64_t kMaxPackedX = int64_t(1) << 21;

template <class W>
void packed(float* y, const float* x, const W* w, const float* bias, int64_t M, int64_t N,
            int64_t K, int64_t n_begin, int64_t n_end, bool lanesplit) {
  thread_local std::vector<float> x_buf, w_buf, part_buf;
  const int64_t tiles_per_pass = std::max<int64_t>(1, kMaxPackedX / (K * kMr));
  float* wp = scratch(w_buf, kNr * K);
  float* part = scratch(part_buf, kGroupTiles * (lanesplit ? kLanes : 1) * kMr * kNr);
  for (int64_t m0 = 0; m0 < M; m0 += tiles_per_pass * kMr) {
    const int64_t rows = std::min(M - m0, tiles_per_pass * kMr);
    const Plan plan(K, lanesplit, (rows + kMr - 1) / kMr);
    float* xp = scratch(x_buf, plan.tiles * kMr * K);
    for (int64_t t = 0; t < plan.tiles; ++t)
      pack_rows(xp, plan, t, x + (m0 + t * kMr) * K, std::min<int64_t>(kMr, rows - t * kMr), lanesplit);
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kNr) {
      const int cols = static_cast<int>(std::min<int64_t>(kNr, n_end - n0));
      pack_panel(wp, w, K, n0, cols, lanesplit);
      float bias_pad[kNr] = {};
      if (bias) std::copy(bias + n0, bias + n0 + cols, bias_pad);
      panel_times_rows(y + m0 * N + n0, N, xp, wp, plan, bias ? bias_pad : nullptr, rows, cols, part);
    }
  }
}

template <class W>
void run(float* y, const float* x, const W* w, const float* bias, int64_t M, int64_t N, int64_t K,
         int64_t n_begin, int64_t n_end, bool lanesplit) {
  if (n_begin >= n_end) return;
  if (M < kPackedMinRows) direct(y, x, w, bias, M, N, K, n_begin, n_end);
  else packed(y, x, w, bias, M, N, K, n_begin, n_end, lanesplit);
}

}  // namespace

void linear(float* y, const float* x, const void* w, bool w_bf16, const float* bias, int64_t M,
            int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  if (w_bf16) run(y, x, static_cast<const uint16_t*>(w), bias, M, N, K, n_begin, n_end, true);
  else run(y, x, static_cast<const float*>(w), bias, M, N, K, n_begin, n_end, true);
}

void linear_packed(float* y, const float* x, const void* w, bool w_bf16, const float* bias,
                   int64_t M, int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  if (w_bf16) run(y, x, static_cast<const uint16_t*>(w), bias, M, N, K, n_begin, n_end, false);
  else run(y, x, static_cast<const float*>(w), bias, M, N, K, n_begin, n_end, false);
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
