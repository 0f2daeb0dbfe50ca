// A Hugging Face config.json for the Llama family (llama, mistral, qwen2, qwen3), validated:
// anything the engine does not implement is refused by name at load time.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace flashpage::model {

class GgufFile;

struct RopeScaling {
  std::string type;  // "" (none), "linear" or "llama3"
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int64_t original_max_position_embeddings = 8192;       // llama3
};

// flashpage's canonical quantized checkpoints (python/flashpage/quantization.py), from
// config.json's "quantization_config": {"quant_method": "flashpage", ...}.
struct QuantConfig {
  std::string format;       // "" (float), "w4a16", "w8a8-int8" or "fp8"
  int64_t group_size = 0;   // w4a16: input features per scale (-1: one group per row)
  bool symmetric = true;    // w4a16: no qzeros (zero point 8)
};

struct ModelConfig {
  std::string model_type;
  int64_t hidden_size = 0, intermediate_size = 0, num_hidden_layers = 0;
  int64_t num_attention_heads = 0, num_key_value_heads = 0, head_dim = 0;
  int64_t vocab_size = 0, max_position_embeddings = 0;
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v projections carry a bias (qwen2)
  bool qk_norm = false;         // RMSNorm on q and k per head (qwen3)
  std::string torch_dtype;      // "bfloat16", "float16", "float32" or ""
  QuantConfig quant;
  std::vector<int64_t> eos_token_ids;
  int64_t bos_token_id = -1;

  // Parses and validates; `source` names the file in errors.
  static ModelConfig from_json_text(const std::string& text, const std::string& source);
  static ModelConfig from_dir(const std::string& model_dir);
  // From a GGUF file's metadata ({arch}.embedding_length, ...; tokenizer.ggml.bos_token_id, ...),
  // through the same checks; errors name the file and the key.
  static ModelConfig from_gguf(const GgufFile& file);

  // The rotary inverse frequencies (head_dim / 2 values), scaling applied.
  std::vector<double> rope_inv_freq() const;
};

}  // namespace flashpage::model
