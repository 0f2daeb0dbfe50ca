// Packed Linear weights: packing a weight into a kernel table's layout once at load, and
// running a Linear on it, split by output panels across the thread pool.
#include <algorithm>

#include "kernels/cpu/kernels.h"
#include "runtime/thread_pool.h"

namespace flashpage::cpu {

PackedLinear pack_linear_weight(const KernelTable& t, const void* w, bool w_bf16, int64_t N, int64_t K) {
  const int64_t panel = t.linear_panel();
  PackedLinear p{runtime::HostBuffer(size_t(t.packed_linear_elems(w_bf16, N, K)) * (w_bf16 ? 2 : 4)), w_bf16, N, K};
  runtime::ThreadPool::global().parallel_for(linear_panels(panel, N), [&](int64_t b, int64_t e) {
    t.pack_linear(p.data.data(), w, w_bf16, N, K, b * panel, std::min(N, e * panel));
  }, std::max<int64_t>(1, (int64_t(1) << 18) / (panel * K + 1)));
  return p;
}

void run_linear(const KernelTable& t, const PackedLinear& w, float* y, int64_t ldy, const void* input,
                const float* bias, int64_t M, bool parallel) {
  const int64_t panel = t.linear_panel(), panels = linear_panels(panel, w.N);
  auto part = [&](int64_t p0, int64_t p1) {
    t.linear(y, input, w.data.data(), w.bf16, bias, M, ldy, w.K, p0 * panel, std::min(w.N, p1 * panel));
  };
  if (parallel) runtime::ThreadPool::global().parallel_for(panels, part, 1);
  else part(0, panels);
}

}  // namespace flashpage::cpu
