#include "model/llama.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "runtime/thread_pool.h"

namespace flashpage::model {
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

const float* or_null(const std::vector<float>& v) { return v.empty() ? nullptr : v.data(); }

template <class Vec>
void grow(Vec& v, int64_t n) {
  if (int64_t(v.size()) < n) v.resize(size_t(n));
}

}  // namespace

LlamaModel::LlamaModel(const ModelConfig& config, LlamaWeights weights, const ExecutorOptions& options,
                       const cpu::KernelTable& kernels)
    : config_(config), weights_(std::move(weights)), options_(options), kern_(kernels) {
  pack_linears(weights_, kern_);
  if (options_.num_blocks <= 0 || options_.block_size <= 0 || options_.max_model_len <= 0)
    throw std::invalid_argument("LlamaModel: num_blocks, block_size and max_model_len must be positive");
  const int64_t D = config_.head_dim;
  layer_kv_elems_ = options_.num_blocks * config_.num_key_value_heads * options_.block_size * D;
  const size_t elem = kv_bf16() ? 2 : 4;
  kv_ = runtime::HostBuffer(size_t(2 * config_.num_hidden_layers * layer_kv_elems_) * elem);
  prefault_kv(std::chrono::milliseconds(1000), size_t(1) << 30);

  // Rotary tables as Hugging Face computes them: fp32 inverse frequencies times the fp32
  // position, then cos/sin of that fp32 angle.
  const std::vector<double> inv = config_.rope_inv_freq();
  const int64_t half = D / 2;
  cos_sin_.resize(size_t(options_.max_model_len * D));
  for (int64_t p = 0; p < options_.max_model_len; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) * float(inv[i]);
      cos_sin_[p * D + i] = float(std::cos(double(angle)));
      cos_sin_[p * D + half + i] = float(std::sin(double(angle)));
    }
}

void LlamaModel::prefault_kv(std::chrono::milliseconds budget, size_t max_bytes) {
  // A fresh block touches a page in each layer's K and V; faulting them in mid-step cost ~14 %
  // of a prefill on fresh blocks (2 MB pages zeroed in 60 regions at once). vLLM zero-fills its
  // whole cache at start-up; zeroing runs at ~0.7 GB/s on a fresh VM (9 s for 6 GiB), so the
  // blocks come in allocation order (lowest first), by every thread, up to `max_bytes` of cache
  // or `budget` of time; the rest fault in on first use.
  const auto deadline = std::chrono::steady_clock::now() + budget;
  const size_t elem = kv_bf16() ? 2 : 4;
  const size_t block_bytes = size_t(layer_kv_elems_ / options_.num_blocks) * elem;
  const int64_t regions = 2 * config_.num_hidden_layers;
  constexpr int64_t kStep = 256;  // blocks per round
  const int64_t blocks = std::min<int64_t>(options_.num_blocks, int64_t(max_bytes / (block_bytes * size_t(regions))) + 1);
  for (int64_t b0 = 0; b0 < blocks && std::chrono::steady_clock::now() < deadline; b0 += kStep) {
    const size_t lo = size_t(b0) * block_bytes, hi = size_t(std::min(blocks, b0 + kStep)) * block_bytes;
    std::atomic<bool> ok{true};
    pool().parallel_for(regions, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const size_t base = size_t(r * layer_kv_elems_) * elem;
        if (!kv_.prefault(base + lo, base + hi)) ok = false;
      }
    });
    if (!ok) break;  // no MADV_POPULATE_WRITE here: leave it to first use
  }
  pool().rest();
}

void* LlamaModel::k_cache(int64_t layer) const {
  const size_t elem = kv_bf16() ? 2 : 4;
  return static_cast<char*>(kv_.data()) + size_t(2 * layer * layer_kv_elems_) * elem;
}

void* LlamaModel::v_cache(int64_t layer) const {
  const size_t elem = kv_bf16() ? 2 : 4;
  return static_cast<char*>(kv_.data()) + size_t((2 * layer + 1) * layer_kv_elems_) * elem;
}

void LlamaModel::ensure_scratch(int64_t T, int64_t S) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, D = c.head_dim;
  grow(residual_, T * H);
  grow(delta_, T * H);
  grow(normed_, T * H);
  grow(q_, T * c.num_attention_heads * D);
  grow(k_, T * c.num_key_value_heads * D);
  grow(v_, T * c.num_key_value_heads * D);
  grow(attn_, T * c.num_attention_heads * D);
  grow(gate_up_, T * 2 * c.intermediate_size);
  grow(act_, T * c.intermediate_size);
  grow(last_residual_, S * H);
  grow(last_delta_, S * H);
  grow(last_normed_, S * H);
}

const void* LlamaModel::as_input(const float* x, int64_t rows, int64_t K) {
  return cpu::linear_input_for(kern_, weights_.storage == StorageType::kBF16, x, rows, K, x16_);
}

void LlamaModel::run_linears(const void* input, int64_t rows, std::initializer_list<LinearJob> jobs) {
  // Threads split the jobs' panels (the kernels' unit of columns), counted across all jobs.
  const int64_t panel = kern_.linear_panel();
  auto panels = [&](const LinearJob& j) { return cpu::linear_panels(panel, j.w->rows); };
  int64_t total = 0;
  for (const LinearJob& j : jobs) total += panels(j);
  const int64_t K = jobs.begin()->w->cols;
  auto part = [&](int64_t b, int64_t e) {
    int64_t off = 0;
    for (const LinearJob& j : jobs) {
      const int64_t lo = std::max(b, off), hi = std::min(e, off + panels(j));
      if (lo < hi)
        kern_.linear(j.y, input, j.w->data, j.w->bf16, j.bias, rows, j.ldy, K, (lo - off) * panel,
                     std::min(j.w->rows, (hi - off) * panel));
      off += panels(j);
    }
  };
  pool().parallel_for(total, part, 1);
}

void LlamaModel::embed(const SchedulerOutput& st) {
  const int64_t H = config_.hidden_size, V = config_.vocab_size;
  const Matrix& E = weights_.embed;
  for (int64_t t = 0; t < st.num_tokens(); ++t) {
    const int64_t tok = st.token_ids[t];
    if (tok < 0 || tok >= V)
      throw std::invalid_argument("token id " + std::to_string(tok) + " is outside the vocabulary [0, " +
                                  std::to_string(V) + ")");
    float* dst = residual_.data() + t * H;
    if (!E.bf16) {
      std::memcpy(dst, static_cast<const float*>(E.data) + tok * H, size_t(H) * 4);
      continue;
    }
    const uint16_t* src = static_cast<const uint16_t*>(E.data) + tok * H;
    for (int64_t i = 0; i < H; ++i) {
      const uint32_t bits = uint32_t(src[i]) << 16;
      std::memcpy(dst + i, &bits, 4);
    }
  }
}

void LlamaModel::copy_blocks(const SchedulerOutput& st) {
  const size_t block_bytes =
      size_t(config_.num_key_value_heads * options_.block_size * config_.head_dim) * (kv_bf16() ? 2 : 4);
  for (const BlockCopy& c : st.block_copies)
    for (int64_t l = 0; l < config_.num_hidden_layers; ++l)
      for (void* cache : {k_cache(l), v_cache(l)}) {
        char* base = static_cast<char*>(cache);
        std::memcpy(base + size_t(c.dst) * block_bytes, base + size_t(c.src) * block_bytes, block_bytes);
      }
}

void LlamaModel::attention(const SchedulerOutput& st, int64_t layer) {
  const int64_t nkv = config_.num_key_value_heads, group = config_.num_attention_heads / nkv, S = st.num_seqs();
  cpu::PagedAttentionArgs a{attn_.data(), q_.data(), k_cache(layer), v_cache(layer), kv_bf16(),
                            st.block_tables.data(), st.block_table_width, st.query_start_loc.data(),
                            st.context_lens.data(), config_.num_attention_heads, nkv, config_.head_dim,
                            options_.block_size, float(1.0 / std::sqrt(double(config_.head_dim)))};
  // Work items: (sequence, KV head, a piece of its q_len x group query rows), so that one long
  // prompt keeps every thread busy whatever the number of KV heads. Each row is computed with
  // an order fixed by that row alone, so the split does not change results. Threads take
  // contiguous runs of items of about equal cost (rows x the keys they attend to).
  constexpr int64_t kPieceRows = 64;  // a multiple of the AMX kernel's 16-row tiles
  items_.clear();
  double total = 0;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t q_len = st.query_start_loc[s + 1] - st.query_start_loc[s], rows = q_len * group;
    const int64_t first_pos = st.context_lens[s] - q_len;
    for (int64_t h = 0; h < nkv; ++h)
      for (int64_t r0 = 0; r0 < rows; r0 += kPieceRows) {
        const int64_t r1 = std::min(rows, r0 + kPieceRows);
        const double cost = double(r1 - r0) * (double(first_pos) + double(r0 + r1) / (2.0 * double(group)) + 1.0);
        items_.push_back({s, h, r0, r1, cost});
        total += cost;
      }
  }
  auto run_items = [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) {
      const AttentionItem& it = items_[size_t(i)];
      cpu::PagedAttentionArgs ai = a;
      ai.kv_head_begin = it.kv_head;
      ai.kv_head_end = it.kv_head + 1;
      ai.row_begin = it.row_begin;
      ai.row_end = it.row_end;
      kern_.paged_attention(ai, it.seq, it.seq + 1);
    }
  };
  const int threads = pool().num_threads();
  const int64_t n = int64_t(items_.size());
  if (threads == 1 || n == 1) {
    run_items(0, n);
    return;
  }
  bounds_.assign(size_t(threads + 1), n);
  bounds_[0] = 0;
  double cum = 0;
  for (int64_t i = 0, t = 1; i < n && t < threads; ++i) {
    cum += items_[size_t(i)].cost;
    while (t < threads && cum >= total * double(t) / threads) bounds_[t++] = i + 1;
  }
  pool().parallel_for(threads, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) run_items(bounds_[t], bounds_[t + 1]);
  });
}

double LlamaModel::measure_prefill_rate() {
  // A real step: one prompt of up to 128 tokens in the cache's first blocks (free at start-up;
  // whoever gets them later writes every slot before reading it).
  const int64_t bs = options_.block_size;
  const int64_t n = std::min<int64_t>({128, options_.num_blocks * bs, options_.max_model_len});
  SchedulerOutput st;
  st.request_ids = {0};
  st.query_start_loc = {0, int32_t(n)};
  st.num_computed = {0};
  st.context_lens = {int32_t(n)};
  st.do_sample = {1};
  st.logits_indices = {int32_t(n - 1)};
  st.block_table_width = int32_t((n + bs - 1) / bs);
  for (int32_t b = 0; b < st.block_table_width; ++b) st.block_tables.push_back(b);
  for (int64_t i = 0; i < n; ++i) {
    st.token_ids.push_back(int32_t((i * 7919 + 11) % config_.vocab_size));
    st.positions.push_back(int32_t(i));
    st.slot_mapping.push_back(int32_t(i));
  }
  st.num_prefill_tokens = int32_t(n);
  double best = 1e30;
  for (int rep = 0; rep < 3; ++rep) {  // the first pass warms up (scratch buffers, caches)
    const auto t0 = std::chrono::steady_clock::now();
    forward(st);
    if (rep > 0) best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return double(n) / best;
}

const float* LlamaModel::forward(const SchedulerOutput& st) {
  if (st.num_tokens() == 0) return nullptr;
  grow(logits_, int64_t(st.num_seqs()) * config_.vocab_size);
  forward(st, {}, logits_.data());
  return logits_.data();
}

void LlamaModel::forward(const SchedulerOutput& st, std::span<const int32_t> indices, float* out) {
  const ModelConfig& c = config_;
  const int64_t T = st.num_tokens();
  if (T == 0) return;
  if (indices.empty()) indices = st.logits_indices;
  const int64_t S = int64_t(indices.size());
  for (int32_t i : indices)
    if (i < 0 || i >= T)
      throw std::invalid_argument("logits index " + std::to_string(i) + " is outside the step's " +
                                  std::to_string(T) + " tokens");
  const int64_t H = c.hidden_size, D = c.head_dim, nqh = c.num_attention_heads, nkvh = c.num_key_value_heads;
  const int64_t I = c.intermediate_size, V = c.vocab_size;
  const float eps = float(c.rms_norm_eps);
  for (int64_t t = 0; t < T; ++t)
    if (st.positions[t] < 0 || st.positions[t] >= options_.max_model_len)
      throw std::invalid_argument("position " + std::to_string(st.positions[t]) + " is beyond max_model_len=" +
                                  std::to_string(options_.max_model_len));
  ensure_scratch(T, S);
  copy_blocks(st);
  embed(st);
  float *res = residual_.data(), *delta = delta_.data(), *normed = normed_.data();
  float *q = q_.data(), *k = k_.data(), *v = v_.data();
  auto norm = [&](float* out, const float* x, float* residual, const std::vector<float>& w, int64_t rows,
                  int64_t dim) {
    for_rows(rows, dim, [&](int64_t b, int64_t e) {
      kern_.rms_norm(out + b * dim, x + b * dim, residual ? residual + b * dim : nullptr, w.data(), e - b, dim, eps);
    });
  };
  const bool bf16 = weights_.storage == StorageType::kBF16;
  // RMSNorm (+ the residual add) straight into the next Linears' input.
  auto norm_input = [&](const float* x, float* residual, const std::vector<float>& w) {
    return cpu::linear_input_for(kern_, bf16, normed, T, H, x16_, [&](int64_t b, int64_t e) {
      kern_.rms_norm(normed + b * H, x + b * H, residual ? residual + b * H : nullptr, w.data(), e - b, H, eps);
    });
  };
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& L = weights_.layers[l];
    const void* in = l == 0 ? norm_input(res, nullptr, L.input_norm) : norm_input(delta, res, L.input_norm);
    run_linears(in, T, {{q, nqh * D, &L.q, or_null(L.q_bias)}, {k, nkvh * D, &L.k, or_null(L.k_bias)},
                        {v, nkvh * D, &L.v, or_null(L.v_bias)}});
    if (c.qk_norm) {
      norm(q, q, nullptr, L.q_norm, T * nqh, D);
      norm(k, k, nullptr, L.k_norm, T * nkvh, D);
    }
    for_rows(T, (nqh + nkvh) * D, [&](int64_t b, int64_t e) {
      kern_.rotary(q + b * nqh * D, st.positions.data() + b, cos_sin_.data(), e - b, nqh, D);
      kern_.rotary(k + b * nkvh * D, st.positions.data() + b, cos_sin_.data(), e - b, nkvh, D);
      kern_.write_kv_cache(k + b * nkvh * D, v + b * nkvh * D, k_cache(l), v_cache(l), kv_bf16(),
                        st.slot_mapping.data() + b, e - b, nkvh, D, options_.block_size);
    });
    attention(st, l);
    run_linears(as_input(attn_.data(), T, nqh * D), T, {{delta, H, &L.o, nullptr}});
    run_linears(norm_input(delta, res, L.post_attention_norm), T,
                {{gate_up_.data(), 2 * I, &L.gate, nullptr}, {gate_up_.data() + I, 2 * I, &L.up, nullptr}});
    const void* act = cpu::linear_input_for(kern_, bf16, act_.data(), T, I, x16_, [&](int64_t b, int64_t e) {
      kern_.silu_and_mul(act_.data() + b * I, gate_up_.data() + b * 2 * I, e - b, I);
    });
    run_linears(act, T, {{delta, H, &L.down, nullptr}});
  }
  // The final norm and the LM head only for the tokens asked for (each sequence's last).
  for (int64_t s = 0; s < S; ++s) {
    const int64_t idx = indices[s];
    std::memcpy(last_residual_.data() + s * H, res + idx * H, size_t(H) * 4);
    std::memcpy(last_delta_.data() + s * H, delta + idx * H, size_t(H) * 4);
  }
  norm(last_normed_.data(), last_delta_.data(), last_residual_.data(), weights_.final_norm, S, H);
  run_linears(as_input(last_normed_.data(), S, H), S, {{out, V, &weights_.lm_head, nullptr}});
  pool().rest();  // the sampler runs next, maybe on torch's threads: do not poll beside it
}

}  // namespace flashpage::model
