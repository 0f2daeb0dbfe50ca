// Shared by the C ABI's exporting files (cpp/src/runtime/cuda_abi.h): the export macro, and
// error reporting -- 0 on success, else a message in err (at most err_len bytes) and -1.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdio>

#define FLASHPAGE_EXPORT extern "C" __attribute__((visibility("default")))
// The entry points of the table (runtime/cuda_abi.h): C linkage, not exported by name.
#define FLASHPAGE_INTERNAL extern "C" __attribute__((visibility("hidden")))

namespace flashpage::cuda {

inline int report(cudaError_t e, const char* what, char* err, size_t err_len) {
  if (e == cudaSuccess) return 0;
  if (err != nullptr && err_len > 0)
    std::snprintf(err, err_len, "%s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
  return -1;
}

inline int invalid(const char* msg, char* err, size_t err_len) {
  if (err != nullptr && err_len > 0) std::snprintf(err, err_len, "%s", msg);
  return -1;
}

}  // namespace flashpage::cuda
