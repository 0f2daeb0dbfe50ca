// Finds and loads libflashpage_cuda at run time, only when an NVIDIA driver is present: a probe
// of what is there (the CUDA backend itself is backends/cuda).
#pragma once

#include <string>
#include <vector>

#include "runtime/cuda_abi.h"

namespace flashpage::runtime {

struct CudaProbe {
  bool available = false;     // loaded, and at least one device
  bool driver_found = false;  // libcuda.so.1 could be opened
  std::string library_path;   // where libflashpage_cuda was looked for or loaded from
  std::string reason;         // why it is not available
  int device_count = 0;
  std::vector<std::string> device_names;
  const flashpage_cuda_ops* ops = nullptr;  // the library's table (runtime/cuda_abi.h)
};

// Probes once (thread-safe) and caches the result. The library is looked for in
// $FLASHPAGE_CUDA_LIBRARY, else beside the binary that holds the flashpage core.
const CudaProbe& cuda_probe();

// y = a * x + y on the GPU; throws std::runtime_error if the backend is not available.
void cuda_axpy(float a, const std::vector<float>& x, std::vector<float>& y);

}  // namespace flashpage::runtime
