#include "flashpage/engine.h"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstdio>
#include <random>
#include <stdexcept>
#include <unordered_map>

#include "backends/cpu/cpu_backend.h"
#include "backends/cuda/cuda_backend.h"
#include "engine/model_runner.h"
#include "kernels/cpu/kernels.h"
#include "model/config.h"
#include "model/gguf.h"
#include "model/safetensors.h"
#include "model/weights.h"
#include "runtime/cuda_loader.h"
#include "engine/kv_cache_plan.h"
#include "engine/sampler.h"
#include "runtime/thread_pool.h"

namespace flashpage {

struct Engine::Impl {
  struct Request {
    SamplingOptions options;
    std::mt19937_64 rng;
  };

  EngineConfig config;
  ModelInfo info;
  std::unique_ptr<engine::ModelRunner> runner;
  std::unique_ptr<Scheduler> scheduler;
  engine::Sampler sampler;
  std::unordered_map<int64_t, Request> requests;
  int64_t next_id = 1;
  std::vector<int32_t> sampled;
  std::vector<float> host_logits;  // the step's logits, when the backend's memory is not the host's
  std::vector<TokenEvent> events;
};

namespace {

// The CUDA device an EngineConfig::device names, or -1 for the CPU.
int cuda_device_of(const std::string& device) {
  if (device == "cpu") return -1;
  if (device == "auto") return runtime::cuda_probe().available ? 0 : -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0 && device.size() > 5 &&
      device.find_first_not_of("0123456789", 5) == std::string::npos && device.size() < 9)
    return std::stoi(device.substr(5));
  throw std::invalid_argument("device \"" + device + "\" is not one of auto, cpu, cuda, cuda:N");
}

uint64_t mix_seed(uint64_t seed, int64_t id) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * uint64_t(id + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

Engine::Engine(const EngineConfig& config) : impl_(std::make_unique<Impl>()) {
  const auto t0 = std::chrono::steady_clock::now();
  Impl& m = *impl_;
  m.config = config;
  const std::string& lf = config.load_format;
  if (lf != "auto" && lf != "safetensors" && lf != "gguf" && lf != "dummy")
    throw std::invalid_argument("load_format \"" + lf + "\" is not supported (auto, safetensors, gguf, dummy)");
  // A .gguf file (llama.cpp's format: config, weights and tokenizer in one file), or a Hugging
  // Face directory.
  const bool gguf = lf == "gguf" || (lf != "safetensors" && config.model.ends_with(".gguf"));
  if (config.quantization != "auto" && config.quantization != "none")
    throw std::invalid_argument("quantization \"" + config.quantization + "\" is not supported (auto, none)");
  std::shared_ptr<model::GgufFile> gguf_file;
  if (gguf) gguf_file = std::make_shared<model::GgufFile>(config.model);
  const model::ModelConfig mc = gguf ? model::ModelConfig::from_gguf(*gguf_file) : model::ModelConfig::from_dir(config.model);
  const bool dummy = lf == "dummy";
  std::shared_ptr<model::WeightStore> store;
  if (!dummy && !gguf) store = std::make_shared<model::WeightStore>(model::WeightStore::open(config.model));
  const int gpu = cuda_device_of(config.device);
  if (gpu >= 0 && config.dtype == "float32")
    throw std::invalid_argument("dtype=float32 on the GPU: the CUDA backend keeps weights in bfloat16 (use dtype "
                                "\"auto\" or \"bfloat16\")");
  // The GPU takes bf16 weights (a float32 or float16 checkpoint is converted as it loads).
  const model::StorageType storage =
      model::resolve_storage(gpu >= 0 ? "bfloat16" : config.dtype, mc, store.get());
  model::LlamaWeights weights = dummy  ? model::dummy_llama_weights(mc, storage, config.seed)
                                : gguf ? model::load_llama_weights(mc, gguf_file, storage, config.quantization != "none")
                                       : model::load_llama_weights(mc, store, storage);

  const int64_t max_len = config.max_model_len > 0 ? config.max_model_len : mc.max_position_embeddings;
  if (max_len > mc.max_position_embeddings)
    throw std::invalid_argument("max_model_len=" + std::to_string(max_len) + " exceeds the model's "
                                "max_position_embeddings=" + std::to_string(mc.max_position_embeddings));
  if (config.block_size <= 0 || config.max_num_seqs <= 0)
    throw std::invalid_argument("block_size and max_num_seqs must be positive");
  std::unique_ptr<backends::Backend> made;
  if (gpu >= 0) {
    made = backends::make_cuda_backend(gpu);
  } else {
    const bool bf16 = storage == model::StorageType::kBF16;
    made = backends::make_cpu_backend(cpu::kernels_for_compute(config.compute_dtype, bf16), bf16);
  }
  if (config.cuda_graph_max_batch < 0)
    throw std::invalid_argument("cuda_graph_max_batch must be >= 0, got " + std::to_string(config.cuda_graph_max_batch));
  engine::RunnerOptions ro{max_len, config.block_size, std::min(config.cuda_graph_max_batch, config.max_num_seqs)};
  m.runner = std::make_unique<engine::ModelRunner>(mc, std::move(weights), std::move(made), ro);
  backends::Backend& backend = m.runner->backend();
  // The workspace first, at the largest step the budget allows (the automatic budget is at
  // most auto_step tokens or max_num_seqs), then the KV pool from what is left. On a GPU the
  // automatic budget is vLLM's there, 8192: a step's time is the tensor cores' until thousands of
  // rows, and a prompt split into smaller chunks re-reads every weight once per chunk.
  const int32_t auto_step = gpu >= 0 ? 8192 : 2048;
  const int32_t step_cap = config.max_num_batched_tokens > 0 ? std::max(config.max_num_batched_tokens, config.max_num_seqs)
                                                             : std::max(auto_step, config.max_num_seqs);
  m.runner->reserve(step_cap, config.max_num_seqs);

  engine::KvCacheSpec spec{mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim, config.block_size,
                            backend.capabilities().kv_bytes};
  const int64_t budget = config.kv_cache_bytes > 0 ? config.kv_cache_bytes
                                                   : backend.kv_cache_budget(gpu >= 0 ? config.gpu_memory_utilization
                                                                                      : config.kv_cache_memory_fraction);
  const engine::KvCachePlan plan = engine::plan_kv_cache(spec, budget, max_len);
  // More blocks than every sequence at max_model_len can use only feed the prefix cache; cap
  // them so a tiny model does not get millions of blocks.
  const int64_t blocks_per_seq = (max_len + config.block_size - 1) / config.block_size;
  const int64_t num_blocks = std::min({plan.num_blocks, 2 * int64_t(config.max_num_seqs) * blocks_per_seq,
                                       int64_t(INT32_MAX) / config.block_size});
  m.runner->allocate_kv_cache(num_blocks);

  ModelInfo& info = m.info;
  info.model_type = mc.model_type;
  info.dtype = model::storage_name(storage);
  info.backend = backend.name();
  info.isa = gpu >= 0 ? "" : backend.name().substr(4);  // "cpu:<isa>"
  info.compute_dtype = backend.capabilities().compute_dtype;
  info.vocab_size = mc.vocab_size;
  info.hidden_size = mc.hidden_size;
  info.num_layers = mc.num_hidden_layers;
  info.max_model_len = int32_t(max_len);
  for (int64_t e : mc.eos_token_ids) info.eos_token_ids.push_back(int32_t(e));
  info.bos_token_id = int32_t(mc.bos_token_id);
  info.num_kv_blocks = num_blocks;
  info.kv_cache_report = plan.report();
  if (num_blocks < plan.num_blocks)
    info.kv_cache_report += "; using " + std::to_string(num_blocks) + " blocks (2 x max_num_seqs sequences of max_model_len)";

  SchedulerConfig sc;
  sc.max_model_len = int32_t(max_len);
  sc.max_num_seqs = config.max_num_seqs;
  if (config.max_num_batched_tokens > 0 || gpu >= 0) {
    sc.max_num_batched_tokens = step_cap;
  } else {
    // A step's budget from this machine's measured speed: room for every running decode plus
    // about kStepSeconds of prefill, so that a long prompt does not stall the running decodes
    // for seconds (chunked prefill) while a prompt that fits is not split behind them; in
    // multiples of 64, at most 2048 (or max_num_seqs).
    constexpr double kStepSeconds = 0.1;
    info.prefill_tokens_per_second = m.runner->measure_prefill_rate();
    const int64_t prefill = std::max<int64_t>(64, int64_t(info.prefill_tokens_per_second * kStepSeconds) / 64 * 64);
    sc.max_num_batched_tokens =
        int32_t(std::min<int64_t>(config.max_num_seqs + prefill, step_cap));
  }
  info.max_num_batched_tokens = sc.max_num_batched_tokens;
  info.cuda_graph_max_batch = int32_t(ro.graph_max_batch);
  info.cuda_graphs = ro.graph_max_batch > 0 && backend.capabilities().graphs;
  sc.policy = config.policy;
  sc.cache.num_blocks = int32_t(num_blocks);
  sc.cache.block_size = config.block_size;
  sc.cache.enable_prefix_caching = config.enable_prefix_caching;
  m.scheduler = std::make_unique<Scheduler>(sc);
  info.weight_bytes_mapped = m.runner->model().weight_bytes_mapped();
  info.weight_bytes_owned = m.runner->model().weight_bytes_owned();
  info.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (config.verbose) {
    const std::string why = info.prefill_tokens_per_second > 0
                                ? " (auto: max_num_seqs + ~0.1 s of prefill at the measured " +
                                      std::to_string(int64_t(info.prefill_tokens_per_second)) + " tokens/s)"
                                : "";
    std::fprintf(stderr,
                 "flashpage: %s (%s weights, %s compute, %s, %d CPU threads), weights %.1f MiB mapped + %.1f MiB "
                 "loaded in %.2f s\n%s\nmax_num_batched_tokens %d%s\n",
                 config.model.c_str(), info.dtype.c_str(), info.compute_dtype.c_str(), info.backend.c_str(),
                 runtime::ThreadPool::global().num_threads(), double(info.weight_bytes_mapped) / (1 << 20),
                 double(info.weight_bytes_owned) / (1 << 20), info.load_seconds, info.kv_cache_report.c_str(),
                 info.max_num_batched_tokens, why.c_str());
  }
}

Engine::~Engine() = default;

const ModelInfo& Engine::info() const { return impl_->info; }
const EngineConfig& Engine::config() const { return impl_->config; }
Scheduler& Engine::scheduler() { return *impl_->scheduler; }
bool Engine::has_unfinished() const { return impl_->scheduler->has_unfinished(); }

int64_t Engine::add_request(std::span<const int32_t> prompt, const SamplingOptions& options) {
  Impl& m = *impl_;
  engine::Sampler::validate(options);
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] < 0 || prompt[i] >= m.info.vocab_size)
      throw RequestRejected("prompt token id " + std::to_string(prompt[i]) + " at position " + std::to_string(i) +
                            " is outside the vocabulary [0, " + std::to_string(m.info.vocab_size) + ")");
  RequestSpec spec;
  spec.request_id = m.next_id++;
  spec.prompt.assign(prompt.begin(), prompt.end());
  spec.stop.max_tokens = options.max_tokens;
  spec.stop.min_tokens = options.min_tokens;
  spec.stop.stop_token_ids = options.stop_token_ids;
  spec.stop.eos_token_ids = m.info.eos_token_ids;
  spec.stop.ignore_eos = options.ignore_eos;
  spec.priority = options.priority;
  const int64_t id = spec.request_id;
  m.scheduler->add_request(std::move(spec));
  const uint64_t seed = options.seed >= 0 ? uint64_t(options.seed) : mix_seed(m.config.seed, id);
  m.requests.emplace(id, Impl::Request{options, std::mt19937_64(seed)});
  return id;
}

bool Engine::abort_request(int64_t request_id) {
  impl_->requests.erase(request_id);
  return impl_->scheduler->abort_request(request_id);
}

Logits Engine::execute(const SchedulerOutput& step, std::span<const int32_t> logits_indices) {
  const engine::StepLogits l = impl_->runner->execute(step, logits_indices);
  const backends::Capabilities& caps = impl_->runner->backend().capabilities();
  return {l.data, l.rows, l.vocab, int32_t(caps.device), caps.device_id};
}

void Engine::execute(const SchedulerOutput& step, std::span<float> out, std::span<const int32_t> logits_indices) {
  const size_t rows = logits_indices.empty() ? size_t(step.num_seqs()) : logits_indices.size();
  const size_t need = rows * size_t(impl_->info.vocab_size);
  if (out.size() < need)
    throw std::invalid_argument("Engine::execute: the logits buffer holds " + std::to_string(out.size()) +
                                " floats; " + std::to_string(rows) + " rows of the vocabulary need " +
                                std::to_string(need));
  const engine::StepLogits l = impl_->runner->execute(step, logits_indices);
  if (l.data) impl_->runner->backend().copy_to_host(out.data(), l.data, size_t(l.rows * l.vocab) * 4);
}

const std::vector<TokenEvent>& Engine::step() {
  Impl& m = *impl_;
  m.events.clear();
  const std::shared_ptr<const SchedulerOutput> st = m.scheduler->schedule();
  const int32_t S = st->num_seqs();
  if (S == 0) return m.events;
  const engine::StepLogits l = m.runner->execute(*st);
  const int64_t V = m.info.vocab_size;
  const float* logits = l.data;
  if (m.runner->backend().capabilities().device != backends::DeviceType::kCpu) {
    m.host_logits.resize(size_t(l.rows * V));
    m.runner->backend().copy_to_host(m.host_logits.data(), l.data, m.host_logits.size() * 4);
    logits = m.host_logits.data();
  }
  m.sampled.assign(size_t(S), 0);
  for (int32_t s = 0; s < S; ++s) {
    if (!st->do_sample[s]) continue;
    Impl::Request& r = m.requests.at(st->request_ids[s]);
    m.sampled[s] = m.sampler.sample({logits + s * V, size_t(V)}, r.options, r.rng);
  }
  for (const RequestUpdate& u : m.scheduler->update(m.sampled)) {
    m.events.push_back({u.request_id, u.token, u.finish});
    if (u.finish != FinishReason::kNone) m.requests.erase(u.request_id);
  }
  return m.events;
}

std::vector<Completion> Engine::generate(const std::vector<std::vector<int32_t>>& prompts,
                                         const SamplingOptions& options) {
  std::vector<Completion> out;
  std::unordered_map<int64_t, size_t> index;
  for (const auto& p : prompts) {
    const int64_t id = add_request(p, options);
    index[id] = out.size();
    out.push_back({id, p, {}, FinishReason::kNone});
  }
  size_t remaining = out.size();
  while (remaining > 0 && has_unfinished()) {
    for (const TokenEvent& e : step()) {
      auto it = index.find(e.request_id);
      if (it == index.end()) continue;
      Completion& c = out[it->second];
      if (e.token >= 0) c.token_ids.push_back(e.token);
      if (e.finish != FinishReason::kNone) {
        c.finish_reason = e.finish;
        --remaining;
      }
    }
  }
  return out;
}

}  // namespace flashpage
