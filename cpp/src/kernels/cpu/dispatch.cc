#include <cmath>
#include <stdexcept>
#include <string>

#include "kernels/cpu/kernels.h"

namespace flashpage::cpu {

namespace ref {

void rms_norm(float* out, const float* x, float* residual, const float* weight, int64_t rows,
              int64_t dim, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* src = residual ? residual + r * dim : nullptr;
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) {
      const float v = src ? (src[i] += xr[i]) : xr[i];
      ss += static_cast<double>(v) * v;
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(ss / dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = (src ? src[i] : xr[i]) * scale * weight[i];
  }
}

}  // namespace ref

namespace {
constexpr KernelTable kRef{runtime::Isa::kScalar, &ref::rms_norm};
#ifdef FLASHPAGE_HAS_ISA_avx2
constexpr KernelTable kAvx2{runtime::Isa::kAvx2, &avx2::rms_norm};
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512
constexpr KernelTable kAvx512{runtime::Isa::kAvx512, &avx512::rms_norm};
#endif
}  // namespace

const KernelTable& kernels_for(runtime::Isa isa) {
  for (runtime::Isa s : runtime::supported_isas()) {
    if (s != isa) continue;
    switch (isa) {
      case runtime::Isa::kScalar: return kRef;
#ifdef FLASHPAGE_HAS_ISA_avx2
      case runtime::Isa::kAvx2: return kAvx2;
#endif
#ifdef FLASHPAGE_HAS_ISA_avx512
      case runtime::Isa::kAvx512: return kAvx512;
#endif
      default: break;
    }
  }
  throw std::invalid_argument(std::string("CPU kernels for ISA '") + runtime::isa_name(isa) +
                              "' are not available in this build or on this CPU");
}

const KernelTable& kernels() {
  static const KernelTable& table = kernels_for(runtime::active_isa());
  return table;
}

}  // namespace flashpage::cpu
