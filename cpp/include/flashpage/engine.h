// flashpage — the engine: a Hugging Face model directory in, generated token ids out.
//
// Owns the model executor, the scheduler (continuous batching, chunked prefill, prefix
// caching, preemption) and a C++ sampler (greedy, temperature, top-k, top-p, min-p, per-request
// seed). Host applications drive it with add_request() + step(), or call generate(). Not
// thread-safe: one thread drives it.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "flashpage/scheduler.h"

namespace flashpage {

struct EngineConfig {
  std::string model;                // a directory with config.json and *.safetensors
  // Where the model runs: "cpu", "cuda" or "cuda:N" (weights, activations and KV cache in bf16
  // on the GPU; needs libflashpage_cuda and a driver), or "auto" (the GPU when one is usable).
  std::string device = "cpu";
  std::string dtype = "auto";       // "auto" (the checkpoint's), "bfloat16" or "float32"
  // Arithmetic of the CPU kernels: "auto" (bf16 weights compute in bf16 — bf16 products, fp32
  // sums — where the CPU has bf16 dot products, AVX512-BF16 or AMX; else fp32), "float32"
  // (always fp32: bf16 weights widened) or "bfloat16" (refused where the CPU cannot).
  std::string compute_dtype = "auto";
  std::string load_format = "auto"; // "auto" (a .gguf file: gguf; else safetensors), "gguf", "dummy"
  // Quantized weights: "auto" runs a GGUF's quantized Linear weights as int8 (Q8_0 as stored,
  // other types requantized to it), "none" dequantizes them to `dtype`.
  std::string quantization = "auto";
  int32_t max_model_len = 0;        // 0: the model's max_position_embeddings
  int32_t block_size = 16;
  int32_t max_num_seqs = 256;
  // Tokens per step (decodes + prefill chunks); 0: chosen from this machine's measured prefill
  // speed: max_num_seqs (room for every decode) + about 0.1 s of prefill, at most 2048.
  int32_t max_num_batched_tokens = 0;
  bool enable_prefix_caching = true;
  SchedulingPolicy policy = SchedulingPolicy::kFcfs;
  // KV-cache budget: kv_cache_bytes if positive, else this fraction of the available memory.
  int64_t kv_cache_bytes = 0;
  double kv_cache_memory_fraction = 0.25;
  // On a GPU: the fraction of its memory this engine may use (vLLM's meaning); the KV pool gets
  // what the weights and the workspace leave of it.
  double gpu_memory_utilization = 0.9;
  // Decode steps of up to this many sequences run as CUDA graphs on a GPU: padded to 1, 2, 4, 8
  // or a multiple of 8 rows, captured at the first step of each size, replayed after (vLLM's
  // capture sizes). 0: every step launched op by op (vLLM's enforce_eager). On the CPU the
  // steps are padded the same way and run as they come.
  int32_t cuda_graph_max_batch = 0;
  uint64_t seed = 0;  // seeds requests that bring no seed of their own
  bool verbose = false;  // print the start-up report to stderr
};

struct SamplingOptions {
  float temperature = 1.0f;  // 0: greedy
  int32_t top_k = 0;         // 0 or -1: all tokens
  float top_p = 1.0f;
  float min_p = 0.0f;
  int64_t seed = -1;         // -1: derived from the engine seed and the request id
  int32_t max_tokens = 16;
  int32_t min_tokens = 0;
  std::vector<int32_t> stop_token_ids;
  bool ignore_eos = false;
  int32_t priority = 0;
};

struct ModelInfo {
  std::string model_type;
  std::string dtype;          // storage of weights and KV cache: "bfloat16" or "float32"
  std::string compute_dtype;  // inputs of the Linear and attention kernels: "bfloat16" or "float32"
  std::string backend;        // what runs the model: "cpu:<isa>" or "cuda:<device>"
  std::string isa;            // CPU kernels in use
  int64_t vocab_size = 0, hidden_size = 0, num_layers = 0;
  int32_t max_model_len = 0;
  std::vector<int32_t> eos_token_ids;
  int32_t bos_token_id = -1;
  int64_t num_kv_blocks = 0;
  int64_t weight_bytes_mapped = 0;  // read in place from the checkpoint files (the embeddings)
  int64_t weight_bytes_owned = 0;   // packed, converted or generated at load
  std::string kv_cache_report;
  double load_seconds = 0;
  int32_t max_num_batched_tokens = 0;     // the step budget in use
  int32_t cuda_graph_max_batch = 0;       // decode steps of up to this many sequences run padded / as graphs
  bool cuda_graphs = false;               // and are captured as graphs (the backend has them)
  double prefill_tokens_per_second = 0;  // measured at start-up when the budget is automatic
};

// One token (or a finish) of one request, from step().
struct TokenEvent {
  int64_t request_id;
  int32_t token;  // -1 when the step only finished it (abort)
  FinishReason finish;
};

// A step's logits where the backend computed them: [rows, vocab] fp32, valid until the next
// step. device_type and device_id as DLPack names devices (1: CPU, 2: CUDA), so that they can
// be handed on without a copy.
struct Logits {
  const float* data = nullptr;
  int64_t rows = 0, vocab = 0;
  int32_t device_type = 1, device_id = 0;
};

struct Completion {
  int64_t request_id;
  std::vector<int32_t> prompt_token_ids;
  std::vector<int32_t> token_ids;
  FinishReason finish_reason;
};

class Engine {
 public:
  // Loads the model and sizes the KV cache; throws std::runtime_error naming the file, tensor
  // or limit that is wrong.
  explicit Engine(const EngineConfig& config);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  const ModelInfo& info() const;
  const EngineConfig& config() const;

  // Queues a request and returns its id. Throws RequestRejected (too long, empty, token ids
  // outside the vocabulary) or std::invalid_argument (impossible sampling options).
  int64_t add_request(std::span<const int32_t> prompt, const SamplingOptions& options = {});
  bool abort_request(int64_t request_id);
  bool has_unfinished() const;
  // Runs one step: schedule, forward, sample, update. The events stay valid until the next call.
  const std::vector<TokenEvent>& step();
  // Adds the prompts, steps until all are done and returns them in prompt order.
  std::vector<Completion> generate(const std::vector<std::vector<int32_t>>& prompts,
                                   const SamplingOptions& options);

  // Lower level, for a caller with its own sampler (the Python layer): plan a step, run the
  // model on it, then hand the sampled tokens to scheduler().update(). The logits are for the
  // tokens at `logits_indices` (indices into the step's token arrays, e.g. every prompt token
  // for prompt logprobs), or for each sequence's last token when it is empty; they stay in the
  // backend's memory until the next execute.
  Scheduler& scheduler();
  Logits execute(const SchedulerOutput& step, std::span<const int32_t> logits_indices = {});
  // The same, copied into the caller's host buffer `out` [rows, vocab]. Throws
  // std::invalid_argument if `out` is too small.
  void execute(const SchedulerOutput& step, std::span<float> out, std::span<const int32_t> logits_indices = {});

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace flashpage
