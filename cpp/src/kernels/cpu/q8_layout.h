// The packed layout of the int8 / 4-bit / 5-bit Linear weights, shared by the levels that run
// them (linear_q8.cc: VNNI and AMX-INT8; linear_q8_avx2.cc: AVX2 and AVX-512 without VNNI).
// Panels of 16 output columns; block after block along K: 8 groups of 4 positions x 16 columns
// (column c of group g at g * 64 + c * 4), then the 16 columns' scales and mins. 8-bit weights
// are stored unsigned (w + 128); 4- and 5-bit ones (0..31) as they are. Include from one source
// per level: it defines that level's layout entry points of kernels.h.
#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace q8 {
constexpr int64_t kPanel = 16;

// Bytes of one (panel, block): the weights (8 bits: 512; 4 bits, two per byte: 256; 5 bits: those
// 256 and a 64-byte plane of fifth bits, 8 bytes a group, bit j for the group's byte j), then
// the 16 columns' scales and mins (fp32: 64 bytes each; fp16 when kHalf: 32). Sub-byte: byte j
// of 64-byte row i holds group i's byte j in its low nibble and group i + 4's in its high one.
template <int kBits>
constexpr int64_t weight_bytes() { return kBits == 8 ? 512 : kBits == 5 ? 320 : 256; }
template <int kBits, bool kHalf>
constexpr int64_t block_bytes() { return weight_bytes<kBits>() + (kHalf ? 64 : 128); }
// Where a block's 16 scales and its 16 mins start.
template <int kBits>
constexpr int64_t scales_at() { return weight_bytes<kBits>(); }
template <int kBits, bool kHalf>
constexpr int64_t mins_at() { return weight_bytes<kBits>() + (kHalf ? 32 : 64); }

// Written straight into the panel (no local arrays: ASan's fake stack frames do not keep the
// 64-byte alignment that vectorised stores to them assume).
template <int kBits, bool kHalf = false>
void pack(void* dst, const int8_t* qs, const float* d, const float* mins, int64_t N, int64_t K, int64_t n_begin,
          int64_t n_end) {
  constexpr bool kSub = kBits < 8;
  const int64_t B = K / 32, bb = block_bytes<kBits, kHalf>();
  constexpr int64_t kScales = scales_at<kBits>(), kMins = mins_at<kBits, kHalf>(), kWidth = kHalf ? 2 : 4;
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
          std::memcpy(blk + kScales + kWidth * c, &hs, 2);
          std::memcpy(blk + kMins + kWidth * c, &hm, 2);
        } else {
          std::memcpy(blk + kScales + kWidth * c, &sc, 4);
          std::memcpy(blk + kMins + kWidth * c, &mn, 4);
        }
      }
    }
  }
}

// The weight stream of a thread is one run of panels in memory: requesting the bytes ~12 KB
// ahead into L2, a block at a time, keeps enough misses in flight for one core to read at ~11-13
// GB/s instead of ~7-9 (M = 1, measured with bench_linear: 12-30 KB ahead equal, L1 hints and
// nearer distances slower). Two streams a core (linear_q8.cc's panel pairs, on 2 MiB pages) want
// each ~3 KB ahead along the stream: 1.1B Q4_0 decode 34 tok/s against 31-32 at 12 KB or none,
// 33 at 2 or 4 KB.
constexpr int64_t kPrefetchBytes = 12 << 10;
constexpr int64_t kPairPrefetchBytes = 3 << 10;
template <int64_t kBytes, int64_t kAhead = kPrefetchBytes>
inline void prefetch_ahead(const uint8_t* blk) {
  for (int64_t line = 0; line < kBytes; line += 64)
    prefetch_l2(blk + kAhead + line);
}

// Calls fn.template operator()<kBits, kHalf>() for the formats qbits_linear takes at run time.
template <class Fn>
void with_qbits(int bits, bool half_scales, Fn&& fn) {
  if (bits == 5) {
    if (half_scales) fn.template operator()<5, true>();
    else fn.template operator()<5, false>();
  } else {
    if (half_scales) fn.template operator()<4, true>();
    else fn.template operator()<4, false>();
  }
}

}  // namespace q8

int64_t q8_panel() { return q8::kPanel; }

int64_t packed_q8_bytes(int64_t N, int64_t K) {
  return (N + q8::kPanel - 1) / q8::kPanel * (K / 32) * q8::block_bytes<8, false>();
}
int64_t packed_qbits_bytes(int64_t N, int64_t K, int bits, bool half_scales) {
  const int64_t weights = bits == 5 ? q8::weight_bytes<5>() : q8::weight_bytes<4>();
  return (N + q8::kPanel - 1) / q8::kPanel * (K / 32) * (weights + (half_scales ? 64 : 128));
}

void pack_q8(void* dst, const int8_t* qs, const float* d, const float* mins, int64_t N, int64_t K, int64_t n_begin,
             int64_t n_end) {
  q8::pack<8>(dst, qs, d, mins, N, K, n_begin, n_end);
}
void pack_qbits(void* dst, const int8_t* qs, const float* d, const float* mins, int64_t N, int64_t K, int64_t n_begin,
                int64_t n_end, int bits, bool half_scales) {
  q8::with_qbits(bits, half_scales, [&]<int kBits, bool kHalf>() {
    q8::pack<kBits, kHalf>(dst, qs, d, mins, N, K, n_begin, n_end);
  });
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
