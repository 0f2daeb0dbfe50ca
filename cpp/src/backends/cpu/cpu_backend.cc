#include "backends/cpu/cpu_backend.h"

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <vector>

#include "runtime/aligned.h"
#include "runtime/half.h"
#include "runtime/host_buffer.h"
#include "runtime/memory.h"
#include "runtime/thread_pool.h"

namespace flashpage::backends {
namespace {

runtime::ThreadPool& pool() { return runtime::ThreadPool::global(); }

// Row-wise work split over the pool only when it is large enough to pay for waking it.
template <class Fn>
void for_rows(int64_t rows, int64_t elems_per_row, Fn&& fn) {
  constexpr int64_t kMinParallelElems = 1 << 15;
  if (rows < 2 || rows * elems_per_row < kMinParallelElems) {
    fn(0, rows);
    return;
  }
  pool().parallel_for(rows, fn, 1);
}

DeviceBuffer host_buffer(runtime::HostBuffer b) {
  auto owner = std::make_shared<runtime::HostBuffer>(std::move(b));
  return {owner->data(), owner->size(), owner};
}

float* f32(void* p) { return static_cast<float*>(p); }
const float* f32(const void* p) { return static_cast<const float*>(p); }

class CpuBackend final : public Backend {
 public:
  CpuBackend(const cpu::KernelTable& kernels, bool bf16_weights) : kern_(kernels), bf16_(bf16_weights) {
    caps_.device = DeviceType::kCpu;
    caps_.batch_invariant = true;
    caps_.graphs = false;
    caps_.activation_bytes = 4;
    caps_.kv_bytes = bf16_ ? 2 : 4;
    caps_.compute_dtype = cpu::takes_bf16_input(kern_, bf16_) ? "bfloat16" : "float32";
  }

  std::string name() const override { return std::string("cpu:") + runtime::isa_name(kern_.isa); }
  const Capabilities& capabilities() const override { return caps_; }

  DeviceBuffer allocate(size_t bytes) override { return host_buffer(runtime::HostBuffer(bytes)); }

  DeviceBuffer allocate_kv_cache(int64_t regions, size_t region_bytes, size_t block_bytes) override {
    runtime::HostBuffer kv(size_t(regions) * region_bytes);
    prefault(kv, regions, region_bytes, block_bytes, std::chrono::milliseconds(1000), size_t(1) << 30);
    return host_buffer(std::move(kv));
  }

  int64_t kv_cache_budget(double fraction) const override { return runtime::memory_budget_from_fraction(fraction); }
  void copy_to_device(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
  void copy_to_host(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }

  Matrix load_linear(const Matrix& w, DeviceBuffer& storage) override {
    if (w.int8) {
      has_int8_ = true;  // reserve() sizes the quantized activations only for such models
      const int64_t panel = kern_.q8_panel(), N = w.rows, K = w.cols;
      const auto* qs = static_cast<const int8_t*>(w.data);
      const auto* scales = reinterpret_cast<const float*>(qs + N * K);
      const float* mins = scales + N * (K / 32);
      // fp16 scales where every scale and min is one exactly (Q4_0, Q4_1, Q5_0, Q5_1: the file's
      // own fp16s).
      const bool sub = w.bits < 8;
      const bool half = sub && std::all_of(scales, scales + 2 * N * (K / 32), [](float v) {
        return cpu::fp16_exact(v);
      });
      const size_t bytes = size_t(sub ? kern_.packed_qbits_bytes(N, K, w.bits, half) : kern_.packed_q8_bytes(N, K));
      storage = weight_buffer(bytes);
      pool().parallel_for(cpu::linear_panels(panel, N), [&](int64_t b, int64_t e) {
        if (sub) kern_.pack_qbits(storage.data, qs, scales, mins, N, K, b * panel, std::min(N, e * panel), w.bits, half);
        else kern_.pack_q8(storage.data, qs, scales, mins, N, K, b * panel, std::min(N, e * panel));
      });
      Matrix m{storage.data, false, N, K, true};
      m.int8 = true;
      m.bits = w.bits;
      m.half_scales = half;
      return m;
    }
    has_float_ = true;
    storage = weight_buffer(cpu::packed_linear_bytes(kern_, w.bf16, w.rows, w.cols));
    cpu::pack_linear_weight(kern_, storage.data, w.data, w.bf16, w.rows, w.cols);
    return {storage.data, w.bf16, w.rows, w.cols, true};
  }
  Matrix load_embedding(const Matrix& w, DeviceBuffer& storage) override {
    storage = {};  // rows are gathered from the table as loaded (memory-mapped)
    return w;
  }
  const void* load_vector(std::span<const float> v, DeviceBuffer& storage) override {
    storage = {};
    return v.data();
  }

  void reserve(int64_t tokens, int64_t cols) override {
    if (cpu::takes_bf16_input(kern_, bf16_) && int64_t(x16_.size()) < cpu::bf16_input_elems(tokens, cols))
      x16_.resize(size_t(cpu::bf16_input_elems(tokens, cols)));
    if (has_int8_) reserve_q8(tokens, cols);
  }

  void plan_attention(const AttentionStep& st, const AttentionShape& shape) override;
  void finish_step() override { pool().rest(); }  // the sampler runs next, maybe on torch's threads

  void embed(void* out, const Matrix& E, const int32_t* ids, int64_t tokens) override {
    // Rows at random in a table of tens of MB: each row's loads wait on memory, so rows are
    // fetched a few ahead and split over the pool (it was ~1 % of a SmolLM2 step, 93 % of it the
    // first load of each row).
    constexpr int64_t kAhead = 4;
    const int64_t H = E.cols, row_bytes = H * (E.bf16 ? 2 : 4);
    const char* table = static_cast<const char*>(E.data);
    for_rows(tokens, 16 * H, [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        for (int64_t a = t == b ? t : t + kAhead; a <= std::min(e - 1, t + kAhead); ++a)
          for (int64_t o = 0; o < row_bytes; o += 64)
            _mm_prefetch(table + int64_t(ids[a]) * row_bytes + o, _MM_HINT_T0);
        float* dst = f32(out) + t * H;
        const char* row = table + int64_t(ids[t]) * row_bytes;
        if (!E.bf16) {
          std::memcpy(dst, row, size_t(row_bytes));
          continue;
        }
        const auto* src = reinterpret_cast<const uint16_t*>(row);
        for (int64_t i = 0; i < H; ++i) dst[i] = runtime::bf16_to_f32(src[i]);
      }
    });
  }

  void rms_norm(void* out, const void* x, void* residual, const void* w, int64_t rows, int64_t dim,
                float eps) override {
    for_rows(rows, dim, [&](int64_t b, int64_t e) { norm_rows(out, x, residual, w, dim, eps, b, e); });
  }

  LinearInput rms_norm_input(void* out, const void* x, void* residual, const void* w, int64_t rows, int64_t dim,
                             float eps) override {
    // The norm and the rounding to bf16 in one pass, each thread rounding the rows it has just
    // normalised while they are in its cache.
    return {cpu::linear_input_for(kern_, round_inputs(), f32(out), rows, dim, x16_,
                                  [&](int64_t b, int64_t e) { norm_rows(out, x, residual, w, dim, eps, b, e); }),
            rows, dim, out};
  }

  LinearInput silu_and_mul_input(void* out, const void* gate_up, int64_t rows, int64_t inter) override {
    return {cpu::linear_input_for(kern_, round_inputs(), f32(out), rows, inter, x16_,
                                  [&](int64_t b, int64_t e) {
                                    kern_.silu_and_mul(f32(out) + b * inter, f32(gate_up) + b * 2 * inter, e - b, inter);
                                  }),
            rows, inter, out};
  }

  LinearInput gate_up_silu_input(void* act, void* gate_up, const LinearInput& x, const Matrix& gate, const Matrix& up,
                                 const Matrix& down, int64_t rows, int64_t inter) override {
    // Fused where the kernels compute bf16 weights in bf16 and down takes bf16 rows: each thread
    // takes its panels of gate and up through SiLU.mul and the rounding while they are in its
    // cache, so gate_up's fp32 rows (12 MB a layer for 1,024 rows of SmolLM2) and act's are
    // never written and read back.
    const bool bf16 = gate.bf16 && up.bf16 && down.bf16 && !gate.int8 && !up.int8 && !down.int8;
    if (!bf16 || !round_inputs() || x.data == x.source ||
        !kern_.gate_up_silu(nullptr, nullptr, nullptr, nullptr, rows, x.cols, inter, 0, 0))
      return Backend::gate_up_silu_input(act, gate_up, x, gate, up, down, rows, inter);
    if (int64_t(x16_act_.size()) < cpu::bf16_input_elems(rows, inter))
      x16_act_.resize(size_t(cpu::bf16_input_elems(rows, inter)));
    pool().parallel_for(cpu::linear_panels(kern_.linear_panel(), inter), [&](int64_t b, int64_t e) {
      kern_.gate_up_silu(x16_act_.data(), x.data, gate.data, up.data, rows, x.cols, inter, b, e);
    }, cpu::linear_grain(rows));
    return {x16_act_.data(), rows, inter, nullptr};
  }

  LinearInput linear_input(const void* x, int64_t rows, int64_t cols) override {
    return {cpu::linear_input_for(kern_, round_inputs(), f32(x), rows, cols, x16_), rows, cols, x};
  }

  void linears(const LinearInput& x, std::span<const LinearJob> jobs) override {
    // int8 weights take the activations quantized per row and block, once for every job.
    bool int8 = false;
    for (const LinearJob& j : jobs) int8 = int8 || j.w->int8;
    cpu::Q8Rows q8{};
    if (int8) q8 = quantize(f32(x.source), x.rows, x.cols);
    // Threads split the jobs' panels (the kernels' unit of columns), counted across all jobs.
    auto panel_of = [&](const LinearJob& j) { return j.w->int8 ? kern_.q8_panel() : kern_.linear_panel(); };
    auto panels = [&](const LinearJob& j) { return cpu::linear_panels(panel_of(j), j.w->rows); };
    int64_t total = 0;
    for (const LinearJob& j : jobs) total += panels(j);
    auto part = [&](int64_t b, int64_t e) {
      int64_t off = 0;
      for (const LinearJob& j : jobs) {
        const int64_t lo = std::max(b, off), hi = std::min(e, off + panels(j)), panel = panel_of(j);
        if (lo < hi) {
          const int64_t n0 = (lo - off) * panel, n1 = std::min(j.w->rows, (hi - off) * panel);
          if (j.w->int8 && j.w->bits < 8)
            kern_.qbits_linear(f32(j.y), q8, j.w->data, f32(j.bias), x.rows, j.ldy, x.cols, n0, n1, j.w->bits,
                               j.w->half_scales);
          else if (j.w->int8)
            kern_.q8_linear(f32(j.y), q8, j.w->data, f32(j.bias), x.rows, j.ldy, x.cols, n0, n1);
          else kern_.linear(f32(j.y), x.data, j.w->data, j.w->bf16, f32(j.bias), x.rows, j.ldy, x.cols, n0, n1);
        }
        off += panels(j);
      }
    };
    // int8 kernels run panels in pairs (two weight streams read faster than one): chunks of
    // an even count keep a lone panel to the end of a job.
    pool().parallel_for(total, part, int8 ? 2 : cpu::linear_grain(x.rows));
  }

  void logits(float* out, const LinearInput& x, const Matrix& w) override {
    const LinearJob job{out, w.rows, &w, nullptr};
    linears(x, {&job, 1});
  }

  void rotary(void* q, void* k, const int32_t* positions, const float* cos_sin, int64_t tokens, int64_t nq,
              int64_t nkv, int64_t D) override {
    for_rows(tokens, (nq + nkv) * D, [&](int64_t b, int64_t e) {
      kern_.rotary(f32(q) + b * nq * D, positions + b, cos_sin, e - b, nq, D);
      kern_.rotary(f32(k) + b * nkv * D, positions + b, cos_sin, e - b, nkv, D);
    });
  }

  void write_kv(const void* k, const void* v, void* k_cache, void* v_cache, const int32_t* slots, int64_t tokens,
                int64_t nkv, int64_t D, int64_t block_size) override {
    // Weighted as 4 values an element: the bf16 cache's K is scattered a 32-bit pair at a time,
    // and a decode step of 64 sequences (25 K values) ran it on one thread.
    for_rows(tokens, 4 * 2 * nkv * D, [&](int64_t b, int64_t e) {
      kern_.write_kv_cache(f32(k) + b * nkv * D, f32(v) + b * nkv * D, k_cache, v_cache, bf16_, slots + b, e - b, nkv,
                           D, block_size);
    });
  }

  void copy_blocks(std::span<void* const> caches, size_t block_bytes, std::span<const BlockCopy> copies) override {
    for (const BlockCopy& c : copies)
      for (void* cache : caches) {
        char* base = static_cast<char*>(cache);
        std::memcpy(base + size_t(c.dst) * block_bytes, base + size_t(c.src) * block_bytes, block_bytes);
      }
  }

  void paged_attention(void* out, const void* q, const void* k_cache, const void* v_cache) override;

  void gather_rows(void* out, const void* x, const int32_t* indices, int64_t n, int64_t dim) override {
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(f32(out) + i * dim, f32(x) + int64_t(indices[i]) * dim, size_t(dim) * 4);
  }

 private:
  void norm_rows(void* out, const void* x, void* residual, const void* w, int64_t dim, float eps, int64_t b,
                 int64_t e) {
    kern_.rms_norm(f32(out) + b * dim, f32(x) + b * dim, residual ? f32(residual) + b * dim : nullptr, f32(w), e - b,
                   dim, eps);
  }
  void prefault(runtime::HostBuffer& kv, int64_t regions, size_t region_bytes, size_t block_bytes,
                std::chrono::milliseconds budget, size_t max_bytes);
  void reserve_q8(int64_t rows, int64_t cols) {
    const int64_t values = (rows + 15) / 16 * 16 * cols;  // whole 16-row tiles
    if (int64_t(x8_.size()) >= values) return;
    x8_.resize(size_t(values));
    x8b_.resize(size_t(values));
    x8_scale_.resize(size_t(values / 32 + 1));
    x8_sum_.resize(size_t(values / 32 + 1));
    x8b_sum_.resize(size_t(values / 32 + 1));
    x8_du_.resize(size_t(values / 32 + 1));
  }
  // Whether Linear inputs are rounded to bf16 for the bf16 kernels: not where every Linear
  // runs int8 weights, which quantize the fp32 input themselves.
  bool round_inputs() const { return bf16_ && (has_float_ || !has_int8_); }

  // Packed weights, one after another in large mappings (runtime::HostArena): on 2 MiB pages.
  DeviceBuffer weight_buffer(size_t bytes) {
    std::shared_ptr<void> piece = weights_.take(bytes);
    return {piece.get(), bytes, std::move(piece)};
  }

  // x [rows, cols] quantized for the int8 Linears in 16-row tiles (cpu::q8_offset), tiles split
  // across threads when large: a tile's first row starts at the same offset in either layout.
  cpu::Q8Rows quantize(const float* x, int64_t rows, int64_t cols) {
    reserve_q8(rows, cols);  // grows only for a step larger than reserved
    const int64_t B = cols / 32;
    for_rows((rows + 15) / 16, 16 * cols, [&](int64_t t0, int64_t t1) {
      const int64_t b = t0 * 16, e = std::min(rows, t1 * 16);
      cpu::quantize_q8_rows(x + b * cols, e - b, cols, x8_.data() + b * cols, x8_scale_.data() + b * B,
                            x8_sum_.data() + b * B, x8b_.data() + b * cols, x8b_sum_.data() + b * B,
                            x8_du_.data() + b * B, true);
    });
    return {x8_.data(), x8b_.data(), x8_scale_.data(), x8_sum_.data(), x8b_sum_.data(), x8_du_.data(), true};
  }

  const cpu::KernelTable& kern_;
  const bool bf16_;
  Capabilities caps_;
  runtime::AlignedVector<uint16_t> x16_;  // a Linear's input rounded to bf16 (bf16 compute)
  runtime::AlignedVector<uint16_t> x16_act_;  // down's input from the fused gate_up + SiLU.mul
  bool has_int8_ = false;                 // some Linear runs int8 weights
  bool has_float_ = false;                // some Linear runs bf16 / fp32 weights
  runtime::HostArena weights_;            // the packed Linear weights (weight_buffer)
  // A Linear's input quantized for int8 weights: values, block scales, block sums.
  runtime::AlignedVector<int8_t> x8_, x8b_;
  runtime::AlignedVector<float> x8_scale_, x8_du_;
  runtime::AlignedVector<int32_t> x8_sum_, x8b_sum_;
  // The step's attention plan: the kernel's arguments and its work items split per thread.
  struct AttentionItem {
    int64_t seq, kv_head, kv_head_end, row_begin, row_end;
    double cost;
  };
  cpu::PagedAttentionArgs attn_{};
  std::vector<AttentionItem> items_;
  std::vector<int64_t> bounds_;
};

void CpuBackend::prefault(runtime::HostBuffer& kv, int64_t regions, size_t region_bytes, size_t block_bytes,
                          std::chrono::milliseconds budget, size_t max_bytes) {
  // A fresh block touches a page in each layer's K and V; faulting them in mid-step cost ~14 %
  // of a prefill on fresh blocks (2 MB pages zeroed in 60 regions at once). vLLM zero-fills its
  // whole cache at start-up; zeroing runs at ~0.7 GB/s on a fresh VM (9 s for 6 GiB), so the
  // blocks come in allocation order (lowest first), by every thread, up to `max_bytes` of cache
  // or `budget` of time; the rest fault in on first use.
  if (block_bytes == 0 || regions == 0) return;
  const auto deadline = std::chrono::steady_clock::now() + budget;
  const int64_t num_blocks = int64_t(region_bytes / block_bytes);
  constexpr int64_t kStep = 256;  // blocks per round
  const int64_t blocks = std::min<int64_t>(num_blocks, int64_t(max_bytes / (block_bytes * size_t(regions))) + 1);
  for (int64_t b0 = 0; b0 < blocks && std::chrono::steady_clock::now() < deadline; b0 += kStep) {
    const size_t lo = size_t(b0) * block_bytes, hi = size_t(std::min(blocks, b0 + kStep)) * block_bytes;
    std::atomic<bool> ok{true};
    pool().parallel_for(regions, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        if (!kv.prefault(size_t(r) * region_bytes + lo, size_t(r) * region_bytes + hi)) ok = false;
    });
    if (!ok) break;  // no MADV_POPULATE_WRITE here: leave it to first use
  }
  pool().rest();
}

void CpuBackend::plan_attention(const AttentionStep& st, const AttentionShape& sh) {
  attn_ = cpu::PagedAttentionArgs{nullptr, nullptr, nullptr, nullptr, bf16_, st.block_tables,
                                  st.block_table_stride, st.query_start_loc, st.context_lens, sh.num_q_heads,
                                  sh.num_kv_heads, sh.head_dim, sh.block_size, sh.scale};
  // Work items: (sequence, KV head, a piece of its q_len x group query rows), so that one long
  // prompt keeps every thread busy whatever the number of KV heads. Each row is computed with
  // an order fixed by that row alone, so the split does not change results. Threads take
  // contiguous runs of items of about equal cost (rows x the keys they attend to). The same
  // plan serves every layer of the step.
  // A multiple of the AMX kernel's 16-row tiles and of the avx512_bf16 kernel's 6-row passes.
  constexpr int64_t kPieceRows = 96;
  constexpr int64_t kOneTileRows = 16;
  // Whole sequences as items only where there are enough of them to share out evenly.
  const bool group_heads = st.num_seqs >= 2 * pool().num_threads();
  const int64_t nkv = sh.num_kv_heads, group = sh.num_q_heads / nkv;
  items_.clear();
  double total = 0;
  for (int64_t s = 0; s < st.num_seqs; ++s) {
    const int64_t q_len = st.host_query_start_loc[s + 1] - st.host_query_start_loc[s], rows = q_len * group;
    const int64_t first_pos = st.host_context_lens[s] - q_len;
    auto add = [&](int64_t h0, int64_t h1, int64_t r0, int64_t r1) {  // rows x the keys they see
      const double cost =
          double((r1 - r0) * (h1 - h0)) * (double(first_pos) + double(r0 + r1) / (2.0 * double(group)) + 1.0);
      items_.push_back({s, h0, h1, r0, r1, cost});
      total += cost;
    };
    // A decode (or a short chunk): every KV head in one item, which the AMX kernel runs up to
    // four heads at a time.
    if (rows <= kOneTileRows && group_heads) {
      add(0, nkv, 0, rows);
      continue;
    }
    for (int64_t h = 0; h < nkv; ++h)
      for (int64_t r0 = 0; r0 < rows; r0 += kPieceRows) add(h, h + 1, r0, std::min(rows, r0 + kPieceRows));
  }
  const int threads = pool().num_threads();
  const int64_t n = int64_t(items_.size());
  bounds_.assign(size_t(threads + 1), n);
  bounds_[0] = 0;
  double cum = 0;
  for (int64_t i = 0, t = 1; i < n && t < threads; ++i) {
    cum += items_[size_t(i)].cost;
    while (t < threads && cum >= total * double(t) / threads) bounds_[t++] = i + 1;
  }
}

void CpuBackend::paged_attention(void* out, const void* q, const void* k_cache, const void* v_cache) {
  cpu::PagedAttentionArgs a = attn_;
  a.out = f32(out);
  a.q = f32(q);
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  auto run_items = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const AttentionItem& it = items_[size_t(i)];
      cpu::PagedAttentionArgs ai = a;
      ai.kv_head_begin = it.kv_head;
      ai.kv_head_end = it.kv_head_end;
      ai.row_begin = it.row_begin;
      ai.row_end = it.row_end;
      kern_.paged_attention(ai, it.seq, it.seq + 1);
    }
  };
  const int64_t n = int64_t(items_.size());
  if (pool().num_threads() == 1 || n == 1) {
    run_items(0, n);
    return;
  }
  pool().parallel_for(pool().num_threads(), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run_items(bounds_[t], bounds_[t + 1]);
  });
}

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(const cpu::KernelTable& kernels, bool bf16_weights) {
  return std::make_unique<CpuBackend>(kernels, bf16_weights);
}

}  // namespace flashpage::backends
