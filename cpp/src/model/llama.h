// The Llama-family model (llama, mistral, qwen2, qwen3): its weights in a backend's memory and
// the layer loop of one forward pass (DESIGN.md, "the data flow of one engine step"), written
// once against backends::Backend. One call runs a flattened batch of prefill chunks and
// decodes, writes K/V into the paged cache through the slot mapping, and computes logits only
// for the rows asked for (each sequence's last token, or every prompt token for logprobs).
// The model runner (engine/model_runner.h) owns the memory it runs in.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "backends/backend.h"
#include "flashpage/scheduler.h"
#include "model/config.h"
#include "model/weights.h"

namespace flashpage::model {

// One step's inputs, in the backend's memory (the runner uploads them).
struct StepInputs {
  int64_t num_tokens = 0;
  int64_t num_logits = 0;            // rows of logits: entries of logits_indices
  const int32_t* token_ids = nullptr;       // [num_tokens], inside the vocabulary
  const int32_t* positions = nullptr;       // [num_tokens], below the rotary table's length
  const int32_t* slot_mapping = nullptr;    // [num_tokens]
  const int32_t* logits_indices = nullptr;  // [num_logits], into the step's tokens
  const float* cos_sin = nullptr;           // the rotary table [positions, head_dim]
  std::span<const BlockCopy> block_copies;  // host: copy-on-write before the step
  backends::AttentionStep attention;
};

// The paged KV pool: caches[2 * layer] is layer's K, caches[2 * layer + 1] its V, each
// [num_blocks, kv_heads, block_size, head_dim].
struct KvCacheView {
  std::span<void* const> caches;
  int64_t block_size = 0;
  size_t block_bytes = 0;  // one block of one cache
};

class LlamaModel {
 public:
  // Loads the weights into the backend (packing them in its layout), releasing the host copies
  // it no longer needs.
  LlamaModel(const ModelConfig& config, LlamaWeights weights, backends::Backend& backend);

  // Bytes of activations for steps of up to `tokens` tokens and `logits_rows` rows of logits.
  size_t workspace_bytes(int64_t tokens, int64_t logits_rows) const;
  // Runs one step in `workspace` (workspace_bytes for at least this step), writing logits
  // [num_logits, vocab] fp32 to `logits`. Returns when the backend has been given every op.
  void forward(const StepInputs& step, void* workspace, const KvCacheView& kv, float* logits);

  const ModelConfig& config() const { return config_; }
  int64_t weight_bytes_mapped() const { return host_.mapped_bytes; }
  int64_t weight_bytes_owned() const { return host_.owned_bytes; }

 private:
  // A layer's weights as the backend holds them (norms and biases: nullptr when absent).
  struct Layer {
    Matrix q, k, v, o, gate, up, down;
    const void *input_norm, *post_attention_norm, *q_norm, *k_norm, *q_bias, *k_bias, *v_bias;
  };
  struct Activations;
  Activations carve(void* base, int64_t tokens, int64_t logits_rows) const;

  ModelConfig config_;
  backends::Backend& be_;
  LlamaWeights host_;  // as loaded, less what the backend copied (keeps the mappings alive)
  std::vector<backends::DeviceBuffer> device_;
  Matrix embed_, lm_head_;
  const void* final_norm_ = nullptr;
  std::vector<Layer> layers_;
};

}  // namespace flashpage::model
