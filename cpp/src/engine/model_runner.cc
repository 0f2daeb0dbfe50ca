#include "engine/model_runner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>

namespace flashpage::engine {
namespace {

// Where each of a step's int32 inputs lies in the inputs buffer, for capacities of T tokens,
// S sequences, R rows of logits and B block-table entries.
struct InputLayout {
  int64_t token_ids, positions, slot_mapping, logits_indices, query_start_loc, context_lens, block_tables, end;
  InputLayout(int64_t T, int64_t S, int64_t R, int64_t B)
      : token_ids(0), positions(T), slot_mapping(2 * T), logits_indices(3 * T), query_start_loc(3 * T + R),
        context_lens(query_start_loc + S + 1), block_tables(context_lens + S), end(block_tables + B) {}
};

}  // namespace

ModelRunner::ModelRunner(const model::ModelConfig& config, model::LlamaWeights weights,
                         std::unique_ptr<backends::Backend> backend, const RunnerOptions& options)
    : config_(config), options_(options), backend_(std::move(backend)) {
  if (options_.block_size <= 0 || options_.max_model_len <= 0)
    throw std::invalid_argument("ModelRunner: block_size and max_model_len must be positive");
  backend_->check_attention({config_.num_attention_heads, config_.num_key_value_heads, config_.head_dim,
                             options_.block_size, 1.f});
  model_ = std::make_unique<model::LlamaModel>(config_, std::move(weights), *backend_);
  // Rotary tables as Hugging Face computes them: fp32 inverse frequencies times the fp32
  // position, then cos/sin of that fp32 angle.
  const int64_t D = config_.head_dim, half = D / 2;
  const std::vector<double> inv = config_.rope_inv_freq();
  std::vector<float> cos_sin(size_t(options_.max_model_len * D));
  for (int64_t p = 0; p < options_.max_model_len; ++p)
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(p) * float(inv[size_t(i)]);
      cos_sin[size_t(p * D + i)] = float(std::cos(double(angle)));
      cos_sin[size_t(p * D + half + i)] = float(std::sin(double(angle)));
    }
  rotary_ = backend_->allocate(cos_sin.size() * 4);
  backend_->copy_to_device(rotary_.data, cos_sin.data(), cos_sin.size() * 4);
}

int64_t ModelRunner::kv_bytes_per_token() const {
  return 2 * config_.num_hidden_layers * config_.num_key_value_heads * config_.head_dim *
         backend_->capabilities().kv_bytes;
}

void ModelRunner::allocate_kv_cache(int64_t num_blocks) {
  if (num_blocks <= 0) throw std::invalid_argument("ModelRunner: the KV pool needs at least one block");
  const int64_t regions = 2 * config_.num_hidden_layers;
  block_bytes_ = size_t(config_.num_key_value_heads * options_.block_size * config_.head_dim *
                        backend_->capabilities().kv_bytes);
  const size_t region_bytes = block_bytes_ * size_t(num_blocks);
  kv_ = backend_->allocate_kv_cache(regions, region_bytes, block_bytes_);
  caches_.clear();
  for (int64_t r = 0; r < regions; ++r) caches_.push_back(static_cast<char*>(kv_.data) + size_t(r) * region_bytes);
  num_blocks_ = num_blocks;
}

int64_t ModelRunner::max_table_width() const {
  return (options_.max_model_len + options_.block_size - 1) / options_.block_size;
}

void ModelRunner::reserve(int64_t tokens, int64_t seqs) { ensure(tokens, seqs, seqs, seqs * max_table_width()); }

void ModelRunner::ensure(int64_t tokens, int64_t seqs, int64_t rows, int64_t table) {
  if (tokens <= max_tokens_ && seqs <= max_seqs_ && rows <= max_rows_ && table <= max_table_) return;
  graphs_.clear();  // they point into the buffers about to move
  max_tokens_ = std::max<int64_t>({max_tokens_, tokens, 1});
  max_seqs_ = std::max<int64_t>({max_seqs_, seqs, 1});
  max_table_ = std::max<int64_t>({max_table_, table, 1});
  if (rows > max_rows_) {
    max_rows_ = rows;
    logits_ = backend_->allocate(size_t(max_rows_ * config_.vocab_size) * 4);
  }
  workspace_ = backend_->allocate(model_->workspace_bytes(max_tokens_, max_rows_));
  const int64_t widest = std::max({config_.hidden_size, config_.num_attention_heads * config_.head_dim,
                                   config_.intermediate_size});
  backend_->reserve(std::max(max_tokens_, max_rows_), widest);
  const InputLayout layout(max_tokens_, max_seqs_, max_rows_, max_table_);
  staging_.assign(size_t(layout.end), 0);
  inputs_ = backend_->allocate(size_t(layout.end) * 4);
}

void ModelRunner::upload_inputs(const SchedulerOutput& st, std::span<const int32_t> indices) {
  const int64_t table = int64_t(st.block_tables.size());
  // Within the reserved sizes for every step the scheduler makes; prompt logprobs (more rows
  // than sequences) or a caller's own larger step grow them, once.
  ensure(st.num_tokens(), st.num_seqs(), int64_t(indices.size()), table);
  const InputLayout at(max_tokens_, max_seqs_, max_rows_, max_table_);
  int32_t* s = staging_.data();
  std::copy(st.token_ids.begin(), st.token_ids.end(), s + at.token_ids);
  std::copy(st.positions.begin(), st.positions.end(), s + at.positions);
  std::copy(st.slot_mapping.begin(), st.slot_mapping.end(), s + at.slot_mapping);
  std::copy(indices.begin(), indices.end(), s + at.logits_indices);
  std::copy(st.query_start_loc.begin(), st.query_start_loc.end(), s + at.query_start_loc);
  std::copy(st.context_lens.begin(), st.context_lens.end(), s + at.context_lens);
  std::copy(st.block_tables.begin(), st.block_tables.end(), s + at.block_tables);
  backend_->copy_to_device(inputs_.data, s, size_t(at.block_tables + table) * 4);
}

StepLogits ModelRunner::execute(const SchedulerOutput& st, std::span<const int32_t> indices) {
  const int64_t T = st.num_tokens(), V = config_.vocab_size;
  if (T == 0) return {nullptr, 0, V};
  if (caches_.empty()) throw std::logic_error("ModelRunner::execute before allocate_kv_cache");
  if (indices.empty()) indices = st.logits_indices;
  for (int32_t i : indices)
    if (i < 0 || i >= T)
      throw std::invalid_argument("logits index " + std::to_string(i) + " is outside the step's " + std::to_string(T) +
                                  " tokens");
  for (int32_t tok : st.token_ids)
    if (tok < 0 || tok >= V)
      throw std::invalid_argument("token id " + std::to_string(tok) + " is outside the vocabulary [0, " +
                                  std::to_string(V) + ")");
  for (int32_t p : st.positions)
    if (p < 0 || p >= options_.max_model_len)
      throw std::invalid_argument("position " + std::to_string(p) + " is beyond max_model_len=" +
                                  std::to_string(options_.max_model_len));
  // A decode step (a token per sequence, logits for each in order, no block copies) of few
  // enough sequences runs padded to a fixed size, as a graph where the backend has them.
  bool rows_in_order = int64_t(indices.size()) == T;
  for (size_t i = 0; rows_in_order && i < indices.size(); ++i) rows_in_order = indices[i] == int32_t(i);
  if (options_.graph_max_batch > 0 && T == st.num_seqs() && T <= options_.graph_max_batch && rows_in_order &&
      st.block_copies.empty())
    return execute_padded(st);
  upload_inputs(st, indices);
  model::StepInputs x = step_inputs(st, int64_t(indices.size()));
  for (int64_t s = 0; s < x.attention.num_seqs; ++s) {
    x.attention.max_query_len =
        std::max<int64_t>(x.attention.max_query_len, st.query_start_loc[s + 1] - st.query_start_loc[s]);
    x.attention.max_context_len = std::max<int64_t>(x.attention.max_context_len, st.context_lens[s]);
  }
  float* out = static_cast<float*>(logits_.data);
  model_->forward(x, workspace_.data, {caches_, options_.block_size, block_bytes_}, out);
  backend_->finish_step();
  return {out, x.num_logits, V};
}

int64_t ModelRunner::graph_bucket(int64_t n) {
  if (n <= 8) return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : 8;
  return (n + 7) / 8 * 8;
}

StepLogits ModelRunner::execute_padded(const SchedulerOutput& st) {
  const int64_t n = st.num_seqs(), B = std::min(graph_bucket(n), options_.graph_max_batch), V = config_.vocab_size;
  const int64_t W = max_table_width();
  // The step as a graph sees it: B rows (the padding writes no KV: slot -1, and attends to one
  // token of block 0), every block table W wide, the attention planned for max_model_len.
  SchedulerOutput& p = padded_;
  auto pad = [B](std::vector<int32_t>& dst, const std::vector<int32_t>& src, int32_t fill) {
    dst.assign(src.begin(), src.end());
    dst.resize(size_t(B), fill);
  };
  pad(p.token_ids, st.token_ids, 0);
  pad(p.positions, st.positions, 0);
  pad(p.slot_mapping, st.slot_mapping, -1);
  pad(p.context_lens, st.context_lens, 1);
  p.request_ids.resize(size_t(B));
  p.query_start_loc.resize(size_t(B) + 1);
  p.logits_indices.resize(size_t(B));
  std::iota(p.query_start_loc.begin(), p.query_start_loc.end(), 0);
  std::iota(p.logits_indices.begin(), p.logits_indices.end(), 0);
  p.block_table_width = int32_t(W);
  p.block_tables.assign(size_t(B * W), 0);
  for (int64_t s = 0; s < n; ++s) {
    const auto row = st.block_tables.begin() + s * st.block_table_width;
    std::fill(std::copy(row, row + st.block_table_width, p.block_tables.begin() + s * W),
              p.block_tables.begin() + (s + 1) * W, -1);
  }
  upload_inputs(p, p.logits_indices);
  model::StepInputs x = step_inputs(p, B);
  x.attention.max_query_len = 1;
  x.attention.max_context_len = options_.max_model_len;
  float* out = static_cast<float*>(logits_.data);
  const model::KvCacheView kv{caches_, options_.block_size, block_bytes_};
  if (!backend_->capabilities().graphs) {
    model_->forward(x, workspace_.data, kv, out);
  } else {
    if (graphs_.size() <= size_t(B)) graphs_.resize(size_t(B) + 1);
    std::shared_ptr<void>& graph = graphs_[size_t(B)];
    if (graph) {
      backend_->replay(graph.get());
    } else {
      // This step eagerly (which also sizes what a capture cannot allocate: plans, workspaces),
      // then the same launches recorded for the steps to come.
      model_->forward(x, workspace_.data, kv, out);
      backend_->begin_capture();
      model_->forward(x, workspace_.data, kv, out);
      graph = backend_->end_capture();
    }
  }
  backend_->finish_step();
  return {out, n, V};
}

model::StepInputs ModelRunner::step_inputs(const SchedulerOutput& st, int64_t num_logits) const {
  const InputLayout at(max_tokens_, max_seqs_, max_rows_, max_table_);
  const int32_t* in = static_cast<const int32_t*>(inputs_.data);
  model::StepInputs x;
  x.num_tokens = st.num_tokens();
  x.num_logits = num_logits;
  x.token_ids = in + at.token_ids;
  x.positions = in + at.positions;
  x.slot_mapping = in + at.slot_mapping;
  x.logits_indices = in + at.logits_indices;
  x.cos_sin = static_cast<const float*>(rotary_.data);
  x.block_copies = st.block_copies;
  backends::AttentionStep& a = x.attention;
  a.block_tables = in + at.block_tables;
  a.block_table_stride = st.block_table_width;
  a.query_start_loc = in + at.query_start_loc;
  a.context_lens = in + at.context_lens;
  a.host_query_start_loc = st.query_start_loc;
  a.host_context_lens = st.context_lens;
  a.num_seqs = st.num_seqs();
  a.num_tokens = st.num_tokens();
  return x;
}

double ModelRunner::measure_prefill_rate() {
  // A real step: one prompt of up to 128 tokens in the pool's first blocks (free at start-up;
  // whoever gets them later writes every slot before reading it).
  const int64_t bs = options_.block_size;
  const int64_t n = std::min<int64_t>({128, num_blocks_ * bs, options_.max_model_len});
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
  for (int rep = 0; rep < 3; ++rep) {  // the first pass warms up (caches, page faults)
    const auto t0 = std::chrono::steady_clock::now();
    execute(st);
    if (rep > 0) best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }
  return double(n) / best;
}

}  // namespace flashpage::engine
