// Small helpers shared by the CUDA kernels: dtype conversion and 16-byte vector access.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace flashpage::cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Eight 16-bit values in one 16-byte register group.
template <typename T>
union Vec8 {
  uint4 raw;
  T v[8];
};

template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&out)[8]) {
  Vec8<T> u;
  u.raw = *reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = to_float(u.v[i]);
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float (&in)[8]) {
  Vec8<T> u;
#pragma unroll
  for (int i = 0; i < 8; ++i) u.v[i] = from_float<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = u.raw;
}

template <typename V>
__device__ __forceinline__ V warp_sum(V x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// Reduction over the block with a warp reduction `warp_op` (warp_sum, warp_max) whose
// identity is `identity`; every thread gets the result. `scratch` holds 32 floats.
template <typename WarpOp>
__device__ __forceinline__ float block_reduce(float x, float* scratch, WarpOp warp_op, float identity) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  x = warp_op(x);
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  const int nwarps = (blockDim.x + 31) / 32;
  x = lane < nwarps ? scratch[lane] : identity;
  x = warp_op(x);
  __syncthreads();
  return x;
}

__device__ __forceinline__ float block_sum(float x, float* scratch) {
  return block_reduce(x, scratch, [](float v) { return warp_sum(v); }, 0.f);
}

__device__ __forceinline__ float block_max(float x, float* scratch) {
  return block_reduce(x, scratch, [](float v) { return warp_max(v); }, -INFINITY);
}

// The decode-sized GEMMs' row tiles: calls f.template operator()<R>() with the smallest R of
// 1, 2, 4, 8, 16 that covers M rows (16 beyond: the kernel loops over tiles).
template <typename F>
inline cudaError_t with_row_tile(int M, F&& f) {
  if (M <= 1) return f.template operator()<1>();
  if (M <= 2) return f.template operator()<2>();
  if (M <= 4) return f.template operator()<4>();
  if (M <= 8) return f.template operator()<8>();
  return f.template operator()<16>();
}

}  // namespace flashpage::cuda

// Runs the statement with T bound to the 16-bit type of a DType.
#define FLASHPAGE_DISPATCH_DTYPE(dtype, T, ...)        \
  do {                                                 \
    if ((dtype) == DType::kBFloat16) {                 \
      using T = __nv_bfloat16;                         \
      __VA_ARGS__;                                     \
    } else {                                           \
      using T = __half;                                \
      __VA_ARGS__;                                     \
    }                                                  \
  } while (0)
