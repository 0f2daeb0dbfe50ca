// Times one scheduler step (schedule + update) with N running decodes (prompts of --prompt
// tokens plus up to a block more), and the block pool's
// allocation throughput. Usage: bench_scheduler [--seqs 256,1024,4096] [--steps 200]
//                                              [--prompt 128] [--repeats 5] [--json]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <sstream>
#include <string>
#include <vector>

#include "flashpage/block_manager.h"
#include "flashpage/scheduler.h"

using namespace flashpage;
using Clock = std::chrono::steady_clock;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

struct StepResult {
  int seqs;
  double us_per_step;  // median over repeats
  double us_min;
  double us_schedule;  // of which schedule() (the rest is update())
};

StepResult bench_steps(int seqs, int prompt_len, int steps, int repeats) {
  std::vector<double> samples, sched_samples;
  for (int rep = 0; rep < repeats; ++rep) {
    SchedulerConfig cfg;
    cfg.max_num_seqs = seqs;
    cfg.max_num_batched_tokens = std::max(seqs, 8192);
    // Room for the decodes during the prefill steps too: nobody may finish before the end.
    const int prefill_steps = static_cast<int>((int64_t(seqs) * prompt_len) / cfg.max_num_batched_tokens) + 1;
    cfg.cache.block_size = 16;
    cfg.max_model_len = prompt_len + cfg.cache.block_size + steps + prefill_steps + 64;
    cfg.cache.num_blocks = seqs * ((cfg.max_model_len + 15) / 16 + 1);
    Scheduler s(cfg);
    for (int i = 0; i < seqs; ++i) {
      RequestSpec r;
      r.request_id = i;
      // Lengths staggered over a block, so block boundaries spread over the steps as they
      // do in real traffic.
      r.prompt.resize(prompt_len + i % cfg.cache.block_size);
      for (size_t t = 0; t < r.prompt.size(); ++t) r.prompt[t] = (i * 7919 + int(t) * 31) % 32000;
      r.stop.max_tokens = cfg.max_model_len - static_cast<int>(r.prompt.size());
      s.add_request(std::move(r));
    }
    std::vector<int32_t> sampled;
    // Prefill everything, so the timed steps are pure decodes.
    int guard = 0;
    while (true) {
      auto out = s.schedule();
      if (out->num_seqs() == 0) {
        std::fprintf(stderr, "bench_scheduler: nothing scheduled during prefill\n");
        std::exit(1);
      }
      sampled.assign(out->num_seqs(), 1);
      s.update(sampled);
      if (out->num_prefill_tokens == 0 && out->num_seqs() == seqs) break;
      if (++guard > 100000) {
        std::fprintf(stderr, "prefill did not converge\n");
        std::exit(1);
      }
    }
    int32_t tok = 0;
    double sched_us = 0;
    const auto t0 = Clock::now();
    for (int k = 0; k < steps; ++k) {
      const auto ts = Clock::now();
      auto out = s.schedule();
      sched_us += std::chrono::duration<double, std::micro>(Clock::now() - ts).count();
      sampled.resize(out->num_seqs());
      for (auto& x : sampled) x = (tok++ % 31999) + 1;
      s.update(sampled);
    }
    const double us = std::chrono::duration<double, std::micro>(Clock::now() - t0).count();
    samples.push_back(us / steps);
    sched_samples.push_back(sched_us / steps);
  }
  return {seqs, median(samples), *std::min_element(samples.begin(), samples.end()),
          median(sched_samples)};
}

// Allocate-and-free cycles of 64-block tables (no prefix caching): blocks per second.
double bench_alloc(int repeats) {
  constexpr int kBlocks = 65536, kPerTable = 64, kTables = kBlocks / kPerTable;
  std::vector<double> samples;
  for (int rep = 0; rep < repeats; ++rep) {
    BlockManager bm(BlockManagerConfig{kBlocks, 16, false});
    std::vector<BlockTable> tables(kTables);
    const int rounds = 20;
    const auto t0 = Clock::now();
    for (int r = 0; r < rounds; ++r) {
      for (auto& t : tables)
        if (!bm.allocate_slots(t, 0, kPerTable * 16)) std::abort();
      for (auto& t : tables) bm.free(t);
    }
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    samples.push_back(double(rounds) * kBlocks / s);
  }
  return median(samples);
}

// Prefix-cache admission: 256-token prompts sharing a 192-token prefix, hashed and reused.
double bench_prefix(int repeats) {
  constexpr int kBlocks = 65536, kPrompt = 256, kShared = 192, kSeqs = 2048;
  std::vector<double> samples;
  std::vector<int32_t> tokens(kPrompt);
  for (int rep = 0; rep < repeats; ++rep) {
    BlockManager bm(BlockManagerConfig{kBlocks, 16, true});
    std::vector<BlockTable> tables(kSeqs);
    const auto t0 = Clock::now();
    for (int i = 0; i < kSeqs; ++i) {
      for (int t = 0; t < kPrompt; ++t) tokens[t] = t < kShared ? t : i * kPrompt + t;
      const int hit = bm.allocate_prefix(tables[i], tokens);
      if (!bm.allocate_slots(tables[i], hit, kPrompt - hit)) std::abort();
      bm.cache_blocks(tables[i], tokens, kPrompt);
    }
    for (auto& t : tables) bm.free(t);
    const double s = std::chrono::duration<double>(Clock::now() - t0).count();
    samples.push_back(kSeqs / s);
  }
  return median(samples);
}

std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::atoi(item.c_str()));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> seqs = {256, 1024, 4096};
  int steps = 200, prompt = 128, repeats = 5;
  bool json = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> const char* {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "%s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--seqs") seqs = parse_list(next());
    else if (a == "--steps") steps = std::atoi(next());
    else if (a == "--prompt") prompt = std::atoi(next());
    else if (a == "--repeats") repeats = std::atoi(next());
    else if (a == "--json") json = true;
    else {
      std::fprintf(stderr, "usage: bench_scheduler [--seqs 256,1024,4096] [--steps N] "
                           "[--prompt N] [--repeats N] [--json]\n");
      return 2;
    }
  }
  if (steps <= 0 || prompt <= 0 || repeats <= 0 || seqs.empty()) {
    std::fprintf(stderr, "bench_scheduler: --steps, --prompt, --repeats must be positive\n");
    return 2;
  }
  std::vector<StepResult> results;
  for (int n : seqs) results.push_back(bench_steps(n, prompt, steps, repeats));
  const double alloc = bench_alloc(repeats);
  const double prefix = bench_prefix(repeats);
  if (json) {
    std::printf("{\"steps\": [");
    for (size_t i = 0; i < results.size(); ++i)
      std::printf("%s{\"seqs\": %d, \"us_per_step\": %.2f, \"us_min\": %.2f, \"us_schedule\": %.2f}",
                  i ? ", " : "", results[i].seqs, results[i].us_per_step, results[i].us_min,
                  results[i].us_schedule);
    std::printf("], \"alloc_blocks_per_s\": %.0f, \"prefix_admissions_per_s\": %.0f}\n", alloc, prefix);
    return 0;
  }
  std::printf("schedule+update, all running sequences decoding (prompt %d, median of %d runs of %d steps)\n",
              prompt, repeats, steps);
  std::printf("%10s %14s %14s %16s %14s\n", "running", "us/step", "min us/step", "ns/sequence",
              "of which sched");
  for (const auto& r : results)
    std::printf("%10d %14.1f %14.1f %16.1f %14.1f\n", r.seqs, r.us_per_step, r.us_min,
                1000.0 * r.us_per_step / r.seqs, r.us_schedule);
  std::printf("block allocation (allocate+free, 64-block tables): %.1f M blocks/s\n", alloc / 1e6);
  std::printf("prefix-cache admission (256-token prompts, 192 shared): %.0f k requests/s\n",
              prefix / 1e3);
  return 0;
}
