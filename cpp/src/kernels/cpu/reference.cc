// The reference kernels (namespace cpu::ref): plain scalar code, the definition every ISA
// level is tested against and the kernel table of the `scalar` level.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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

namespace {
// Element idx of an fp32 array, or of a bf16 one held as raw uint16.
float element(const void* data, bool bf16, int64_t idx) {
  if (!bf16) return static_cast<const float*>(data)[idx];
  const uint32_t bits = uint32_t(static_cast<const uint16_t*>(data)[idx]) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}
}  // namespace

void paged_attention(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end) {
  const int64_t D = a.head_dim, group = a.num_q_heads / a.num_kv_heads;
  for (int64_t s = seq_begin; s < seq_end; ++s) {
    const int64_t r0 = a.query_start_loc[s], r1 = a.query_start_loc[s + 1], ctx = a.context_lens[s];
    const int32_t* bt = a.block_tables + s * a.block_table_stride;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t pos = ctx - (r1 - r0) + (r - r0);
      const int64_t h_end = (a.kv_head_end > 0 ? a.kv_head_end : a.num_kv_heads) * group;
      for (int64_t h = a.kv_head_begin * group; h < h_end; ++h) {
        const int64_t row = (r - r0) * group + h % group;  // within its KV head's rows
        if (row < a.row_begin || (a.row_end > 0 && row >= a.row_end)) continue;
        const float* q = a.q + (r * a.num_q_heads + h) * D;
        std::vector<double> score(pos + 1);
        double mx = -INFINITY;
        for (int64_t p = 0; p <= pos; ++p) {
          const int64_t row = kv_row_offset(a, bt, h / group, p);
          double d = 0;
          for (int64_t i = 0; i < D; ++i) d += double(q[i]) * element(a.k_cache, a.kv_bf16, row + i);
          score[p] = d * a.scale;
          mx = std::max(mx, score[p]);
        }
        std::vector<double> out(D, 0.0);
        double sum = 0;
        for (int64_t p = 0; p <= pos; ++p) {
          const double w = std::exp(score[p] - mx);
          sum += w;
          const int64_t row = kv_row_offset(a, bt, h / group, p);
          for (int64_t i = 0; i < D; ++i) out[i] += w * element(a.v_cache, a.kv_bf16, row + i);
        }
        for (int64_t i = 0; i < D; ++i) a.out[(r * a.num_q_heads + h) * D + i] = float(out[i] / sum);
      }
    }
  }
}

// The reference keeps Hugging Face's [N, K] rows: a panel of one column.
int64_t linear_panel() { return 1; }
int64_t packed_linear_elems(bool, int64_t N, int64_t K) { return N * K; }

void pack_linear(void* dst, const void* w, bool w_bf16, int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  (void)N;
  const size_t elem = w_bf16 ? 2 : 4;
  std::memcpy(static_cast<char*>(dst) + size_t(n_begin * K) * elem,
              static_cast<const char*>(w) + size_t(n_begin * K) * elem, size_t((n_end - n_begin) * K) * elem);
}

void linear(float* y, const void* xv, const void* w, bool w_bf16, const float* bias, int64_t M,
            int64_t N, int64_t K, int64_t n_begin, int64_t n_end) {
  const float* x = static_cast<const float*>(xv);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = n_begin; n < n_end; ++n) {
      double acc = bias ? bias[n] : 0.0;
      for (int64_t k = 0; k < K; ++k) acc += double(x[m * K + k]) * element(w, w_bf16, n * K + k);
      y[m * N + n] = float(acc);
    }
}

// The reference int8 layout: row after row, its K int8 values, then its K / 32 scales and
// K / 32 mins.
int64_t q8_panel() { return 1; }
int64_t packed_q8_bytes(int64_t N, int64_t K) { return N * (K + K / 4); }

void pack_q8(void* dst, const int8_t* qs, const float* scales, const float* mins, int64_t, int64_t K,
             int64_t n_begin, int64_t n_end) {
  auto* out = static_cast<int8_t*>(dst);
  for (int64_t n = n_begin; n < n_end; ++n) {
    int8_t* row = out + n * (K + K / 4);
    std::memcpy(row, qs + n * K, size_t(K));
    std::memcpy(row + K, scales + n * (K / 32), size_t(K / 32) * 4);
    std::memcpy(row + K + K / 8, mins + n * (K / 32), size_t(K / 32) * 4);
  }
}

void q8_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
               int64_t n_begin, int64_t n_end) {
  const int64_t B = K / 32;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* wr = static_cast<const int8_t*>(w) + n * (K + K / 4);
    for (int64_t m = 0; m < M; ++m) {
      float acc = 0.f;
      for (int64_t b = 0; b < B; ++b) {
        int32_t s = 0, s2 = 0;
        const int64_t at = q8_offset(x.tiled, m, b * 32, K);
        for (int64_t j = 0; j < 32; ++j) {
          s += int32_t(x.qs[at + j]) * int32_t(wr[b * 32 + j]);
          s2 += int32_t(x.qs2[at + j]) * int32_t(wr[b * 32 + j]);
        }
        float scale, min;
        std::memcpy(&scale, wr + K + b * 4, 4);
        std::memcpy(&min, wr + K + K / 8 + b * 4, 4);
        const float t = std::fma(float(s2), kQ8Level2, float(s));
        acc = std::fma(t, x.d[m * B + b] * scale, acc);
        acc = std::fma(min, x.du[m * B + b], acc);
      }
      y[m * ldy + n] = bias ? acc + bias[n] : acc;
    }
  }
}

// Sub-byte weights: the reference keeps them a byte each, in the int8 layout (fp32 scales).
int64_t packed_qbits_bytes(int64_t N, int64_t K, int, bool) { return packed_q8_bytes(N, K); }
void pack_qbits(void* dst, const int8_t* qs, const float* scales, const float* mins, int64_t N, int64_t K,
                int64_t n_begin, int64_t n_end, int, bool) {
  pack_q8(dst, qs, scales, mins, N, K, n_begin, n_end);
}
void qbits_linear(float* y, const Q8Rows& x, const void* w, const float* bias, int64_t M, int64_t ldy, int64_t K,
                  int64_t n_begin, int64_t n_end, int, bool) {
  q8_linear(y, x, w, bias, M, ldy, K, n_begin, n_end);
}

void linear_input(uint16_t* dst, const float* x, int64_t M, int64_t K) {
  const int64_t Kp = bf16_input_stride(K);
  for (int64_t m = 0; m < bf16_input_rows(M); ++m)
    for (int64_t k = 0; k < Kp; ++k) dst[bf16_input_index(m, k, K)] = m < M && k < K ? bf16_round(x[m * K + k]) : uint16_t(0);
}

void silu_and_mul(float* out, const float* in, int64_t tokens, int64_t inter) {
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t i = 0; i < inter; ++i) {
      const double g = in[t * 2 * inter + i], u = in[t * 2 * inter + inter + i];
      out[t * inter + i] = float(g / (1.0 + std::exp(-g)) * u);
    }
}

bool gate_up_silu(uint16_t*, const void*, const void*, const void*, int64_t, int64_t, int64_t, int64_t, int64_t) {
  return false;  // the reference computes in fp32: gate_up and silu_and_mul run apart
}

void rotary(float* x, const int32_t* positions, const float* cos_sin, int64_t tokens,
            int64_t heads, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        float* v = x + (t * heads + h) * head_dim;
        const double c = cos_sin[positions[t] * head_dim + i], s = cos_sin[positions[t] * head_dim + half + i];
        const double a = v[i], b = v[i + half];
        v[i] = float(a * c - b * s);
        v[i + half] = float(b * c + a * s);
      }
}

void write_kv_cache(const float* key, const float* value, void* k_cache, void* v_cache,
                    bool cache_bf16, const int32_t* slot_mapping, int64_t tokens, int64_t kv_heads,
                    int64_t head_dim, int64_t block_size) {
  for (int64_t t = 0; t < tokens; ++t) {
    if (slot_mapping[t] < 0) continue;
    const int64_t block = slot_mapping[t] / block_size, off = slot_mapping[t] % block_size;
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t i = 0; i < head_dim; ++i) {
        const int64_t src = (t * kv_heads + h) * head_dim + i;
        const int64_t dst = ((block * kv_heads + h) * block_size + off) * head_dim + i;
        for (int kv = 0; kv < 2; ++kv) {
          const float x = (kv ? value : key)[src];
          void* cache = kv ? v_cache : k_cache;
          if (cache_bf16) static_cast<uint16_t*>(cache)[dst] = bf16_round(x);
          else static_cast<float*>(cache)[dst] = x;
        }
      }
  }
}

}  // namespace ref

}  // namespace flashpage::cpu
