// The weights of a Llama-family model. As loaded: Hugging Face's [out, in] matrices, fp32 or
// bf16; where the checkpoint already holds that dtype they point into the memory-mapped
// safetensors files (no copy), otherwise they are converted once. The model then loads them into
// its backend (model/llama.cc: the CPU backend repacks the Linear matrices into its kernels'
// panel layout and gathers embedding rows from the table as loaded).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "backends/matrix.h"
#include "model/config.h"
#include "model/safetensors.h"
#include "runtime/host_buffer.h"

namespace flashpage::model {

class GgufFile;

// How weights (and the KV cache) are stored; compute is fp32 either way.
enum class StorageType { kF32, kBF16 };
const char* storage_name(StorageType s);  // "float32" / "bfloat16"

using Matrix = backends::Matrix;  // a weight as loaded, or as a backend holds it

struct LayerWeights {
  Matrix q, k, v, o, gate, up, down;
  std::vector<float> input_norm, post_attention_norm;
  std::vector<float> q_norm, k_norm;          // qwen3: per-head RMSNorm weights [head_dim]
  std::vector<float> q_bias, k_bias, v_bias;  // qwen2: q/k/v projection biases
};

struct LlamaWeights {
  StorageType storage = StorageType::kBF16;
  Matrix embed, lm_head;  // lm_head aliases embed when the embeddings are tied
  std::vector<float> final_norm;
  std::vector<LayerWeights> layers;
  int64_t mapped_bytes = 0;  // matrix bytes read in place from the mapped files (once packed:
                             // the embedding table only)
  int64_t owned_bytes = 0;   // matrix bytes converted, generated or packed
  std::shared_ptr<WeightStore> store;      // keeps the mappings alive
  std::shared_ptr<GgufFile> gguf;          // or the GGUF file's
  std::vector<runtime::HostBuffer> owned;  // converted or generated matrices
};

// The storage for a requested dtype: "auto" (the checkpoint's: config.json's torch_dtype, else
// the embedding tensor's dtype; float16 is widened to float32, as the CPU kernels have no fp16
// path), "bfloat16" or "float32". Throws std::invalid_argument for anything else.
StorageType resolve_storage(const std::string& dtype, const ModelConfig& config,
                            const WeightStore* store);

// Loads and validates every tensor the config needs; errors name the tensor, its file and the
// problem (missing, wrong shape, non-float dtype).
LlamaWeights load_llama_weights(const ModelConfig& config, std::shared_ptr<WeightStore> store,
                                StorageType storage);

// The same from a GGUF file (config from ModelConfig::from_gguf). With `quantized`, the Linear
// weights the file holds quantized stay int8 (Q8_0 as stored, other types requantized to it:
// see Matrix::int8), the rest is dequantized into `storage`; without, everything is. Errors
// name the file, the tensor and the problem.
LlamaWeights load_llama_weights(const ModelConfig& config, std::shared_ptr<GgufFile> gguf, StorageType storage,
                                bool quantized = true);

// Random weights of the config's shapes (load_format="dummy"), for benchmarks of any shape.
LlamaWeights dummy_llama_weights(const ModelConfig& config, StorageType storage, uint64_t seed);

}  // namespace flashpage::model
