// A weight matrix as the backends take it: as loaded (fp32, bf16, or int8 / 4-bit blocks) or in a
// backend's own layout. Here, below the model, so that backends need nothing from above them.
#pragma once

#include <cstdint>

namespace flashpage::backends {

struct Matrix {
  const void* data = nullptr;
  bool bf16 = false;
  int64_t rows = 0, cols = 0;  // [out, in]
  bool packed = false;         // in a backend's layout (Backend::load_linear)
  // int8 weights in 32-value blocks along a row, w = q * scale + min (GGUF's Q8_0, Q4_0, Q4_1,
  // Q5_0, Q5_1, Q4_K, Q5_K exactly; Q6_K requantized): data is int8 q [rows, cols], followed in
  // the same buffer by the blocks' fp32 scales, then mins [rows, cols / 32]. bf16 is then
  // meaningless.
  bool int8 = false;
  // With int8: 8, or the q's width when every q is in [0, 2^bits): 4 (Q4_0, Q4_1, Q4_K) or 5
  // (Q5_0, Q5_1, Q5_K), which a backend may pack below a byte.
  int bits = 8;
  // Packed (CPU, sub-byte): the scales and mins are kept as fp16, every one of them exactly.
  bool half_scales = false;
};

}  // namespace flashpage::backends
