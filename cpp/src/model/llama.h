// The Llama-family forward pass on the CPU (DESIGN.md, "the data flow of one engine step"):
// one flattened batch of prefill chunks and decodes per call, K/V written into the paged cache
// through the slot mapping, logits only for the last position of each scheduled sequence.
//
// Every kernel computes each output row with a fixed reduction order that depends on nothing
// but that row, so a sequence's logits are bitwise the same whatever shares its batch and
// however its prompt was chunked (batch invariance, always on: it costs nothing here).
#pragma once

#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <vector>

#include "flashpage/scheduler.h"
#include "kernels/cpu/kernels.h"
#include "model/config.h"
#include "model/weights.h"
#include "runtime/aligned.h"
#include "runtime/host_buffer.h"

namespace flashpage::model {

struct ExecutorOptions {
  int64_t num_blocks = 0;
  int64_t block_size = 16;
  int64_t max_model_len = 0;  // rotary tables cover positions below this
};

class LlamaModel {
 public:
  LlamaModel(const ModelConfig& config, LlamaWeights weights, const ExecutorOptions& options,
             const cpu::KernelTable& kernels);

  // Runs one step; returns logits [step.num_seqs(), vocab] (row s: sequence s's last scheduled
  // token), valid until the next call. Throws std::invalid_argument for a token id outside the
  // vocabulary or a position beyond max_model_len.
  const float* forward(const SchedulerOutput& step);
  // The same, with logits for the tokens at `indices` (into the step's token arrays; empty: each
  // sequence's last token) written to `out` [indices.size() (or num_seqs), vocab].
  void forward(const SchedulerOutput& step, std::span<const int32_t> indices, float* out);

  // Prompt tokens per second of this model on this machine: a 128-token prompt run through the
  // whole forward pass (the cache's first blocks, free at start-up). Tens of milliseconds; for
  // sizing the step budget. Call it before the scheduler hands out blocks.
  double measure_prefill_rate();

  const ModelConfig& config() const { return config_; }
  const LlamaWeights& weights() const { return weights_; }
  int64_t kv_cache_bytes() const { return int64_t(kv_.size()); }
  bool kv_bf16() const { return weights_.storage == StorageType::kBF16; }

 private:
  struct LinearJob {
    float* y;
    int64_t ldy;  // row stride of y
    const Matrix* w;
    const float* bias;
  };
  // y_j = x . w_j^T (+ bias_j) for every job, one parallel pass over all their panels; `input`
  // is x as the kernels take it (cpu::linear_input_for, into x16_).
  void run_linears(const void* input, int64_t rows, std::initializer_list<LinearJob> jobs);
  // x [rows, K] as a Linear input: itself, or rounded to bf16 into x16_ (the bf16 kernels).
  const void* as_input(const float* x, int64_t rows, int64_t K);
  void ensure_scratch(int64_t tokens, int64_t seqs);
  void embed(const SchedulerOutput& step);
  void attention(const SchedulerOutput& step, int64_t layer);
  void copy_blocks(const SchedulerOutput& step);
  void prefault_kv(std::chrono::milliseconds budget, size_t max_bytes);
  void* k_cache(int64_t layer) const;
  void* v_cache(int64_t layer) const;

  ModelConfig config_;
  LlamaWeights weights_;
  ExecutorOptions options_;
  const cpu::KernelTable& kern_;
  runtime::HostBuffer kv_;    // [layers][K, V][num_blocks, kv_heads, block_size, head_dim]
  int64_t layer_kv_elems_ = 0;  // elements of one layer's K (or V) cache
  std::vector<float> cos_sin_;  // [max_model_len, head_dim]: cos in the first half, sin after
  // Scratch, grown to the largest step seen (no allocation in steady state), cache-line aligned.
  runtime::AlignedVector<float> residual_, delta_, normed_, q_, k_, v_, attn_, gate_up_, act_;
  runtime::AlignedVector<float> last_residual_, last_delta_, last_normed_, logits_;
  runtime::AlignedVector<uint16_t> x16_;  // a Linear's input rounded to bf16 (bf16 compute)
  struct AttentionItem {
    int64_t seq, kv_head, row_begin, row_end;
    double cost;
  };
  std::vector<AttentionItem> items_;  // attention work items of the current layer
  std::vector<int64_t> bounds_;       // and their split per thread
};

}  // namespace flashpage::model
