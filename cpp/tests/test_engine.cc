// The C++ Engine end to end on tiny models: loading (dummy weights and a safetensors checkpoint
// converted at load), chunked prefill, prefix caching, preemption under a tiny KV cache,
// sampling and aborts, on each model variant and weight storage. Small enough to run under the
// sanitizer build, where it checks the executor, the kernels it dispatches to and the KV cache
// for memory errors and undefined behaviour.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "engine/sampler.h"
#include "flashpage/engine.h"
#include "runtime/cuda_loader.h"
#include "test_files.h"
#include "test_util.h"

using namespace flashpage;

namespace {

constexpr int kVocab = 96;

// head_dim 32 and 64 take the AMX attention kernel where the CPU has one (bf16 KV), 16 not.
std::string tiny_config(const std::string& model_type, bool tied, int head_dim) {
  return R"({"model_type": ")" + model_type + R"(", "hidden_size": 64, "intermediate_size": 96,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": )" +
         std::to_string(head_dim) + R"(,
    "vocab_size": )" + std::to_string(kVocab) + R"(, "max_position_embeddings": 128, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "hidden_act": "silu", "eos_token_id": 95,
    "tie_word_embeddings": )" + (tied ? "true" : "false") + "}";
}

EngineConfig engine_config(const std::string& dir, const std::string& dtype, int64_t kv_bytes) {
  EngineConfig c;
  c.model = dir;
  c.dtype = dtype;
  c.load_format = "dummy";
  c.max_model_len = 128;
  c.block_size = 16;
  c.max_num_seqs = 4;
  c.max_num_batched_tokens = 24;  // prompts are prefilled in chunks beside the decodes
  c.kv_cache_bytes = kv_bytes;
  return c;
}

// Prompts sharing a 40-token prefix (two full blocks for the prefix cache), of assorted lengths.
std::vector<std::vector<int32_t>> prompts() {
  std::vector<std::vector<int32_t>> out;
  std::vector<int32_t> prefix(40);
  for (int i = 0; i < 40; ++i) prefix[i] = (i * 7 + 3) % 90;
  for (int len : {1, 5, 41, 57, 70, 33}) {
    std::vector<int32_t> p(prefix.begin(), prefix.begin() + std::min(len, 40));
    for (int i = int(p.size()); i < len; ++i) p.push_back((i * 13 + len) % 90);
    out.push_back(p);
  }
  return out;
}

void check_completions(const std::vector<Completion>& done, size_t n, int max_tokens) {
  REQUIRE(done.size() == n);
  for (const Completion& c : done) {
    CHECK(!c.token_ids.empty() && int(c.token_ids.size()) <= max_tokens);
    CHECK(c.finish_reason == FinishReason::kLength || c.finish_reason == FinishReason::kStop);
    for (int32_t t : c.token_ids) CHECK(t >= 0 && t < kVocab);
  }
}

std::vector<std::vector<int32_t>> tokens_of(const std::vector<Completion>& done) {
  std::vector<std::vector<int32_t>> out;
  for (const Completion& c : done) out.push_back(c.token_ids);
  return out;
}

// A safetensors file of F16 tensors with small pseudo-random values.
std::string f16_checkpoint(const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors) {
  std::string header = "{", data;
  std::mt19937 rng(3);
  for (const auto& [name, shape] : tensors) {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    const size_t begin = data.size();
    for (int64_t i = 0; i < n; ++i) {
      // f16 with exponent 11..13 (values of about 1/16..1/4), random sign and mantissa
      const uint16_t h = uint16_t((rng() & 0x8000) | ((11 + rng() % 3) << 10) | (rng() & 0x3FF));
      data.push_back(char(h & 0xFF));
      data.push_back(char(h >> 8));
    }
    std::string dims;
    for (int64_t d : shape) dims += (dims.empty() ? "" : ", ") + std::to_string(d);
    header += std::string(header.size() > 1 ? ", " : "") + "\"" + name + "\": {\"dtype\": \"F16\", \"shape\": [" +
              dims + "], \"data_offsets\": [" + std::to_string(begin) + ", " + std::to_string(data.size()) + "]}";
  }
  header += "}";
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = char((uint64_t(header.size()) >> (8 * i)) & 0xFF);
  return out + header + data;
}

}  // namespace

TEST(engine_generates_on_every_variant_and_storage) {
  SamplingOptions greedy;
  greedy.temperature = 0.f;
  greedy.max_tokens = 10;
  SamplingOptions sampled;
  sampled.temperature = 0.8f;
  sampled.top_k = 7;
  sampled.top_p = 0.9f;
  sampled.min_p = 0.02f;
  sampled.seed = 5;
  sampled.max_tokens = 6;
  for (const auto& [type, head_dim] : {std::pair<const char*, int>{"llama", 32}, {"qwen2", 64}, {"qwen3", 16}}) {
    for (const char* dtype : {"bfloat16", "float32"}) {
      test_files::TempDir dir;
      test_files::write(dir.path() + "/config.json", tiny_config(type, std::string(type) != "qwen2", head_dim));
      Engine big(engine_config(dir.path(), dtype, int64_t(8) << 20));
      const auto ps = prompts();
      const auto first = big.generate(ps, greedy);
      check_completions(first, ps.size(), greedy.max_tokens);
      // Again, now from the prefix cache: the same tokens.
      CHECK(tokens_of(big.generate(ps, greedy)) == tokens_of(first));
      const auto s1 = big.generate(ps, sampled);
      check_completions(s1, ps.size(), sampled.max_tokens);
      CHECK(tokens_of(big.generate(ps, sampled)) == tokens_of(s1));  // seeded

      // A cache of 9 blocks for 6 sequences of up to 5 blocks: preemption by recompute.
      const int64_t block_bytes = 2 * 2 * 2 * head_dim * 16 * (std::string(dtype) == "bfloat16" ? 2 : 4);
      Engine small(engine_config(dir.path(), dtype, 9 * block_bytes));
      CHECK_EQ(small.info().num_kv_blocks, 9);
      CHECK(tokens_of(small.generate(ps, greedy)) == tokens_of(first));

      // Aborts in every state: waiting, prefilling, decoding.
      std::vector<int64_t> ids;
      for (const auto& p : ps) ids.push_back(small.add_request(p, greedy));
      small.abort_request(ids.back());
      for (int i = 0; i < 3; ++i) small.step();
      small.abort_request(ids[0]);
      small.abort_request(ids[3]);
      int steps = 0;
      while (small.has_unfinished() && steps++ < 1000) small.step();
      CHECK(!small.has_unfinished());
    }
  }
}

TEST(engine_loads_a_converted_safetensors_checkpoint) {
  test_files::TempDir dir;
  test_files::write(dir.path() + "/config.json", tiny_config("llama", false, 32));
  std::vector<std::pair<std::string, std::vector<int64_t>>> t = {
      {"model.embed_tokens.weight", {kVocab, 64}}, {"lm_head.weight", {kVocab, 64}}, {"model.norm.weight", {64}}};
  for (int l = 0; l < 2; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", {64}});
    t.push_back({p + "post_attention_layernorm.weight", {64}});
    t.push_back({p + "self_attn.q_proj.weight", {128, 64}});
    t.push_back({p + "self_attn.k_proj.weight", {64, 64}});
    t.push_back({p + "self_attn.v_proj.weight", {64, 64}});
    t.push_back({p + "self_attn.o_proj.weight", {64, 128}});
    t.push_back({p + "mlp.gate_proj.weight", {96, 64}});
    t.push_back({p + "mlp.up_proj.weight", {96, 64}});
    t.push_back({p + "mlp.down_proj.weight", {64, 96}});
  }
  test_files::write(dir.path() + "/model.safetensors", f16_checkpoint(t));
  SamplingOptions greedy;
  greedy.temperature = 0.f;
  greedy.max_tokens = 8;
  for (const char* dtype : {"bfloat16", "float32"}) {
    EngineConfig c = engine_config(dir.path(), dtype, int64_t(4) << 20);
    c.load_format = "auto";
    Engine e(c);
    CHECK(e.info().weight_bytes_owned > 0);  // F16 is converted at load
    const auto ps = prompts();
    check_completions(e.generate(ps, greedy), ps.size(), greedy.max_tokens);
  }
  // A checkpoint that lacks a tensor the config asks for is refused by name.
  t.pop_back();
  test_files::write(dir.path() + "/model.safetensors", f16_checkpoint(t));
  EngineConfig c = engine_config(dir.path(), "float32", int64_t(4) << 20);
  c.load_format = "auto";
  CHECK_THROWS(std::runtime_error, Engine{c}, "no tensor 'model.layers.1.mlp.down_proj.weight'");
}

TEST(engine_names_the_device_it_cannot_use) {
  test_files::TempDir dir;
  test_files::write(dir.path() + "/config.json", tiny_config("llama", true, 32));
  EngineConfig c = engine_config(dir.path(), "bfloat16", int64_t(8) << 20);
  c.device = "tpu";
  CHECK_THROWS(std::invalid_argument, Engine(c), "not one of auto, cpu, cuda, cuda:N");
  c.device = "auto";  // the CPU wherever the CUDA backend is not usable
  if (!runtime::cuda_probe().available) {
    CHECK(Engine(c).info().backend.rfind("cpu:", 0) == 0);
    c.device = "cuda";
    CHECK_THROWS(std::runtime_error, Engine(c), "the CUDA backend is not available");
    c.device = "cuda:1";
    CHECK_THROWS(std::runtime_error, Engine(c), "the CUDA backend is not available");
  }
  c.device = "cuda";
  c.dtype = "float32";
  CHECK_THROWS(std::invalid_argument, Engine(c), "keeps weights in bfloat16");
}

// Greedy takes the first maximum, as std::max_element: ties go to the lowest id, a NaN counts only
// as the first value, lengths that are not a multiple of the vectorized pass's lanes included.
TEST(sampler_greedy_takes_the_first_maximum) {
  engine::Sampler sampler;
  std::mt19937_64 rng(1);
  SamplingOptions greedy;
  greedy.temperature = 0.f;
  std::mt19937 gen(5);
  std::uniform_real_distribution<float> u(-4.f, 4.f);
  for (int n : {1, 7, 8, 9, 33, 49152}) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = u(gen);
    const float nan = std::numeric_limits<float>::quiet_NaN();
    if (n > 3) x[size_t(n) / 2] = nan;  // ignored in the middle
    const int64_t want = std::max_element(x.begin(), x.end()) - x.begin();
    CHECK(sampler.sample(x, greedy, rng) == want);
    x[size_t(want)] -= 1.f;  // a tie between two later positions: the first of them
    if (n > 8) {
      x[size_t(n) - 1] = x[size_t(n) - 2] = 10.f;
      CHECK(sampler.sample(x, greedy, rng) == n - 2);
    }
    x[0] = nan;  // a NaN first wins, as it does for std::max_element
    CHECK(sampler.sample(x, greedy, rng) == 0);
  }
  const std::vector<float> flat(100, -std::numeric_limits<float>::infinity());
  CHECK(sampler.sample(flat, greedy, rng) == 0);
}
