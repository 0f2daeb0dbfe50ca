// cuBLASLt, loaded at run time: the dense bf16/fp16 GEMM, the FP8 (e4m3) W8A8 GEMM with
// per-token x per-channel scales, and the int8 GEMM with int32 sums. The library is dlopen'ed on first use (it is torch's and the
// CUDA toolkit's; already in the process when torch with CUDA is), so libflashpage_cuda loads
// without it and only these GEMMs report its absence. FLASHPAGE_CUBLASLT may name the file.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernels/kernels.h"

namespace flashpage::cuda {

enum class GemmInput : int { kFloat16 = 0, kBFloat16 = 1, kFp8E4M3 = 2, kInt8 = 3 };

struct LtGemmParams {
  GemmInput input;          // the type of x and w
  DType out_dtype;          // of out (fp16 or bf16); int8 inputs give exact int32 sums instead
  const void* x;            // [M, K] row-major
  const void* w;            // [N, K] row-major: nn.Linear's weight
  void* out;                // [M, ldo] row-major; columns 0..N-1 are written
  const float* x_scales;    // fp8: [M], one per token; else nullptr
  const float* w_scales;    // fp8: [N], one per output channel; else nullptr
  int M, N, K, ldo;         // K % 16 == 0 for fp8 (cuBLASLt's alignment)
  bool fast_accum = false;  // fp8: Hopper's fast (less precise) accumulation
};

// out = x . w^T (times x_scales[m] * w_scales[n] for fp8), on `stream`. 0, or -1 with a message
// in err naming the problem (cuBLASLt missing, no algorithm for the shape, a cuBLAS status).
int lt_gemm(const LtGemmParams& p, cudaStream_t stream, char* err, size_t err_len);

// Whether cuBLASLt can be loaded; if not, why (in `why`).
bool lt_available(char* why, size_t why_len);

}  // namespace flashpage::cuda
