// The small kernels the executor needs around the big ones (kernels.h): gathering embedding
// rows and the rows that need logits, the Linear bias, and widening logits to fp32.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {
namespace {

// One block per output row; 16-byte copies when the row allows.
__global__ void gather_rows_kernel(char* __restrict__ out, const char* __restrict__ src,
                                   const int32_t* __restrict__ rows, int64_t row_bytes) {
  const int64_t r = rows[blockIdx.x];
  const char* s = src + r * row_bytes;
  char* d = out + int64_t(blockIdx.x) * row_bytes;
  if (row_bytes % 16 == 0) {
    for (int64_t i = threadIdx.x; i < row_bytes / 16; i += blockDim.x)
      reinterpret_cast<uint4*>(d)[i] = reinterpret_cast<const uint4*>(s)[i];
  } else {
    for (int64_t i = threadIdx.x; i < row_bytes; i += blockDim.x) d[i] = s[i];
  }
}

template <typename T>
__global__ void add_bias_kernel(T* __restrict__ y, int64_t ldy, const T* __restrict__ bias, int n) {
  T* row = y + int64_t(blockIdx.x) * ldy;
  for (int i = threadIdx.x; i < n; i += blockDim.x) row[i] = from_float<T>(to_float(row[i]) + to_float(bias[i]));
}

template <typename T>
__global__ void widen_kernel(float* __restrict__ out, const T* __restrict__ in, int64_t n) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    out[i] = to_float(in[i]);
}

}  // namespace

cudaError_t gather_rows(void* out, const void* src, const int32_t* rows, int n, int64_t row_bytes,
                        cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  gather_rows_kernel<<<n, 256, 0, stream>>>(static_cast<char*>(out), static_cast<const char*>(src), rows,
                                            row_bytes);
  return cudaGetLastError();
}

cudaError_t add_bias(DType dtype, void* y, int64_t ldy, const void* bias, int rows, int n, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
      add_bias_kernel<T><<<rows, 256, 0, stream>>>(static_cast<T*>(y), ldy, static_cast<const T*>(bias), n));
  return cudaGetLastError();
}

cudaError_t widen_to_float(DType dtype, float* out, const void* in, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int blocks = int((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
      widen_kernel<T><<<blocks, 256, 0, stream>>>(out, static_cast<const T*>(in), n));
  return cudaGetLastError();
}

}  // namespace flashpage::cuda
