// Per-token (per-row) symmetric activation quantization for the W8A8 GEMMs: int8 (scale =
// amax / 127, round half to even as torch.round) and fp8 e4m3 (scale = amax / 448, round to
// nearest even, saturating). One block per row: the amax reduction, then the scaled writes.
#include <cuda_fp8.h>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {

namespace {

struct ToInt8 {
  using Out = int8_t;
  static constexpr float kMax = 127.f;
  __device__ static Out cast(float v) { return static_cast<int8_t>(fminf(fmaxf(rintf(v), -127.f), 127.f)); }
};

struct ToFp8 {
  using Out = __nv_fp8_storage_t;
  static constexpr float kMax = 448.f;
  __device__ static Out cast(float v) { return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, __NV_E4M3); }
};

template <typename T, typename Q>
__global__ void quantize_rows_kernel(const T* __restrict__ x, typename Q::Out* __restrict__ xq,
                                     float* __restrict__ scales, int K) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * K;
  float amax = 0.f;
  for (int k = threadIdx.x; k < K; k += blockDim.x) amax = fmaxf(amax, fabsf(to_float(xr[k])));
  __shared__ float scratch[32];
  const float scale = fmaxf(block_max(amax, scratch), 1e-8f) / Q::kMax;
  if (threadIdx.x == 0) scales[row] = scale;
  for (int k = threadIdx.x; k < K; k += blockDim.x) xq[row * K + k] = Q::cast(to_float(xr[k]) / scale);
}

template <typename Q>
cudaError_t quantize_rows(DType dtype, const void* x, void* xq, float* scales, int M, int K, cudaStream_t stream) {
  if (M < 0 || K <= 0) return cudaErrorInvalidValue;
  if (M == 0) return cudaSuccess;
  auto* out = static_cast<typename Q::Out*>(xq);
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
                           quantize_rows_kernel<T, Q><<<M, 256, 0, stream>>>(static_cast<const T*>(x), out, scales, K));
  return cudaGetLastError();
}

}  // namespace

cudaError_t quantize_per_token_int8(DType dtype, const void* x, int8_t* xq, float* scales, int M, int K,
                                    cudaStream_t stream) {
  return quantize_rows<ToInt8>(dtype, x, xq, scales, M, K, stream);
}

cudaError_t quantize_per_token_fp8(DType dtype, const void* x, void* xq, float* scales, int M, int K,
                                   cudaStream_t stream) {
  return quantize_rows<ToFp8>(dtype, x, xq, scales, M, K, stream);
}

}  // namespace flashpage::cuda
