// The CUDA backend's Linear layers, composed from the kernels and cuBLASLt: the choice of kernel
// by M lives here, once, for the executor and for the C ABI. All return 0, or -1 with a message.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "blaslt.h"
#include "kernels/kernels.h"

namespace flashpage::cuda {

// From this many rows up (config -1), W4A16 dequantizes the weights in row chunks into the
// workspace and runs cuBLASLt's dense GEMM: at prefill sizes the GEMM is compute-bound and the
// dequantization is a small, bandwidth-bound extra.
constexpr int kW4A16DenseFromM = 512;
constexpr int kW4A16ForceDense = -2;  // a config value that forces that path (tuning, tests)

// Bytes of workspace w4a16_linear needs for these arguments (0: none).
int64_t w4a16_linear_workspace(int M, int N, int K, int config);
// y = x . dequant(W)^T on repacked weights (w4a16_repack), by the tensor-core kernel or, for
// large M, dequantize + dense GEMM.
int w4a16_linear(const W4A16MmaParams& p, void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                 char* err, size_t err_len);

// Bytes of workspace fp8_linear needs: the quantized activations and their scales.
int64_t fp8_linear_workspace(int M, int K);
// y [M, N] (dtype) = fp8(x per token) . w_fp8 [N, K]^T * x_scale[m] * w_scales[n] (float32 [N];
// a per-tensor scale is expanded to N by the caller, once at load).
int fp8_linear(DType dtype, const void* x, const void* w_fp8, const float* w_scales, void* out, int M, int N,
               int K, bool fast_accum, void* workspace, int64_t workspace_bytes, cudaStream_t stream, char* err,
               size_t err_len);

// Up to this many rows (mode -1) W8A8-INT8 runs the __dp4a kernel; beyond, cuBLASLt's int8
// tensor-core GEMM into int32 row chunks of the workspace, then the scale epilogue.
constexpr int kW8A8DenseFromM = 32;

// Bytes of workspace w8a8_linear needs: quantized activations, their scales, the int32 chunk.
int64_t w8a8_linear_workspace(int M, int N, int K, int mode);
// y [M, N] (dtype) = int8(x per token) . wq [N, K]^T * x_scale[m] * w_scales[n]; mode -1 chooses by
// M, 0 forces the __dp4a kernel, 1 cuBLASLt.
int w8a8_linear(DType dtype, const void* x, const int8_t* wq, const float* w_scales, void* out, int M, int N, int K,
                int mode, void* workspace, int64_t workspace_bytes, cudaStream_t stream, char* err, size_t err_len);

}  // namespace flashpage::cuda
