// The CUDA backend: the kernels of libflashpage_cuda (cuda/), reached through the one C ABI
// table (runtime/cuda_abi.h) that the loader probes at run time, so that the core itself
// needs no CUDA headers or libraries. Weights, activations and the KV cache are bf16 on the
// device; logits are widened to fp32 for the sampler.
#pragma once

#include <memory>

#include "backends/backend.h"

namespace flashpage::backends {

// Throws std::runtime_error naming what is missing: the library, a driver, the device, or
// (for an older library) the executor's entries.
std::unique_ptr<Backend> make_cuda_backend(int device);

}  // namespace flashpage::backends
