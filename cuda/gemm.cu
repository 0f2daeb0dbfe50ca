// See gemm.h.
#include "gemm.h"

#include <algorithm>
#include <cstdio>

#include "abi.h"

namespace flashpage::cuda {

namespace {

constexpr int64_t kDequantChunkBytes = int64_t(64) << 20;  // bounds the dense weight chunk
constexpr int64_t kInt32ChunkBytes = int64_t(64) << 20;    // bounds W8A8's int32 output chunk

int64_t align256(int64_t bytes) { return (bytes + 255) / 256 * 256; }

// The W8A8 GEMMs' workspace starts with the activations quantized per token: M x K bytes, then
// M float scales, each 256-byte aligned.
int64_t quantized_bytes(int M, int K) { return align256(int64_t(M) * K) + align256(int64_t(M) * 4); }
float* quantized_scales(void* workspace, int M, int K) {
  return reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(int64_t(M) * K));
}

bool dense_path(int M, int config) { return config == kW4A16ForceDense || (config == -1 && M >= kW4A16DenseFromM); }

// Rows of W dequantized at a time: a multiple of 16, at most kDequantChunkBytes of 16-bit values.
int chunk_rows(int N, int K) {
  const int64_t rows = std::max<int64_t>(16, kDequantChunkBytes / (int64_t(K) * 2) / 16 * 16);
  return int(std::min<int64_t>(N, rows));
}

int too_small(const char* what, int64_t need, int64_t have, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0)
    std::snprintf(err, err_len, "%s: the workspace has %lld bytes, this call needs %lld", what,
                  static_cast<long long>(have), static_cast<long long>(need));
  return -1;
}

}  // namespace

int64_t w4a16_linear_workspace(int M, int N, int K, int config) {
  if (!dense_path(M, config) || N <= 0 || K <= 0) return 0;
  return int64_t(chunk_rows(N, K)) * K * 2;
}

int w4a16_linear(const W4A16MmaParams& p, void* workspace, int64_t workspace_bytes, cudaStream_t stream,
                 char* err, size_t err_len) {
  if (!dense_path(p.M, p.config))
    return report(w4a16_mma_gemm(p, stream), "w4a16_mma_gemm", err, err_len);
  const int64_t need = w4a16_linear_workspace(p.M, p.N, p.K, p.config);
  if (workspace == nullptr || workspace_bytes < need) return too_small("w4a16_linear", need, workspace_bytes, err, err_len);
  const int rows = chunk_rows(p.N, p.K);
  const GemmInput input = p.dtype == DType::kBFloat16 ? GemmInput::kBFloat16 : GemmInput::kFloat16;
  for (int n0 = 0; n0 < p.N; n0 += rows) {
    const int nc = std::min(rows, p.N - n0);
    const int rc = report(w4a16_dequantize(p.dtype, p.packed, p.scales_t, p.zeros_t, workspace, p.N, p.K,
                                           p.group_size, n0, nc, stream),
                          "w4a16_dequantize", err, err_len);
    if (rc != 0) return rc;
    // The chunk is columns n0 .. n0 + nc of out: the same rows, ldo = N.
    const LtGemmParams g{input, p.dtype, p.x, workspace, static_cast<char*>(p.out) + int64_t(n0) * 2, nullptr,
                         nullptr, p.M, nc, p.K, p.N};
    if (lt_gemm(g, stream, err, err_len) != 0) return -1;
  }
  return 0;
}

int64_t fp8_linear_workspace(int M, int K) { return M <= 0 || K <= 0 ? 0 : quantized_bytes(M, K); }

int fp8_linear(DType dtype, const void* x, const void* w_fp8, const float* w_scales, void* out, int M, int N,
               int K, bool fast_accum, void* workspace, int64_t workspace_bytes, cudaStream_t stream, char* err,
               size_t err_len) {
  if (M == 0 || N == 0) return 0;
  const int64_t need = fp8_linear_workspace(M, K);
  if (workspace == nullptr || workspace_bytes < need) return too_small("fp8_linear", need, workspace_bytes, err, err_len);
  void* xq = workspace;
  float* x_scales = quantized_scales(workspace, M, K);
  const int rc = report(quantize_per_token_fp8(dtype, x, xq, x_scales, M, K, stream), "quantize_per_token_fp8",
                        err, err_len);
  if (rc != 0) return rc;
  LtGemmParams g{GemmInput::kFp8E4M3, dtype, xq, w_fp8, out, x_scales, w_scales, M, N, K, N, fast_accum};
  return lt_gemm(g, stream, err, err_len);
}

namespace {

bool int8_tensor_cores(int M, int mode) { return mode == 1 || (mode == -1 && M > kW8A8DenseFromM); }

int int32_chunk_rows(int M, int N) {
  return int(std::clamp<int64_t>(kInt32ChunkBytes / (int64_t(N) * 4), 1, std::max(M, 1)));
}

}  // namespace

int64_t w8a8_linear_workspace(int M, int N, int K, int mode) {
  if (M <= 0 || N <= 0 || K <= 0) return 0;
  return quantized_bytes(M, K) + (int8_tensor_cores(M, mode) ? int64_t(int32_chunk_rows(M, N)) * N * 4 : 0);
}

int w8a8_linear(DType dtype, const void* x, const int8_t* wq, const float* w_scales, void* out, int M, int N, int K,
                int mode, void* workspace, int64_t workspace_bytes, cudaStream_t stream, char* err, size_t err_len) {
  if (M == 0 || N == 0) return 0;
  const int64_t need = w8a8_linear_workspace(M, N, K, mode);
  if (workspace == nullptr || workspace_bytes < need) return too_small("w8a8_linear", need, workspace_bytes, err, err_len);
  auto* xq = static_cast<int8_t*>(workspace);
  float* x_scales = quantized_scales(workspace, M, K);
  int rc = report(quantize_per_token_int8(dtype, x, xq, x_scales, M, K, stream), "quantize_per_token_int8", err,
                  err_len);
  if (rc != 0) return rc;
  if (!int8_tensor_cores(M, mode)) {
    const W8A8Params p{dtype, xq, x_scales, wq, w_scales, out, M, N, K};
    return report(w8a8_gemm(p, stream), "w8a8_gemm", err, err_len);
  }
  auto* acc = reinterpret_cast<int32_t*>(static_cast<char*>(workspace) + quantized_bytes(M, K));
  const int rows = int32_chunk_rows(M, N);
  for (int m0 = 0; m0 < M; m0 += rows) {
    const int mc = std::min(rows, M - m0);
    const LtGemmParams g{GemmInput::kInt8, dtype, xq + int64_t(m0) * K, wq, acc, nullptr, nullptr, mc, N, K, N};
    if (lt_gemm(g, stream, err, err_len) != 0) return -1;
    rc = report(w8a8_scale_output(dtype, acc, x_scales + m0, w_scales, static_cast<char*>(out) + int64_t(m0) * N * 2,
                                  mc, N, stream),
                "w8a8_scale_output", err, err_len);
    if (rc != 0) return rc;
  }
  return 0;
}

}  // namespace flashpage::cuda
