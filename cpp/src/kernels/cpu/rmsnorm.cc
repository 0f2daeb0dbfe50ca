// RMSNorm (+ fused residual add), compiled once per ISA level (see cmake/flashpage_isa.cmake).
#include <cmath>

#include "kernels/cpu/kernels.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {


void rms_norm(float* out, const float* x, float* residual, const float* weight, int64_t rows,
              int64_t dim, float eps) {
  const int64_t vec_end = dim - dim % kLanes;
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;
    float* res = residual ? residual + r * dim : nullptr;
    const float* src = res ? res : xr;
    float* o = out + r * dim;
    Vec acc = vzero();
    float tail = 0;
    for (int64_t i = 0; i < vec_end; i += kLanes) {
      Vec v = vload(xr + i);
      if (res) {
        v = vadd(v, vload(res + i));
        vstore(res + i, v);
      }
      acc = vfma(v, v, acc);
    }
    for (int64_t i = vec_end; i < dim; ++i) {
      const float v = res ? (res[i] += xr[i]) : xr[i];
      tail += v * v;
    }
    const float scale = 1.0f / std::sqrt((vsum(acc) + tail) / static_cast<float>(dim) + eps);
    const Vec vs = vset1(scale);
    for (int64_t i = 0; i < vec_end; i += kLanes)
      vstore(o + i, vmul(vmul(vload(src + i), vs), vload(weight + i)));
    for (int64_t i = vec_end; i < dim; ++i) o[i] = src[i] * scale * weight[i];
  }
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
