// Whole-engine throughput from C++, no Python: B random prompts generated together, greedy,
// EOS ignored. Prints generated tokens per second (median of --reps runs, each with fresh
// prompts so that the prefix cache does not hit). A model dir holding only config.json works
// with --dummy.
// Usage: bench_engine MODEL_DIR [--dummy] [--batch 16] [--prompt 16] [--tokens 64] [--reps 3]
//                     [--dtype bfloat16] [--compute-dtype auto] [--max-model-len 1024]
//                     [--max-num-batched-tokens 1024] [--decode-only]
// (--tokens 1 times the prefill: prompt tokens per second are batch * prompt / time.)
// --decode-only: the clock starts once every prompt has its first token, so the figure is the
// decode steps' alone (the tokens of the steps timed / time), at contexts from prompt to
// prompt + tokens.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <random>
#include <string>
#include <unordered_set>
#include <vector>

#include "flashpage/engine.h"

int main(int argc, char** argv) try {
  if (argc < 2) {
    std::fprintf(stderr, "usage: bench_engine MODEL_DIR [--dummy] [--batch B] [--prompt P] [--tokens T] "
                         "[--reps R] [--dtype D] [--compute-dtype C] [--max-model-len L] "
                         "[--max-num-batched-tokens N] [--decode-only]\n");
    return 2;
  }
  flashpage::EngineConfig cfg;
  cfg.model = argv[1];
  cfg.max_model_len = 1024;
  cfg.max_num_batched_tokens = 1024;
  int batch = 16, prompt = 16, tokens = 64, reps = 3;
  bool decode_only = false;
  int64_t decoded = 0;  // tokens of the timed steps, with --decode-only
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? argv[++i] : throw std::invalid_argument(a + " needs a value"); };
    if (a == "--dummy") cfg.load_format = "dummy";
    else if (a == "--batch") batch = std::atoi(next());
    else if (a == "--prompt") prompt = std::atoi(next());
    else if (a == "--tokens") tokens = std::atoi(next());
    else if (a == "--reps") reps = std::max(1, std::atoi(next()));
    else if (a == "--dtype") cfg.dtype = next();
    else if (a == "--compute-dtype") cfg.compute_dtype = next();
    else if (a == "--max-model-len") cfg.max_model_len = std::atoi(next());
    else if (a == "--max-num-batched-tokens") cfg.max_num_batched_tokens = std::atoi(next());
    else if (a == "--decode-only") decode_only = true;
    else throw std::invalid_argument("unknown option " + a);
  }
  flashpage::Engine engine(cfg);
  const auto vocab = int32_t(engine.info().vocab_size);
  std::mt19937 rng(0);
  flashpage::SamplingOptions opt;
  opt.temperature = 0;
  opt.max_tokens = tokens;
  opt.ignore_eos = true;
  auto run = [&] {
    std::vector<std::vector<int32_t>> prompts(size_t(batch), std::vector<int32_t>(size_t(prompt), 0));
    for (auto& p : prompts)
      for (auto& t : p) t = int32_t(rng() % uint32_t(vocab));
    auto t0 = std::chrono::steady_clock::now();
    if (!decode_only) {
      engine.generate(prompts, opt);
      return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    }
    for (const auto& p : prompts) engine.add_request(p, opt);
    std::unordered_set<int64_t> started;
    while (int64_t(started.size()) < batch)
      for (const flashpage::TokenEvent& e : engine.step()) started.insert(e.request_id);
    // Only the tokens of the steps timed: the first prompts decode while the last are prefilled.
    t0 = std::chrono::steady_clock::now();
    decoded = 0;
    while (engine.has_unfinished())
      for (const flashpage::TokenEvent& e : engine.step()) decoded += e.token >= 0;
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  };
  if (decode_only && tokens < 2) throw std::invalid_argument("--decode-only needs --tokens of 2 or more");
  // The engine would stop them short (the last token needs no position of its own).
  if (int64_t(prompt) + tokens - 1 > engine.config().max_model_len)
    throw std::invalid_argument("--prompt + --tokens - 1 exceeds --max-model-len " +
                                std::to_string(engine.config().max_model_len));
  run();  // warm-up: scratch buffers, KV pages
  std::vector<double> rates;
  const double per_run = double(batch) * (tokens == 1 ? prompt : tokens);
  for (int r = 0; r < reps; ++r) {
    const double sec = run();
    rates.push_back((decode_only ? double(decoded) : per_run) / sec);
  }
  std::sort(rates.begin(), rates.end());
  const char* what = tokens == 1 ? "prompt" : decode_only ? "decoded" : "generated";
  std::printf("batch %d, prompt %d, %d tokens each (%s): %.1f %s tok/s (median of %d; min %.1f, max %.1f)\n", batch,
              prompt, tokens, engine.info().isa.c_str(), rates[rates.size() / 2], what, reps, rates.front(),
              rates.back());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "bench_engine: %s\n", e.what());
  return 1;
}
