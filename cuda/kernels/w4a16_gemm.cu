// W4A16 GEMM for decode-sized batches: y[M, N] = x[M, K] . dequant(W)[N, K]^T, with 4-bit
// weights in the canonical layout (flashpage/quantization.py): qweight uint8 [N, K/2] (low
// nibble = even k), scales [N, K/group] in the activations' dtype, optional zeros uint8
// [N, K/group] (8 when symmetric).
//
// At decode (M <= 16) the weights are the traffic: one warp streams one output row, each lane
// 16 bytes (32 weights) per step with a 16-byte load, dequantised in registers, against the M
// activation rows (small, L1/L2-resident), accumulating in fp32; a warp shuffle reduces. Larger
// M runs in tiles of 16 rows. This is the CUDA-core baseline the tensor-core kernel is measured
// against; it needs K % 32 == 0 and group_size % 32 == 0.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {

namespace {

constexpr int kWarpsPerBlock = 4;
constexpr int kPerLane = 32;  // weights per lane per step: 16 bytes of nibbles

template <typename T, int kRows>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    w4a16_rows_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight, const T* __restrict__ scales,
                      const uint8_t* __restrict__ zeros, T* __restrict__ out, int M, int N, int K, int group_size) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.x * kWarpsPerBlock + warp;
  const int m0 = blockIdx.y * kRows;
  if (n >= N) return;
  const int rows = min(kRows, M - m0);
  const int groups = K / group_size;
  const uint8_t* wrow = qweight + int64_t(n) * (K / 2);
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = 0.f;

  for (int k0 = lane * kPerLane; k0 < K; k0 += 32 * kPerLane) {
    const uint4 packed = *reinterpret_cast<const uint4*>(wrow + k0 / 2);
    const int g = k0 / group_size;
    const float s = to_float(scales[int64_t(n) * groups + g]);
    const float z = zeros != nullptr ? float(zeros[int64_t(n) * groups + g]) : 8.f;
    float w[kPerLane];
    const uint32_t words[4] = {packed.x, packed.y, packed.z, packed.w};
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) w[i * 8 + j] = (float((words[i] >> (4 * j)) & 0xF) - z) * s;
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      if (r >= rows) break;
      const T* xr = x + int64_t(m0 + r) * K + k0;
      float a = 0.f;
#pragma unroll
      for (int v = 0; v < kPerLane / 8; ++v) {
        float xv[8];
        load8(xr + v * 8, xv);
#pragma unroll
        for (int j = 0; j < 8; ++j) a = fmaf(xv[j], w[v * 8 + j], a);
      }
      acc[r] += a;
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) acc[r] = warp_sum(acc[r]);
  if (lane == 0)
#pragma unroll
    for (int r = 0; r < kRows; ++r)
      if (r < rows) out[int64_t(m0 + r) * N + n] = from_float<T>(acc[r]);
}

template <typename T>
cudaError_t launch(const W4A16Params& p, cudaStream_t stream) {
  return with_row_tile(p.M, [&]<int kRows>() {
    const dim3 grid((p.N + kWarpsPerBlock - 1) / kWarpsPerBlock, (p.M + kRows - 1) / kRows);
    w4a16_rows_kernel<T, kRows><<<grid, kWarpsPerBlock * 32, 0, stream>>>(
        static_cast<const T*>(p.x), p.qweight, static_cast<const T*>(p.scales), p.zeros, static_cast<T*>(p.out),
        p.M, p.N, p.K, p.group_size);
    return cudaGetLastError();
  });
}

}  // namespace

bool w4a16_supported(int K, int group_size) {
  return K > 0 && K % kPerLane == 0 && group_size > 0 && group_size % kPerLane == 0 && K % group_size == 0;
}

cudaError_t w4a16_gemm(const W4A16Params& p, cudaStream_t stream) {
  if (!w4a16_supported(p.K, p.group_size) || p.M < 0 || p.N < 0) return cudaErrorInvalidValue;
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  return p.dtype == DType::kFloat16 ? launch<__half>(p, stream) : launch<__nv_bfloat16>(p, stream);
}

}  // namespace flashpage::cuda
