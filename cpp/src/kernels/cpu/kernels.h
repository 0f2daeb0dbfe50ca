// CPU kernels: one table of entry points per ISA level, plus the scalar reference that every
// vectorised kernel is tested against.
#pragma once

#include <cstdint>

#include "runtime/cpu_features.h"

namespace flashpage::cpu {

// Declares one ISA level's entry points (each ISA source defines them in its namespace).
#define FLASHPAGE_CPU_KERNEL_DECLS                                                         \
  /* RMSNorm over rows of x, fused with the residual add when residual is non-null:  */    \
  /* residual += x; out = residual * rsqrt(mean(residual^2) + eps) * weight.           */  \
  void rms_norm(float* out, const float* x, float* residual, const float* weight,          \
                int64_t rows, int64_t dim, float eps);

namespace ref { FLASHPAGE_CPU_KERNEL_DECLS }
namespace avx2 { FLASHPAGE_CPU_KERNEL_DECLS }
namespace avx512 { FLASHPAGE_CPU_KERNEL_DECLS }
namespace generic { FLASHPAGE_CPU_KERNEL_DECLS }

struct KernelTable {
  runtime::Isa isa;
  decltype(&ref::rms_norm) rms_norm;
};

// The table for the active ISA (runtime::active_isa()).
const KernelTable& kernels();
// The table for a given level; throws std::invalid_argument if this build or CPU lacks it.
const KernelTable& kernels_for(runtime::Isa isa);

}  // namespace flashpage::cpu
