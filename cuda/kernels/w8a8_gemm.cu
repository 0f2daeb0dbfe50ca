// W8A8-INT8: activations quantized per token (quantize.cu: symmetric int8, scale = amax / 127), weights int8
// per output channel (the canonical layout: qweight int8 [N, K], scales float32 [N]);
// y[m, n] = (sum_k xq[m, k] * wq[n, k]) * x_scale[m] * w_scale[n], the sum exact in int32.
//
// This GEMM is the CUDA-core kernel for decode-sized M: one warp streams one weight row, 16
// int8 per lane per step (one 16-byte load) against the M activation rows, four __dp4a each;
// larger M runs in tiles of 16 rows. Needs K % 16 == 0.
#include <algorithm>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {

namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T, int kRows>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    w8a8_rows_kernel(const int8_t* __restrict__ xq, const float* __restrict__ x_scales,
                     const int8_t* __restrict__ wq, const float* __restrict__ w_scales, T* __restrict__ out, int M,
                     int N, int K) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarpsPerBlock + warp;
  const int m0 = blockIdx.y * kRows;
  if (n >= N) return;
  const int rows = min(kRows, M - m0);
  const int8_t* wrow = wq + int64_t(n) * K;
  int acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0;
  for (int k0 = lane * 16; k0 < K; k0 += 32 * 16) {
    const int4 w = *reinterpret_cast<const int4*>(wrow + k0);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      const int4 a = *reinterpret_cast<const int4*>(xq + int64_t(m0 + r) * K + k0);
      acc[r] = __dp4a(a.x, w.x, acc[r]);
      acc[r] = __dp4a(a.y, w.y, acc[r]);
      acc[r] = __dp4a(a.z, w.z, acc[r]);
      acc[r] = __dp4a(a.w, w.w, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
  if (lane == 0) {
    const float ws = w_scales[n];
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows) out[int64_t(m0 + r) * N + n] = from_float<T>(float(acc[r]) * x_scales[m0 + r] * ws);
  }
}

// out[m, n] = acc[m, n] * x_scales[m] * w_scales[n]: the epilogue of the tensor-core int8 GEMM.
template <typename T>
__global__ void scale_int32_kernel(const int32_t* __restrict__ acc, const float* __restrict__ x_scales,
                                   const float* __restrict__ w_scales, T* __restrict__ out, int N) {
  const int64_t m = blockIdx.y;
  const float xs = x_scales[m];
  for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < N; n += gridDim.x * blockDim.x)
    out[m * N + n] = from_float<T>(float(acc[m * N + n]) * xs * w_scales[n]);
}

template <typename T>
cudaError_t launch(const W8A8Params& p, cudaStream_t stream) {
  return with_row_tile(p.M, [&]<int kRows>() {
    const dim3 grid((p.N + kWarpsPerBlock - 1) / kWarpsPerBlock, (p.M + kRows - 1) / kRows);
    w8a8_rows_kernel<T, kRows><<<grid, kWarpsPerBlock * 32, 0, stream>>>(p.xq, p.x_scales, p.wq, p.w_scales,
                                                                        static_cast<T*>(p.out), p.M, p.N, p.K);
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t w8a8_scale_output(DType dtype, const int32_t* acc, const float* x_scales, const float* w_scales, void* out,
                              int M, int N, cudaStream_t stream) {
  if (M < 0 || N < 0) return cudaErrorInvalidValue;
  if (M == 0 || N == 0) return cudaSuccess;
  const dim3 grid(unsigned(std::min((N + 255) / 256, 64)), unsigned(M));
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
                           scale_int32_kernel<T><<<grid, 256, 0, stream>>>(acc, x_scales, w_scales,
                                                                            static_cast<T*>(out), N));
  return cudaGetLastError();
}

cudaError_t w8a8_gemm(const W8A8Params& p, cudaStream_t stream) {
  if (p.K <= 0 || p.K % 16 != 0 || p.M < 0 || p.N < 0) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return p.dtype == DType::kFloat16 ? launch<__half>(p, stream) : launch<__nv_bfloat16>(p, stream);
}

}  // namespace flashpage::cuda
