// A host program embedding flashpage: loads a Hugging Face model directory and generates from
// token ids with the C++ engine and sampler, no Python involved.
//
//   generate MODEL_DIR [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
//            [--dtype auto|bfloat16|float32] [--max-model-len N] [--dummy] TOKEN_ID...
//
// Prints the generated ids on stdout, one line; timings on stderr, including the time from
// process start to the first generated token.
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <unistd.h>

#include <flashpage/engine.h>

namespace {

double seconds_since_process_start() {
  // /proc/self/stat field 22: start time in clock ticks since boot; /proc/uptime: now.
  std::FILE* f = std::fopen("/proc/self/stat", "r");
  std::FILE* u = std::fopen("/proc/uptime", "r");
  double result = -1;
  if (f && u) {
    char buf[1024];
    const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
    buf[n] = 0;
    const char* p = std::strrchr(buf, ')');  // the command name may hold spaces
    unsigned long long start = 0;
    double up = 0;
    int field = 2;
    for (; p && *p && field < 22; ++p)
      if (*p == ' ') ++field;
    if (p && std::sscanf(p, "%llu", &start) == 1 && std::fscanf(u, "%lf", &up) == 1)
      result = up - double(start) / double(sysconf(_SC_CLK_TCK));
  }
  if (f) std::fclose(f);
  if (u) std::fclose(u);
  return result;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR [--max-tokens N] [--temperature T] [--top-k K] [--top-p P] "
                         "[--seed S] [--dtype D] [--max-model-len N] [--dummy] TOKEN_ID...\n", argv[0]);
    return 2;
  }
  flashpage::EngineConfig config;
  config.model = argv[1];
  config.kv_cache_bytes = int64_t(1) << 30;
  config.verbose = true;  // the start-up report: weights mapped or loaded, KV-cache sizing
  flashpage::SamplingOptions sampling;
  sampling.temperature = 0.f;
  std::vector<int32_t> prompt;
  for (int i = 2; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&] { return i + 1 < argc ? argv[++i] : (std::fprintf(stderr, "%s needs a value\n", a.c_str()), std::exit(2), argv[0]); };
    if (a == "--max-tokens") sampling.max_tokens = std::atoi(next());
    else if (a == "--temperature") sampling.temperature = float(std::atof(next()));
    else if (a == "--top-k") sampling.top_k = std::atoi(next());
    else if (a == "--top-p") sampling.top_p = float(std::atof(next()));
    else if (a == "--seed") sampling.seed = std::atoll(next());
    else if (a == "--dtype") config.dtype = next();
    else if (a == "--max-model-len") config.max_model_len = std::atoi(next());
    else if (a == "--dummy") config.load_format = "dummy";
    else prompt.push_back(int32_t(std::atoi(a.c_str())));
  }
  try {
    const auto t0 = std::chrono::steady_clock::now();
    flashpage::Engine engine(config);
    const auto t1 = std::chrono::steady_clock::now();
    engine.add_request(prompt, sampling);
    std::vector<int32_t> out;
    double first_token_since_start = -1;
    std::chrono::steady_clock::time_point t_first;
    const char* reason = "none";
    while (engine.has_unfinished()) {
      for (const flashpage::TokenEvent& e : engine.step()) {
        if (e.token >= 0) {
          if (out.empty()) {
            t_first = std::chrono::steady_clock::now();
            first_token_since_start = seconds_since_process_start();
          }
          out.push_back(e.token);
        }
        if (e.finish != flashpage::FinishReason::kNone) reason = flashpage::finish_reason_name(e.finish);
      }
    }
    const auto t2 = std::chrono::steady_clock::now();
    for (size_t i = 0; i < out.size(); ++i) std::printf(i ? " %d" : "%d", out[i]);
    std::printf("\n");
    using sec = std::chrono::duration<double>;
    const double decode = out.size() > 1 ? double(out.size() - 1) / sec(t2 - t_first).count() : 0;
    std::fprintf(stderr, "finish=%s load=%.3fs first_token_after_load=%.3fs process_start_to_first_token=%.3fs "
                 "decode=%.1f tok/s (%s, %s)\n", reason, sec(t1 - t0).count(), sec(t_first - t1).count(),
                 first_token_since_start, decode, engine.info().dtype.c_str(), engine.info().isa.c_str());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
