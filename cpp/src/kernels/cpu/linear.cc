// Linear layers (x . W^T) for the decode-shaped case, compiled once per ISA level: each weight
// row is streamed once and applied to up to 4 input rows at a time, so at batch 1 the kernel
// runs at the speed of reading the weights.
#include "kernels/cpu/kernels.h"
#include "kernels/cpu/simd.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

namespace {

constexpr int kRows = 4;  // input rows per pass over a weight row

template <class W, int R>
void rows_block(float* y, const float* x, const W* w, const float* bias, int64_t N, int64_t K,
                int64_t n_begin, int64_t n_end) {
  const int64_t vec_end = K - K % kLanes;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const W* wr = w + n * K;
    Vec acc[R];
    for (int r = 0; r < R; ++r) acc[r] = vzero();
    for (int64_t k = 0; k < vec_end; k += kLanes) {
      const Vec wv = vload_as_f32(wr + k);
      for (int r = 0; r < R; ++r) acc[r] = vfma(vload(x + r * K + k), wv, acc[r]);
    }
    for (int r = 0; r < R; ++r) {
      float s = vsum(acc[r]);
      for (int64_t k = vec_end; k < K; ++k) s += x[r * K + k] * scalar_as_f32(wr + k);
      y[r * N + n] = s + (bias ? bias[n] : 0.f);
    }
  }
}

template <class W>
void run(float* y, const float* x, const W* w, const float* bias, int64_t M, int64_t N, int64_t K,
         int64_t n_begin, int64_t n_end) {
  int64_t m = 0;
  for (; m + kRows <= M; m += kRows)
    rows_block<W, kRows>(y + m * N, x + m * K, w, bias, N, K, n_begin, n_end);
  switch (M - m) {
    case 3: rows_block<W, 3>(y + m * N, x + m * K, w, bias, N, K, n_begin, n_end); break;
    case 2: rows_block<W, 2>(y + m * N, x + m * K, w, bias, N, K, n_begin, n_end); break;
    case 1: rows_block<W, 1>(y + m * N, x + m * K, w, bias, N, K, n_begin, n_end); break;
    default: break;
  }
}

}  // namespace

void linear(float* y, const float* x, const void* w, bool w_bf16, const float* bias, int64_t M,
            int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  if (w_bf16) run(y, x, static_cast<const uint16_t*>(w), bias, M, N, K, n_begin, n_end);
  else run(y, x, static_cast<const float*>(w), bias, M, N, K, n_begin, n_end);
}

}  // namespace flashpage::cpu::FLASHPAGE_ISA
