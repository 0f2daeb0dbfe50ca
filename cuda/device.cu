// The device entries of the C ABI table (cpp/src/runtime/cuda_abi.h; the table itself is built
// in ops_abi.cu): device count and names, and axpy, a round trip that proves the build, the
// loading and the device work.
#include <cuda_runtime.h>

#include <cstdio>
#include <type_traits>

#include "abi.h"
#include "runtime/cuda_abi.h"

namespace {

__global__ void axpy_kernel(int n, float a, const float* x, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = a * x[i] + y[i];
}

}  // namespace

FLASHPAGE_INTERNAL int flashpage_cuda_device_count(int* count, char* err, size_t err_len) {
  *count = 0;
  const cudaError_t e = cudaGetDeviceCount(count);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) {
    *count = 0;
    return 0;
  }
  return flashpage::cuda::report(e, "cudaGetDeviceCount", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_device_name(int device, char* name, size_t name_len, char* err,
                                                size_t err_len) {
  cudaDeviceProp prop{};
  const cudaError_t e = cudaGetDeviceProperties(&prop, device);
  if (e != cudaSuccess) return flashpage::cuda::report(e, "cudaGetDeviceProperties", err, err_len);
  std::snprintf(name, name_len, "%s (sm_%d%d)", prop.name, prop.major, prop.minor);
  return 0;
}

FLASHPAGE_INTERNAL int flashpage_cuda_axpy(int n, float a, const float* x, float* y, char* err,
                                         size_t err_len) {
  if (n <= 0) return 0;
  float *dx = nullptr, *dy = nullptr;
  const size_t bytes = sizeof(float) * static_cast<size_t>(n);
  cudaError_t e = cudaMalloc(&dx, bytes);
  if (e == cudaSuccess) e = cudaMalloc(&dy, bytes);
  if (e == cudaSuccess) e = cudaMemcpy(dx, x, bytes, cudaMemcpyHostToDevice);
  if (e == cudaSuccess) e = cudaMemcpy(dy, y, bytes, cudaMemcpyHostToDevice);
  if (e == cudaSuccess) {
    axpy_kernel<<<(n + 255) / 256, 256>>>(n, a, dx, dy);
    e = cudaGetLastError();
  }
  if (e == cudaSuccess) e = cudaMemcpy(y, dy, bytes, cudaMemcpyDeviceToHost);
  cudaFree(dx);
  cudaFree(dy);
  return flashpage::cuda::report(e, "flashpage_cuda_axpy", err, err_len);
}

// Their types are the table's (ops_abi.cu declares them from it).
static_assert(std::is_same_v<decltype(&flashpage_cuda_device_count), decltype(flashpage_cuda_ops::device_count)>);
static_assert(std::is_same_v<decltype(&flashpage_cuda_device_name), decltype(flashpage_cuda_ops::device_name)>);
static_assert(std::is_same_v<decltype(&flashpage_cuda_axpy), decltype(flashpage_cuda_ops::axpy)>);
