// Times the CPU Linear kernels (y = x . W^T) the way the executor calls them: [0, N) split
// across ThreadPool::global() with grain 16. Prints GFLOP/s for both paths (linear, the
// batch-invariant default, and linear_packed) and, at M = 1, the weight bytes read per second.
// Usage: bench_linear [--isa avx2|avx512] [--reps 7] [--m 1,128,512] [--quick]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/cpu_features.h"
#include "runtime/thread_pool.h"

using namespace flashpage;
using Clock = std::chrono::steady_clock;

namespace {

struct Shape {
  int64_t N, K;
};

std::vector<int64_t> parse_list(const char* s) {
  std::vector<int64_t> out;
  for (const char* p = s; *p;) {
    char* end;
    out.push_back(std::strtoll(p, &end, 10));
    p = *end == ',' ? end + 1 : end;
    if (end == p && *p) break;
  }
  return out;
}

uint16_t to_bf16(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return static_cast<uint16_t>((b + 0x7FFF + ((b >> 16) & 1)) >> 16);
}

// Median seconds per call over `reps` timed runs of enough calls to last ~50 ms each.
template <class Fn>
double time_call(Fn&& fn, int reps) {
  fn();  // warm-up: page in the weights, grow the per-thread scratch
  const auto t0 = Clock::now();
  fn();
  const double once = std::chrono::duration<double>(Clock::now() - t0).count();
  const int inner = std::max(1, static_cast<int>(0.05 / std::max(once, 1e-9)));
  std::vector<double> samples;
  for (int r = 0; r < reps; ++r) {
    const auto t = Clock::now();
    for (int i = 0; i < inner; ++i) fn();
    samples.push_back(std::chrono::duration<double>(Clock::now() - t).count() / inner);
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  runtime::Isa isa = runtime::active_isa();
  int reps = 7;
  std::vector<int64_t> ms = {1, 128, 512};
  std::vector<Shape> shapes = {{2048, 2048}, {5632, 2048}, {2048, 5632}};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--isa" && i + 1 < argc) isa = runtime::parse_isa(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--m" && i + 1 < argc) ms = parse_list(argv[++i]);
    else if (a == "--quick") shapes.resize(1);
    else {
      std::fprintf(stderr, "usage: bench_linear [--isa avx2|avx512] [--reps 7] [--m 1,128,512] [--quick]\n");
      return 2;
    }
  }
  const cpu::KernelTable& table = cpu::kernels_for(isa);
  auto& pool = runtime::ThreadPool::global();
  std::printf("isa %s, %d threads, median of %d\n", runtime::isa_name(isa), pool.num_threads(), reps);
  std::printf("%5s %5s %5s %5s  %-14s %10s %10s\n", "M", "N", "K", "w", "path", "ms", "GFLOP/s");

  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  for (const Shape& s : shapes) {
    std::vector<float> w32(s.N * s.K);
    for (auto& v : w32) v = dist(rng) * 0.02f;
    std::vector<uint16_t> w16(w32.size());
    std::transform(w32.begin(), w32.end(), w16.begin(), to_bf16);
    for (int64_t M : ms) {
      std::vector<float> x(M * s.K), y(M * s.N);
      for (auto& v : x) v = dist(rng);
      for (bool bf16 : {true, false}) {
        const void* w = bf16 ? static_cast<const void*>(w16.data()) : w32.data();
        for (bool packed : {false, true}) {
          const auto kernel = packed ? table.linear_packed : table.linear;
          auto part = [&](int64_t n0, int64_t n1) {
            kernel(y.data(), x.data(), w, bf16, nullptr, M, s.N, s.K, n0, n1);
          };
          const double sec = time_call([&] { pool.parallel_for(s.N, part, 16); }, reps);
          const double gflops = 2.0 * M * s.N * s.K / sec / 1e9;
          char extra[64] = "";
          if (M == 1)
            std::snprintf(extra, sizeof extra, "  %.1f GB/s", s.N * s.K * (bf16 ? 2.0 : 4.0) / sec / 1e9);
          std::printf("%5lld %5lld %5lld %5s  %-14s %10.3f %10.1f%s\n", static_cast<long long>(M),
                      static_cast<long long>(s.N), static_cast<long long>(s.K), bf16 ? "bf16" : "fp32",
                      packed ? "linear_packed" : "linear", sec * 1e3, gflops, extra);
          std::fflush(stdout);
        }
      }
    }
  }
  return 0;
}
