// The bf16-compute Linear of the levels with bf16 dot products (linear_bf16.cc), called by
// linear.cc's entry points for bf16 weights. Include only from sources compiled per ISA level.
#pragma once

#include <cstdint>

namespace flashpage::cpu::FLASHPAGE_ISA {

#if defined(__AVX512BF16__)
// Columns [n_begin, n_end) of w [N, K] (n_begin a multiple of 32) into the bf16 pair panels.
void pack_linear_bf16(uint16_t* dst, const uint16_t* w, int64_t N, int64_t K, int64_t n_begin, int64_t n_end);
// y[m * ldy + n] = x[m] . w[n] (+ bias[n]) with x as to_bf16_rows wrote it.
void linear_bf16(float* y, const uint16_t* x, const uint16_t* w, const float* bias, int64_t M, int64_t ldy,
                 int64_t K, int64_t n_begin, int64_t n_end);
void to_bf16_rows(uint16_t* dst, const float* x, int64_t M, int64_t K);
// The level's gate_up_silu (kernels.h) for packed bf16 gate and up.
bool gate_up_silu_bf16(uint16_t* out, const uint16_t* x, const uint16_t* gate, const uint16_t* up, int64_t M,
                       int64_t K, int64_t inter, int64_t p_begin, int64_t p_end);
#endif

}  // namespace flashpage::cpu::FLASHPAGE_ISA
