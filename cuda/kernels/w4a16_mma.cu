// W4A16 on tensor cores: y[M, N] = x[M, K] . dequant(W)[N, K]^T with mma.sync m16n8k16, the
// weights as the 16-row A operand (output channels) and the activations as the 8-column B
// operand (tokens), so a decode batch of 1..8 fills a whole mma with no padding rows of x.
//
// The weights are repacked once (w4a16_repack) from the canonical layout into the kernel's:
// uint32 [N / 16][K / 64][32 lanes][4], one 16-byte load per lane per 16 x 64 block, a warp's
// 512 bytes contiguous. Lane l (r = l / 4, t = l % 4) owns, in k-tile j (0..3) of a 64-block, the
// physical columns p = 16t + 4j + {0, 1, 2, 3} of rows r and r + 8 of the 16-row tile: exactly
// the 16 contiguous activations x[m][16t .. 16t + 15] it loads as its B fragments (the order of
// k inside a block is free, as long as A and B agree). Word j's nibble i is (row r + 8 (i & 1),
// column p + 2 ((i >> 1) & 1) + (i >> 2)): nibbles i and i + 4 are one register's two halves, so
// `(word >> 4i) & 0x000F000F | magic` turns them into two 16-bit floats (1024 + q in fp16,
// 128 + q in bf16) without conversions; (q - z) is then exact and one multiply applies the
// group's scale. Scales and zeros are transposed to [K / group][N] so a warp reads them in runs.
//
// Warps split the block's work along n (kWarpsN), m (kWarpsM) and k (kWarpsK, reduced through
// shared memory). Requires N % 16 == 0, K % 64 == 0 and group_size % 64 == 0 (the CUDA-core
// kernel in w4a16_gemm.cu covers the rest). Large M goes through w4a16_dequantize + cuBLASLt.
#include <cstring>
#include <tuple>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {

namespace {

constexpr int kTileN = 16, kBlockK = 64;

template <typename T>
struct Half2;
template <>
struct Half2<__half> {
  using T2 = __half2;
  static constexpr uint32_t kMagic = 0x64006400u;  // 1024.0 in both halves: 1024 + q
  static constexpr float kBias = 1024.f;
};
template <>
struct Half2<__nv_bfloat16> {
  using T2 = __nv_bfloat162;
  static constexpr uint32_t kMagic = 0x43004300u;  // 128.0 in both halves: 128 + q
  static constexpr float kBias = 128.f;
};

template <typename To, typename From>
__device__ __forceinline__ To bit_cast(From v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  memcpy(&r, &v, sizeof r);
  return r;
}

// The four A registers of one 16 x 16 k-tile from its packed word: register i holds rows
// r + 8 (i & 1), columns p + 2 (i >> 1) and + 1, as (q - z) * s.
template <typename T>
__device__ __forceinline__ void dequant_word(uint32_t word, typename Half2<T>::T2 zb0, typename Half2<T>::T2 zb1,
                                             typename Half2<T>::T2 s0, typename Half2<T>::T2 s1, uint32_t (&a)[4]) {
  using H = Half2<T>;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const auto q = bit_cast<typename H::T2>(((word >> (4 * i)) & 0x000F000Fu) | H::kMagic);
    a[i] = bit_cast<uint32_t>(__hmul2(__hsub2(q, (i & 1) ? zb1 : zb0), (i & 1) ? s1 : s0));
  }
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int kMTiles_, int kNTiles_, int kWarpsM_, int kWarpsN_, int kWarpsK_, int kUnroll_>
struct Config {
  static constexpr int kMTiles = kMTiles_, kNTiles = kNTiles_;  // 8-token and 16-channel tiles per warp
  static constexpr int kWarpsM = kWarpsM_, kWarpsN = kWarpsN_, kWarpsK = kWarpsK_;
  static constexpr int kUnroll = kUnroll_;  // k-blocks loaded at once
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN * kWarpsK;
  static constexpr int kBlockM = 8 * kMTiles * kWarpsM, kBlockNTiles = kNTiles * kWarpsN;
};

struct Operands {
  const void* x;
  const uint4* packed;
  const void* scales_t;
  const uint8_t* zeros_t;
  void* out;
  int M, N, K, group_size;
};

template <typename T, typename C>
__global__ void __launch_bounds__(C::kThreads) w4a16_mma_kernel(Operands op) {
  using H = Half2<T>;
  using T2 = typename H::T2;
  const T* __restrict__ x = static_cast<const T*>(op.x);
  const T* __restrict__ scales_t = static_cast<const T*>(op.scales_t);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int wn = warp % C::kWarpsN, wm = (warp / C::kWarpsN) % C::kWarpsM, wk = warp / (C::kWarpsN * C::kWarpsM);
  const int r = lane / 4, t = lane % 4;
  const int M = op.M, N = op.N, kblocks = op.K / kBlockK, ntiles = N / kTileN;
  const int nt0 = blockIdx.x * C::kBlockNTiles + wn * C::kNTiles;
  const int m0 = blockIdx.y * C::kBlockM + wm * C::kMTiles * 8;

  float acc[C::kNTiles][C::kMTiles][4];
#pragma unroll
  for (int i = 0; i < C::kNTiles; ++i)
#pragma unroll
    for (int j = 0; j < C::kMTiles; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.f;

  // Weights stream through once unless several m-warps share them (then L1 serves the rest).
  auto load_weights = [&](int kb, uint4 (&w)[C::kNTiles]) {
#pragma unroll
    for (int i = 0; i < C::kNTiles; ++i) {
      const int tile = nt0 + i;
      const uint4* src = op.packed + (int64_t(tile) * kblocks + kb) * 32 + lane;
      w[i] = tile >= ntiles ? make_uint4(0, 0, 0, 0) : (C::kWarpsM > 1 ? __ldg(src) : __ldcs(src));
    }
  };
  auto load_x = [&](int kb, uint4 (&xv)[C::kMTiles][2]) {
#pragma unroll
    for (int i = 0; i < C::kMTiles; ++i) {
      const int m = m0 + 8 * i + r;
      if (m < M) {
        const uint4* src = reinterpret_cast<const uint4*>(x + int64_t(m) * op.K + kb * kBlockK + 16 * t);
        xv[i][0] = __ldg(src);
        xv[i][1] = __ldg(src + 1);
      } else {
        xv[i][0] = xv[i][1] = make_uint4(0, 0, 0, 0);
      }
    }
  };

  // A warp's k-blocks are wk, wk + kWarpsK, ...; kUnroll of them are loaded together, so that
  // many 16-byte loads are in flight per lane before the first is consumed.
  for (int kb0 = wk; kb0 < kblocks; kb0 += C::kWarpsK * C::kUnroll) {
    uint4 w[C::kUnroll][C::kNTiles];
    uint4 xv[C::kUnroll][C::kMTiles][2];
#pragma unroll
    for (int u = 0; u < C::kUnroll; ++u) {
      const int kb = kb0 + u * C::kWarpsK;
      if (kb < kblocks) {
        load_weights(kb, w[u]);
        load_x(kb, xv[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < C::kUnroll; ++u) {
      const int kb = kb0 + u * C::kWarpsK;
      if (kb >= kblocks) break;
      const int g = kb * kBlockK / op.group_size;
#pragma unroll
      for (int i = 0; i < C::kNTiles; ++i) {
        const int tile = nt0 + i;
        if (tile >= ntiles) break;
        const int n = tile * kTileN + r;
        const int64_t at = int64_t(g) * N + n;
        const float z0 = op.zeros_t != nullptr ? float(op.zeros_t[at]) : 8.f;
        const float z1 = op.zeros_t != nullptr ? float(op.zeros_t[at + 8]) : 8.f;
        const T2 zb0 = {from_float<T>(H::kBias + z0), from_float<T>(H::kBias + z0)};
        const T2 zb1 = {from_float<T>(H::kBias + z1), from_float<T>(H::kBias + z1)};
        const T2 s0 = {scales_t[at], scales_t[at]};
        const T2 s1 = {scales_t[at + 8], scales_t[at + 8]};
        const uint32_t words[4] = {w[u][i].x, w[u][i].y, w[u][i].z, w[u][i].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t a[4];
          dequant_word<T>(words[j], zb0, zb1, s0, s1, a);
#pragma unroll
          for (int mt = 0; mt < C::kMTiles; ++mt) {
            const uint4& lo = xv[u][mt][0];
            const uint4& hi = xv[u][mt][1];
            // Activation words 2j and 2j + 1 of the lane's 16 contiguous columns.
            const uint32_t b0 = j == 0 ? lo.x : j == 1 ? lo.z : j == 2 ? hi.x : hi.z;
            const uint32_t b1 = j == 0 ? lo.y : j == 1 ? lo.w : j == 2 ? hi.y : hi.w;
            mma_16816<T>(acc[i][mt], a, b0, b1);
          }
        }
      }
    }
  }

  if constexpr (C::kWarpsK > 1) {  // the k-split warps add into the first one's accumulators
    constexpr int kAcc = C::kNTiles * C::kMTiles * 4;
    __shared__ float partial[C::kWarpsK - 1][C::kWarpsM * C::kWarpsN][kAcc][32];
    const int slot = wm * C::kWarpsN + wn;
    float* flat = &acc[0][0][0];
    if (wk > 0)
#pragma unroll
      for (int i = 0; i < kAcc; ++i) partial[wk - 1][slot][i][lane] = flat[i];
    __syncthreads();
    if (wk > 0) return;
    for (int w = 0; w < C::kWarpsK - 1; ++w)
#pragma unroll
      for (int i = 0; i < kAcc; ++i) flat[i] += partial[w][slot][i][lane];
  }

  T* __restrict__ out = static_cast<T*>(op.out);
#pragma unroll
  for (int i = 0; i < C::kNTiles; ++i) {
    const int tile = nt0 + i;
    if (tile >= ntiles) break;
    const int n = tile * kTileN + r;
#pragma unroll
    for (int mt = 0; mt < C::kMTiles; ++mt) {
      const int m = m0 + 8 * mt + 2 * t;  // C fragment: rows n, n + 8; columns (tokens) m, m + 1
      if (m < M) {
        out[int64_t(m) * N + n] = from_float<T>(acc[i][mt][0]);
        out[int64_t(m) * N + n + 8] = from_float<T>(acc[i][mt][2]);
      }
      if (m + 1 < M) {
        out[int64_t(m + 1) * N + n] = from_float<T>(acc[i][mt][1]);
        out[int64_t(m + 1) * N + n + 8] = from_float<T>(acc[i][mt][3]);
      }
    }
  }
}

// The configurations, by index (W4A16MmaParams::config); w4a16_mma_config picks one by M.
// <m-tiles, n-tiles, warps along m, n, k, unroll>
using Configs = std::tuple<Config<1, 1, 1, 1, 8, 4>,   // 0: M <= 8, 16 channels x 8 k-warps per block
                           Config<2, 1, 1, 1, 8, 4>,   // 1: M <= 16
                           Config<4, 1, 1, 2, 4, 2>,   // 2: M <= 32
                           Config<4, 2, 2, 2, 1, 2>,   // 3: 64 tokens x 64 channels per block
                           Config<4, 4, 2, 2, 1, 1>,   // 4: 64 x 128
                           Config<4, 2, 2, 4, 1, 2>>;  // 5: 64 x 128, 8 warps
constexpr int kNumConfigs = std::tuple_size_v<Configs>;

template <typename T, int I>
cudaError_t launch_config(const Operands& op, cudaStream_t stream) {
  using C = std::tuple_element_t<I, Configs>;
  const int ntiles = op.N / kTileN;
  const dim3 grid((ntiles + C::kBlockNTiles - 1) / C::kBlockNTiles, (op.M + C::kBlockM - 1) / C::kBlockM);
  w4a16_mma_kernel<T, C><<<grid, C::kThreads, 0, stream>>>(op);
  return cudaGetLastError();
}

template <typename T, int I = 0>
cudaError_t launch_indexed(int config, const Operands& op, cudaStream_t stream) {
  if constexpr (I < kNumConfigs) {
    if (config == I) return launch_config<T, I>(op, stream);
    return launch_indexed<T, I + 1>(config, op, stream);
  } else {
    return cudaErrorInvalidValue;
  }
}

// Where packed word `word` (its index in the whole layout) puts its nibbles in W: nibble i at
// row(i), col(i) (see the header comment).
struct WordPosition {
  int64_t row0;
  int k0;
  __device__ WordPosition(int64_t word, int kblocks) {
    const int j = word % 4, lane = (word / 4) % 32, kb = (word / 128) % kblocks;
    row0 = word / (128 * int64_t(kblocks)) * kTileN + lane / 4;
    k0 = kb * kBlockK + 16 * (lane % 4) + 4 * j;
  }
  __device__ int64_t row(int i) const { return row0 + 8 * (i & 1); }
  __device__ int col(int i) const { return k0 + 2 * ((i >> 1) & 1) + (i >> 2); }
};

// Canonical -> kernel layout: one thread per packed word.
__global__ void repack_kernel(const uint8_t* __restrict__ qweight, uint32_t* __restrict__ packed, int N, int K) {
  const int64_t word = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int kblocks = K / kBlockK;
  if (word >= int64_t(N / kTileN) * kblocks * 128) return;
  const WordPosition at(word, kblocks);
  uint32_t v = 0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int k = at.col(i);
    const uint32_t q = (qweight[at.row(i) * (K / 2) + k / 2] >> (4 * (k & 1))) & 0xFu;
    v |= q << (4 * i);
  }
  packed[word] = v;
}

template <typename T>
__global__ void transpose_groups_kernel(const T* __restrict__ in, T* __restrict__ out, int N, int G) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // over out [G, N]
  if (i >= int64_t(N) * G) return;
  const int64_t g = i / N, n = i % N;
  out[i] = in[n * G + g];
}

// Kernel layout -> dense rows [row_begin, row_begin + rows) of W in T (out [rows, K]), each
// (q - z) * s rounded as the kernel rounds it.
template <typename T>
__global__ void dequantize_kernel(const uint32_t* __restrict__ packed, const T* __restrict__ scales_t,
                                  const uint8_t* __restrict__ zeros_t, T* __restrict__ out, int N, int K,
                                  int group_size, int row_begin, int rows) {
  const int kblocks = K / kBlockK;
  const int64_t local = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // within the row range
  if (local >= int64_t(rows / kTileN) * kblocks * 128) return;
  const int64_t word = int64_t(row_begin / kTileN) * kblocks * 128 + local;
  const WordPosition at(word, kblocks);
  const int64_t g = at.k0 / group_size;
  const uint32_t v = packed[word];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const int64_t row = at.row(i);
    const float z = zeros_t != nullptr ? float(zeros_t[g * N + row]) : 8.f;
    const float q = float((v >> (4 * i)) & 0xFu);
    out[(row - row_begin) * K + at.col(i)] = from_float<T>((q - z) * to_float(scales_t[g * N + row]));
  }
}

inline unsigned blocks_for(int64_t n, int threads) { return unsigned((n + threads - 1) / threads); }

}  // namespace

bool w4a16_mma_supported(int N, int K, int group_size) {
  return N > 0 && N % kTileN == 0 && K > 0 && K % kBlockK == 0 && group_size > 0 && group_size % kBlockK == 0 &&
         K % group_size == 0;
}

int w4a16_mma_num_configs() { return kNumConfigs; }

int w4a16_mma_config(int M) {
  if (M <= 8) return 0;
  if (M <= 16) return 1;
  if (M <= 32) return 2;
  if (M <= 64) return 3;
  return 4;
}

cudaError_t w4a16_repack(DType dtype, const uint8_t* qweight, const void* scales, const uint8_t* zeros,
                         uint32_t* packed, void* scales_t, uint8_t* zeros_t, int N, int K, int group_size,
                         cudaStream_t stream) {
  if (!w4a16_mma_supported(N, K, group_size)) return cudaErrorInvalidValue;
  const int64_t words = int64_t(N) * K / 8;
  repack_kernel<<<blocks_for(words, 256), 256, 0, stream>>>(qweight, packed, N, K);
  const int G = K / group_size;
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
                           transpose_groups_kernel<T><<<blocks_for(int64_t(N) * G, 256), 256, 0, stream>>>(
                               static_cast<const T*>(scales), static_cast<T*>(scales_t), N, G));
  if (zeros != nullptr)
    transpose_groups_kernel<uint8_t><<<blocks_for(int64_t(N) * G, 256), 256, 0, stream>>>(zeros, zeros_t, N, G);
  return cudaGetLastError();
}

cudaError_t w4a16_dequantize(DType dtype, const uint32_t* packed, const void* scales_t, const uint8_t* zeros_t,
                             void* out, int N, int K, int group_size, int row_begin, int rows, cudaStream_t stream) {
  if (!w4a16_mma_supported(N, K, group_size) || row_begin < 0 || rows < 0 || row_begin % kTileN != 0 ||
      rows % kTileN != 0 || row_begin + rows > N)
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int64_t words = int64_t(rows) * K / 8;
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
                           dequantize_kernel<T><<<blocks_for(words, 256), 256, 0, stream>>>(
                               packed, static_cast<const T*>(scales_t), zeros_t, static_cast<T*>(out), N, K,
                               group_size, row_begin, rows));
  return cudaGetLastError();
}

cudaError_t w4a16_mma_gemm(const W4A16MmaParams& p, cudaStream_t stream) {
  if (!w4a16_mma_supported(p.N, p.K, p.group_size) || p.M < 0) return cudaErrorInvalidValue;
  if (p.M == 0) return cudaSuccess;
  const int config = p.config >= 0 ? p.config : w4a16_mma_config(p.M);
  const Operands op{p.x, reinterpret_cast<const uint4*>(p.packed), p.scales_t, p.zeros_t, p.out,
                    p.M, p.N, p.K, p.group_size};
  FLASHPAGE_DISPATCH_DTYPE(p.dtype, T, return launch_indexed<T>(config, op, stream));
}

}  // namespace flashpage::cuda
