// The executor's entries of the C ABI table (cpp/src/runtime/cuda_abi.h; the table is built in
// ops_abi.cu): memory, streams, and the glue kernels of the forward pass.
#include <cuda_runtime.h>

#include <type_traits>

#include "abi.h"
#include "blaslt.h"
#include "kernels/kernels.h"
#include "runtime/cuda_abi.h"

namespace {

using flashpage::cuda::DType;
using flashpage::cuda::invalid;
using flashpage::cuda::report;

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

}  // namespace

FLASHPAGE_INTERNAL int flashpage_cuda_set_device(int device, char* err, size_t err_len) {
  return report(cudaSetDevice(device), "cudaSetDevice", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_mem_info(size_t* free_bytes, size_t* total_bytes, char* err, size_t err_len) {
  return report(cudaMemGetInfo(free_bytes, total_bytes), "cudaMemGetInfo", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_device_malloc(void** ptr, size_t bytes, char* err, size_t err_len) {
  *ptr = nullptr;
  if (bytes == 0) return 0;
  if (report(cudaMalloc(ptr, bytes), "cudaMalloc", err, err_len) != 0) return -1;
  return report(cudaMemset(*ptr, 0, bytes), "cudaMemset", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_device_free(void* ptr, char* err, size_t err_len) {
  return report(cudaFree(ptr), "cudaFree", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_host_malloc(void** ptr, size_t bytes, char* err, size_t err_len) {
  *ptr = nullptr;
  if (bytes == 0) return 0;
  return report(cudaMallocHost(ptr, bytes), "cudaMallocHost", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_host_free(void* ptr, char* err, size_t err_len) {
  return report(cudaFreeHost(ptr), "cudaFreeHost", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_memcpy_async(void* dst, const void* src, size_t bytes, void* stream, char* err,
                                                 size_t err_len) {
  if (bytes == 0) return 0;
  return report(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, as_stream(stream)), "cudaMemcpyAsync", err,
                err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_stream_create(void** stream, char* err, size_t err_len) {
  cudaStream_t s = nullptr;
  const int rc = report(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate", err, err_len);
  *stream = s;
  return rc;
}

FLASHPAGE_INTERNAL int flashpage_cuda_stream_destroy(void* stream, char* err, size_t err_len) {
  return report(cudaStreamDestroy(as_stream(stream)), "cudaStreamDestroy", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_stream_synchronize(void* stream, char* err, size_t err_len) {
  return report(cudaStreamSynchronize(as_stream(stream)), "cudaStreamSynchronize", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_gather_rows(const void* src, const int32_t* rows, void* out, int n,
                                                int64_t row_bytes, void* stream, char* err, size_t err_len) {
  if (n < 0 || row_bytes <= 0) return invalid("gather_rows: n must be >= 0 and row_bytes positive", err, err_len);
  return report(flashpage::cuda::gather_rows(out, src, rows, n, row_bytes, as_stream(stream)), "gather_rows", err,
                err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_linear(int dtype, const void* x, const void* w, const void* bias, void* out,
                                           int M, int N, int K, int ldo, void* stream, char* err, size_t err_len) {
  if (dtype != 0 && dtype != 1) return invalid("linear: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  if (ldo < N) return invalid("linear: ldo must be at least N", err, err_len);
  if (M == 0) return 0;
  const flashpage::cuda::LtGemmParams p{static_cast<flashpage::cuda::GemmInput>(dtype), static_cast<DType>(dtype), x, w,
                                        out, nullptr, nullptr, M, N, K, ldo};
  if (flashpage::cuda::lt_gemm(p, as_stream(stream), err, err_len) != 0) return -1;
  if (bias == nullptr) return 0;
  return report(flashpage::cuda::add_bias(static_cast<DType>(dtype), out, ldo, bias, M, N, as_stream(stream)),
                "add_bias", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_widen_to_float(int dtype, const void* in, float* out, int64_t n, void* stream,
                                                   char* err, size_t err_len) {
  if (dtype != 0 && dtype != 1) return invalid("widen_to_float: dtype must be 0 (fp16) or 1 (bf16)", err, err_len);
  return report(flashpage::cuda::widen_to_float(static_cast<DType>(dtype), out, in, n, as_stream(stream)),
                "widen_to_float", err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_attention_supported(int head_dim, int block_size, int num_q_heads,
                                                        int num_kv_heads) {
  return (flashpage::cuda::paged_decode_supported(head_dim, block_size, num_q_heads, num_kv_heads) ? 1 : 0) |
         (flashpage::cuda::paged_prefill_supported(head_dim, block_size, num_q_heads, num_kv_heads) ? 2 : 0);
}

// Capture mode ThreadLocal: another thread's CUDA calls (torch's sampler, say) neither join
// nor break the capture.
FLASHPAGE_INTERNAL int flashpage_cuda_graph_begin(void* stream, char* err, size_t err_len) {
  return report(cudaStreamBeginCapture(as_stream(stream), cudaStreamCaptureModeThreadLocal), "cudaStreamBeginCapture",
                err, err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_graph_end(void* stream, void** graph, char* err, size_t err_len) {
  cudaGraph_t g = nullptr;
  if (report(cudaStreamEndCapture(as_stream(stream), &g), "cudaStreamEndCapture", err, err_len) != 0) return -1;
  cudaGraphExec_t exec = nullptr;
  const int rc = report(cudaGraphInstantiate(&exec, g, 0), "cudaGraphInstantiate", err, err_len);
  cudaGraphDestroy(g);
  *graph = exec;
  return rc;
}

FLASHPAGE_INTERNAL int flashpage_cuda_graph_launch(void* graph, void* stream, char* err, size_t err_len) {
  return report(cudaGraphLaunch(static_cast<cudaGraphExec_t>(graph), as_stream(stream)), "cudaGraphLaunch", err,
                err_len);
}

FLASHPAGE_INTERNAL int flashpage_cuda_graph_destroy(void* graph, char* err, size_t err_len) {
  return report(cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(graph)), "cudaGraphExecDestroy", err, err_len);
}
