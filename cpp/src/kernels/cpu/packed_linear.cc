// Packed Linear weights: packing a weight into a kernel table's layout once at load, and
// running a Linear on it, split by output panels across the thread pool.
#include <algorithm>
#include <cmath>

#include "kernels/cpu/kernels.h"
#include "runtime/thread_pool.h"

namespace flashpage::cpu {

size_t packed_linear_bytes(const KernelTable& t, bool w_bf16, int64_t N, int64_t K) {
  return size_t(t.packed_linear_elems(w_bf16, N, K)) * (w_bf16 ? 2 : 4);
}

void pack_linear_weight(const KernelTable& t, void* dst, const void* w, bool w_bf16, int64_t N, int64_t K) {
  const int64_t panel = t.linear_panel();
  runtime::ThreadPool::global().parallel_for(linear_panels(panel, N), [&](int64_t b, int64_t e) {
    t.pack_linear(dst, w, w_bf16, N, K, b * panel, std::min(N, e * panel));
  }, std::max<int64_t>(1, (int64_t(1) << 18) / (panel * K + 1)));
}

PackedLinear pack_linear_weight(const KernelTable& t, const void* w, bool w_bf16, int64_t N, int64_t K) {
  PackedLinear p{runtime::HostBuffer(packed_linear_bytes(t, w_bf16, N, K)), w_bf16, N, K};
  pack_linear_weight(t, p.data.data(), w, w_bf16, N, K);
  return p;
}

void run_linear(const KernelTable& t, const PackedLinear& w, float* y, int64_t ldy, const void* input,
                const float* bias, int64_t M, bool parallel) {
  const int64_t panel = t.linear_panel(), panels = linear_panels(panel, w.N);
  auto part = [&](int64_t p0, int64_t p1) {
    t.linear(y, input, w.data.data(), w.bf16, bias, M, ldy, w.K, p0 * panel, std::min(w.N, p1 * panel));
  };
  if (parallel) runtime::ThreadPool::global().parallel_for(panels, part, linear_grain(M));
  else part(0, panels);
}

namespace {
// Nearest integer, ties away from zero, clamped to the int8 range: branch-free (vectorises).
inline int32_t round_q8(float v) {
  const float r = v + (v >= 0.f ? 0.5f : -0.5f);
  return std::clamp(int32_t(r), -127, 127);
}
}  // namespace

void quantize_q8_rows(const float* x, int64_t M, int64_t K, int8_t* qs, float* d, int32_t* sums, int8_t* qs2,
                      int32_t* sums2, float* du, bool tiled) {
  const int64_t B = K / 32;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < B; ++b) {
      const float* v = x + m * K + b * 32;
      const int64_t at = q8_offset(tiled, m, b * 32, K);
      int8_t* q = qs + at;
      float amax = 0.f;
      for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float scale = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
      int32_t sum = 0, sum2 = 0;
      for (int j = 0; j < 32; ++j) {
        q[j] = int8_t(round_q8(v[j] * inv));
        sum += q[j];
      }
      if (qs2) {  // the rounding error, |r| <= scale / 2, in steps of scale / 254
        int8_t* q2 = qs2 + at;
        for (int j = 0; j < 32; ++j) {
          q2[j] = int8_t(round_q8((v[j] - float(q[j]) * scale) * inv * 254.f));
          sum2 += q2[j];
        }
      }
      d[m * B + b] = scale;
      sums[m * B + b] = sum;
      if (sums2) sums2[m * B + b] = sum2;
      if (du) du[m * B + b] = scale * std::fma(float(sum2), kQ8Level2, float(sum));
    }
}

}  // namespace flashpage::cpu
