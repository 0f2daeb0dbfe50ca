// The int8 and 4-bit Linears on AVX512-VNNI (the avx512_bf16 and amx levels): panels of 16 output
// columns, one int32 lane per column, so that each VPDPBUSD multiplies 4 values of one input
// row (broadcast) by the same 4 positions of 16 weight rows. The weights are stored unsigned
// (w + 128, the instruction's unsigned operand) and the activation block's sum corrects it:
// sum((w + 128) x) - 128 sum(x) = sum(w x), exact in int32. Layout of a panel, block after
// block along K: 8 groups of 4 positions x 16 columns (512 bytes: column c of group g at
// g * 64 + c * 4), then the 16 columns' scales and their mins (64 bytes each). 4-bit weights
// (0..15) are unsigned already and need no correction.
//
// On the amx level, each 16 full rows run on AMX-INT8 tiles instead (linear_amx): the 8-bit
// layout above is already an 8 x 64-byte B tile per block (4 positions x 16 columns a row).
// Both paths get each block's integer dot products exactly and apply the same float operations
// in the same order per output, so a row's result does not depend on which path ran it (batch
// invariance across batch sizes holds bitwise).
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "kernels/cpu/amx.h"
#include "kernels/cpu/kernels.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {
constexpr int64_t kPanel = 16;
constexpr int64_t kRows = 4;  // input rows that share each weight load

// Bytes of one (panel, block): the weights (8 bits: 512; 4 bits, two per byte: 256; 5 bits: those
// 256 and a 64-byte plane of fifth bits, 8 bytes a group, bit j for the group's byte j), then
// the 16 columns' scales and mins (fp32: 64 bytes each; fp16 when kHalf: 32). Sub-byte: byte j
// of 64-byte row i holds group i's byte j in its low nibble and group i + 4's in its high one.
template <int kBits>
constexpr int64_t weight_bytes() { return kBits == 8 ? 512 : kBits == 5 ? 320 : 256; }
template <int kBits, bool kHalf>
constexpr int64_t block_bytes() { return weight_bytes<kBits>() + (kHalf ? 64 : 128); }

// Written straight into the panel (no local arrays: ASan's fake stack frames do not keep the
// 64-byte alignment that vectorised stores to them assume).
template <int kBits, bool kHalf = false>
void pack(void* dst, const int8_t* qs, const float* d, const float* mins, int64_t N, int64_t K, int64_t n_begin,
          int64_t n_end) {
  constexpr bool kSub = kBits < 8;
  const int64_t B = K / 32, bb = block_bytes<kBits, kHalf>(), wbytes = weight_bytes<kBits>();
  for (int64_t p = n_begin / kPanel; p * kPanel < n_end; ++p) {
    auto* panel = static_cast<uint8_t*>(dst) + p * B * bb;
    for (int64_t b = 0; b < B; ++b) {
      uint8_t* blk = panel + b * bb;
      // The unsigned weight of column c at position k of the block (padding columns: 0).
      auto u = [&](int64_t c, int64_t k) -> uint8_t {
        const int64_t n = p * kPanel + c;
        return n < N ? uint8_t(int(qs[n * K + b * 32 + k]) + (kSub ? 0 : 128)) : uint8_t(kSub ? 0 : 128);
      };
      if (kBits == 5) std::memset(blk + 256, 0, 64);
      for (int64_t j = 0; j < 64; ++j) {  // byte j of a group: column j / 4, position j % 4
        const int64_t c = j / 4, t = j % 4;
        if (kSub) {
          for (int64_t i = 0; i < 4; ++i)
            blk[i * 64 + j] = uint8_t((u(c, 4 * i + t) & 0xF) | ((u(c, 4 * (i + 4) + t) & 0xF) << 4));
          if (kBits == 5)
            for (int64_t g = 0; g < 8; ++g)
              if (u(c, 4 * g + t) & 0x10) blk[256 + g * 8 + j / 8] |= uint8_t(1u << (j % 8));
        } else {
          for (int64_t g = 0; g < 8; ++g) blk[g * 64 + j] = u(c, 4 * g + t);
        }
      }
      for (int64_t c = 0; c < kPanel; ++c) {  // scales and mins (padding columns: 0)
        const int64_t n = p * kPanel + c;
        const float sc = n < N ? d[n * B + b] : 0.f, mn = n < N ? mins[n * B + b] : 0.f;
        if (kHalf) {
          const uint16_t hs = _cvtss_sh(sc, _MM_FROUND_TO_NEAREST_INT), hm = _cvtss_sh(mn, _MM_FROUND_TO_NEAREST_INT);
          std::memcpy(blk + wbytes + 2 * c, &hs, 2);
          std::memcpy(blk + wbytes + 32 + 2 * c, &hm, 2);
        } else {
          std::memcpy(blk + wbytes + 4 * c, &sc, 4);
          std::memcpy(blk + wbytes + 64 + 4 * c, &mn, 4);
        }
      }
    }
  }
}

// The 16 columns' unsigned weights of block `blk`, as VPDPBUSD's 8 groups of 4 positions.
template <int kBits>
inline void load_groups(__m512i (&wv)[8], const uint8_t* blk) {
  if constexpr (kBits < 8) {
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    for (int i = 0; i < 4; ++i) {
      const __m512i z = _mm512_loadu_si512(blk + i * 64);
      wv[i] = _mm512_and_si512(z, low4);
      wv[i + 4] = _mm512_and_si512(_mm512_srli_epi16(z, 4), low4);
    }
    if constexpr (kBits == 5)
      for (int g = 0; g < 8; ++g) {
        __mmask64 fifth;
        std::memcpy(&fifth, blk + 256 + g * 8, 8);
        wv[g] = _mm512_mask_add_epi8(wv[g], fifth, wv[g], _mm512_set1_epi8(16));
      }
  } else {
    for (int g = 0; g < 8; ++g) wv[g] = _mm512_loadu_si512(blk + g * 64);
  }
}

// The weight stream of a thread is one run of panels in memory: requesting the bytes ~12 KB
// ahead into L2, a block at a time, keeps enough misses in flight for one core to read at ~11-13
// GB/s instead of ~7-9 (M = 1, measured with bench_linear: 12-30 KB ahead equal, L1 hints and
// nearer distances slower).
constexpr int64_t kPrefetchBytes = 12 << 10;
template <int64_t kBytes>
inline void prefetch_ahead(const uint8_t* blk) {
  for (int64_t line = 0; line < kBytes; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchBytes + line, _MM_HINT_T1);
}

template <bool kHalf>
inline __m512 load_scales(const uint8_t* p) {
  if constexpr (kHalf) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else return _mm512_loadu_ps(reinterpret_cast<const float*>(p));
}

// One block's contribution to 16 outputs of a row, from its exact integer dots s (level 1) and
// s2 (level 2) and the row's d and du for the block: the one sequence of float operations both
// paths (and the reference) use.
inline __m512 add_block(__m512 acc, __m512i s, __m512i s2, float d, float du, __m512 ws, __m512 wm) {
  const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s2), _mm512_set1_ps(kQ8Level2), _mm512_cvtepi32_ps(s));
  acc = _mm512_fmadd_ps(t, _mm512_mul_ps(ws, _mm512_set1_ps(d)), acc);
  return _mm512_fmadd_ps(wm, _mm512_set1_ps(du), acc);
}

// Rows [m_begin, M) with VPDPBUSD.
template <int kBits, bool kHalf>
void linear_vnni(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t m_begin, int64_t M,
                 int64_t ldy, int64_t K, int64_t n_begin, int64_t n_end) {
  const int64_t B = K / 32, bb = block_bytes<kBits, kHalf>(), wbytes = weight_bytes<kBits>();
  // The unsigned 8-bit weights are w + 128: each level's dot carries 128 x its block sum.
  const int32_t bias128 = kBits < 8 ? 0 : -128;
  for (int64_t p = n_begin / kPanel; p * kPanel < n_end; ++p) {
    const auto* panel = static_cast<const uint8_t*>(w) + p * B * bb;
    const int64_t c0 = p * kPanel, cols = std::min(kPanel, n_end - c0);
    const __mmask16 mask = __mmask16((1u << cols) - 1);
    const __m512 bias_v = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
    for (int64_t m0 = m_begin; m0 < M; m0 += kRows) {
      const int64_t rows = std::min(kRows, M - m0);
      __m512 acc[kRows] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      for (int64_t b = 0; b < B; ++b) {
        const uint8_t* blk = panel + b * bb;
        if (m0 == m_begin) prefetch_ahead<block_bytes<kBits, kHalf>()>(blk);
        __m512i wv[8];
        load_groups<kBits>(wv, blk);
        const __m512 ws = load_scales<kHalf>(blk + wbytes), wm = load_scales<kHalf>(blk + wbytes + (kHalf ? 32 : 64));
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t m = m0 + i;
          const int64_t at = q8_offset(x.tiled, m, b * 32, K);
          const int8_t *xq = x.qs + at, *xq2 = x.qs2 + at;
          // Four chains per level (groups g mod 4), added at the end: VPDPBUSD's latency would
          // otherwise serialise a one-row step; integer sums, so the same result.
          __m512i a[4] = {_mm512_set1_epi32(bias128 * x.sums[m * B + b]), _mm512_setzero_si512(),
                          _mm512_setzero_si512(), _mm512_setzero_si512()};
          __m512i a2[4] = {_mm512_set1_epi32(bias128 * x.sums2[m * B + b]), _mm512_setzero_si512(),
                           _mm512_setzero_si512(), _mm512_setzero_si512()};
          for (int g = 0; g < 8; ++g) {
            int32_t f, h;
            std::memcpy(&f, xq + 4 * g, 4);
            std::memcpy(&h, xq2 + 4 * g, 4);
            a[g % 4] = _mm512_dpbusd_epi32(a[g % 4], wv[g], _mm512_set1_epi32(f));
            a2[g % 4] = _mm512_dpbusd_epi32(a2[g % 4], wv[g], _mm512_set1_epi32(h));
          }
          const __m512i s = _mm512_add_epi32(_mm512_add_epi32(a[0], a[1]), _mm512_add_epi32(a[2], a[3]));
          const __m512i s2 = _mm512_add_epi32(_mm512_add_epi32(a2[0], a2[1]), _mm512_add_epi32(a2[2], a2[3]));
          acc[i] = add_block(acc[i], s, s2, x.d[m * B + b], x.du[m * B + b], ws, wm);
        }
      }
      for (int64_t i = 0; i < rows; ++i) {
        const __m512 out = bias ? _mm512_add_ps(acc[i], bias_v) : acc[i];
        _mm512_mask_storeu_ps(y + (m0 + i) * ldy + c0, mask, out);
      }
    }
  }
}

#if defined(__AMX_INT8__)
// Tiles: 0 and 1 the activations of 16 rows for one block (levels 1 and 2: 16 rows of 32 int8),
// 2 the block's weights (8 rows of 4 positions x 16 columns), 4 and 5 the two levels' int32 dots.
const TileConfig kQ8Tiles{{16, 32}, {16, 32}, {8, 64}, {0, 0}, {16, 64}, {16, 64}};

// Scratch of a thread: a panel's weights as signed bytes and the two C tiles. Grows once to the
// largest K; a step allocates nothing after the first.
struct AmxScratch {
  runtime::AlignedVector<int8_t> weights;
  runtime::AlignedVector<int32_t> c = runtime::AlignedVector<int32_t>(2 * 256);
};

// A panel's blocks as signed int8 in the B-tile layout (512 bytes a block): TDPBSSD then gives
// each block's exact dot with no correction term.
template <int kBits, bool kHalf>
void signed_panel(int8_t* dst, const uint8_t* panel, int64_t B) {
  const __m512i shift = _mm512_set1_epi8(kBits == 8 ? -128 : 0);  // 8 bits: u - 128; else q
  for (int64_t b = 0; b < B; ++b) {
    const uint8_t* blk = panel + b * block_bytes<kBits, kHalf>();
    prefetch_ahead<block_bytes<kBits, kHalf>()>(blk);
    __m512i wv[8];
    load_groups<kBits>(wv, blk);
    for (int g = 0; g < 8; ++g) _mm512_storeu_si512(dst + b * 512 + g * 64, _mm512_add_epi8(wv[g], shift));
  }
}

// Rows [0, M) (M a multiple of 16) on AMX-INT8. A panel's blocks are converted once and reused
// by every 16-row tile; each block's two dots (TDPBSSD: signed x signed, exact) go through
// memory to the vector registers that sum them as add_block does. (Two panels sharing the
// activation tiles, and the dots issued a block ahead of their sums, measured no faster: the
// tile stores and the float sums of each 32-wide block are the cost.)
template <int kBits, bool kHalf>
void linear_amx(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
                int64_t n_begin, int64_t n_end) {
  static thread_local AmxScratch scratch;
  const int64_t B = K / 32, bb = block_bytes<kBits, kHalf>(), wbytes = weight_bytes<kBits>();
  if (int64_t(scratch.weights.size()) < B * 512) scratch.weights.resize(size_t(B * 512));
  // Plain pointers: the thread_local's address is a call in a shared library, which would
  // clobber every vector register inside the loop.
  int32_t* const c = scratch.c.data();
  int8_t* const wts = scratch.weights.data();
  const int64_t a_stride = x.tiled ? 32 : K;
  const float* const xd = x.d;
  const float* const xdu = x.du;
  TileScope tiles(kQ8Tiles);
  for (int64_t p = n_begin / kPanel; p * kPanel < n_end; ++p) {
    const auto* panel = static_cast<const uint8_t*>(w) + p * B * bb;
    signed_panel<kBits, kHalf>(wts, panel, B);
    const int64_t c0 = p * kPanel, cols = std::min(kPanel, n_end - c0);
    const __mmask16 mask = __mmask16((1u << cols) - 1);
    for (int64_t m0 = 0; m0 < M; m0 += 16) {
      __m512 acc[16];
      for (auto& a : acc) a = _mm512_setzero_ps();
      for (int64_t b = 0; b < B; ++b) {
        const int64_t at = q8_offset(x.tiled, m0, b * 32, K);
        _tile_loadd(0, x.qs + at, a_stride);
        _tile_loadd(1, x.qs2 + at, a_stride);
        _tile_loadd(2, wts + b * 512, 64);
        _tile_zero(4);
        _tile_zero(5);
        _tile_dpbssd(4, 0, 2);
        _tile_dpbssd(5, 1, 2);
        _tile_stored(4, c, 64);
        _tile_stored(5, c + 256, 64);
        const uint8_t* blk = panel + b * bb;
        const __m512 ws = load_scales<kHalf>(blk + wbytes), wm = load_scales<kHalf>(blk + wbytes + (kHalf ? 32 : 64));
        const int64_t r = m0 * B + b;
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i)
          acc[i] = add_block(acc[i], _mm512_loadu_si512(c + 16 * i), _mm512_loadu_si512(c + 256 + 16 * i), xd[r + i * B],
                             xdu[r + i * B], ws, wm);
      }
      const __m512 bias_v = bias ? _mm512_maskz_loadu_ps(mask, bias + c0) : _mm512_setzero_ps();
      for (int i = 0; i < 16; ++i)
        _mm512_mask_storeu_ps(y + (m0 + i) * ldy + c0, mask, bias ? _mm512_add_ps(acc[i], bias_v) : acc[i]);
    }
  }
}
#endif

template <int kBits, bool kHalf = false>
void linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
            int64_t n_begin, int64_t n_end) {
  int64_t m_begin = 0;
#if defined(__AMX_INT8__)
  m_begin = M / 16 * 16;
  if (m_begin) linear_amx<kBits, kHalf>(y, x, w, bias, m_begin, ldy, K, n_begin, n_end);
#endif
  if (m_begin < M) linear_vnni<kBits, kHalf>(y, x, w, bias, m_begin, M, ldy, K, n_begin, n_end);
}

}  // namespace

int64_t q8_panel() { return kPanel; }

int64_t packed_q8_bytes(int64_t N, int64_t K) { return (N + kPanel - 1) / kPanel * (K / 32) * block_bytes<8, false>(); }
int64_t packed_qbits_bytes(int64_t N, int64_t K, int bits, bool half_scales) {
  const int64_t weights = bits == 5 ? weight_bytes<5>() : weight_bytes<4>();
  return (N + kPanel - 1) / kPanel * (K / 32) * (weights + (half_scales ? 64 : 128));
}

void pack_q8(void* dst, const int8_t* qs, const float* d, const float* mins, int64_t N, int64_t K, int64_t n_begin,
             int64_t n_end) {
  pack<8>(dst, qs, d, mins, N, K, n_begin, n_end);
}
void pack_qbits(void* dst, const int8_t* qs, const float* d, const float* mins, int64_t N, int64_t K, int64_t n_begin,
                int64_t n_end, int bits, bool half_scales) {
  if (bits == 5) {
    if (half_scales) pack<5, true>(dst, qs, d, mins, N, K, n_begin, n_end);
    else pack<5, false>(dst, qs, d, mins, N, K, n_begin, n_end);
  } else {
    if (half_scales) pack<4, true>(dst, qs, d, mins, N, K, n_begin, n_end);
    else pack<4, false>(dst, qs, d, mins, N, K, n_begin, n_end);
  }
}

void q8_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
               int64_t n_begin, int64_t n_end) {
  linear<8>(y, x, w, bias, M, ldy, K, n_begin, n_end);
}
void qbits_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
                  int64_t n_begin, int64_t n_end, int bits, bool half_scales) {
  if (bits == 5) {
    if (half_scales) linear<5, true>(y, x, w, bias, M, ldy, K, n_begin, n_end);
    else linear<5, false>(y, x, w, bias, M, ldy, K, n_begin, n_end);
  } else {
    if (half_scales) linear<4, true>(y, x, w, bias, M, ldy, K, n_begin, n_end);
    else linear<4, false>(y, x, w, bias, M, ldy, K, n_begin, n_end);
  }
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
