// The model runner: everything one backend needs to run the model step after step, allocated
// once — the KV pool, the workspace (sized from the step budget, at fixed addresses: what CUDA
// graphs need), the rotary table, the step's inputs in device memory and the logits — and the
// checks of a step's inputs before any of it reaches a kernel.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <vector>

#include "backends/backend.h"
#include "flashpage/scheduler.h"
#include "model/config.h"
#include "model/llama.h"
#include "model/weights.h"

namespace flashpage::engine {

struct RunnerOptions {
  int64_t max_model_len = 0;  // the rotary table covers positions below this
  int64_t block_size = 16;
  // Decode steps of up to this many sequences run padded to a fixed size (1, 2, 4, 8, then
  // multiples of 8) with the attention planned for max_model_len, and, where the backend has
  // graphs, as a graph captured at the first such step and replayed after; 0: every step as it
  // comes. (On a backend without graphs the padding still runs: what tests check on the CPU.)
  int64_t graph_max_batch = 0;
};

// Logits of a step in the backend's memory: [rows, vocab] fp32, valid until the next step.
struct StepLogits {
  const float* data = nullptr;
  int64_t rows = 0, vocab = 0;
};

class ModelRunner {
 public:
  // Loads the weights into the backend; the KV pool comes later (allocate_kv_cache), sized from
  // what is left.
  ModelRunner(const model::ModelConfig& config, model::LlamaWeights weights, std::unique_ptr<backends::Backend> backend,
              const RunnerOptions& options);

  // Workspace and inputs for steps of up to `tokens` tokens of up to `seqs` sequences (grown,
  // never shrunk; a larger step grows them itself, once).
  void reserve(int64_t tokens, int64_t seqs);
  void allocate_kv_cache(int64_t num_blocks);

  // Runs one step: logits for the tokens at `indices` (into the step's token arrays; empty:
  // each sequence's last token). Throws std::invalid_argument for a token id outside the
  // vocabulary, a position beyond max_model_len, an index outside the step.
  StepLogits execute(const SchedulerOutput& step, std::span<const int32_t> indices = {});

  // Prompt tokens per second on this backend: a 128-token prompt through the whole forward
  // pass in the pool's first blocks (free at start-up). For sizing the step budget; call it
  // before the scheduler hands out blocks.
  double measure_prefill_rate();

  backends::Backend& backend() { return *backend_; }
  const model::LlamaModel& model() const { return *model_; }
  int64_t num_blocks() const { return num_blocks_; }
  // K and V of every layer for one token.
  int64_t kv_bytes_per_token() const;

 private:
  // Grows what holds a step of `tokens` tokens, `seqs` sequences, `rows` rows of logits and
  // `table` block-table entries.
  void ensure(int64_t tokens, int64_t seqs, int64_t rows, int64_t table);
  void upload_inputs(const SchedulerOutput& step, std::span<const int32_t> indices);
  // The forward pass's view of the inputs just uploaded (attention maxima left to the caller).
  model::StepInputs step_inputs(const SchedulerOutput& step, int64_t num_logits) const;
  StepLogits execute_padded(const SchedulerOutput& step);  // see RunnerOptions::graph_max_batch
  static int64_t graph_bucket(int64_t num_seqs);
  int64_t max_table_width() const;  // blocks of a sequence at max_model_len

  model::ModelConfig config_;
  RunnerOptions options_;
  std::unique_ptr<backends::Backend> backend_;
  std::unique_ptr<model::LlamaModel> model_;
  backends::DeviceBuffer rotary_;  // [max_model_len, head_dim]: cos in the first half, sin after
  backends::DeviceBuffer kv_;
  std::vector<void*> caches_;  // per layer: K, V
  size_t block_bytes_ = 0;     // one block of one cache
  int64_t num_blocks_ = 0;
  backends::DeviceBuffer workspace_;
  int64_t max_tokens_ = 0, max_seqs_ = 0, max_rows_ = 0, max_table_ = 0;
  // The step's int32 inputs, packed on the host and copied in one transfer to fixed places.
  std::vector<int32_t> staging_;
  backends::DeviceBuffer inputs_;
  backends::DeviceBuffer logits_;  // [max_rows_, vocab] fp32
  SchedulerOutput padded_;                     // a padded decode step (its vectors reused)
  std::vector<std::shared_ptr<void>> graphs_;  // by padded size; dropped when the buffers move
};

}  // namespace flashpage::engine
