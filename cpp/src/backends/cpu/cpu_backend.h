// The CPU backend: one kernel table (an ISA level, kernels/cpu/) and the global thread pool.
#pragma once

#include <memory>

#include "backends/backend.h"
#include "kernels/cpu/kernels.h"

namespace flashpage::backends {

// Weights and the KV cache in bf16 when bf16_weights (computing in bf16 where the table's level
// has bf16 dot products), else fp32. Batch-invariant: every kernel computes a row in an order
// fixed by that row alone, and the work splits below never change it.
std::unique_ptr<Backend> make_cpu_backend(const cpu::KernelTable& kernels, bool bf16_weights);

}  // namespace flashpage::backends
