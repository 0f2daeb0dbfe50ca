// Times the CPU Linear kernel (y = x . W^T) the way the executor calls it: weights packed at
// "load", the panels split across ThreadPool::global(), weights not in cache. Prints GFLOP/s
// and, at M = 1, the weight bytes read per second next to the machine's plain read bandwidth.
// Usage: bench_linear [--isa avx2|avx512|...] [--reps 7] [--m 1,128,512] [--quick] [--shapes NxK,...]
//                     [--formats bf16,fp32,q8,q4,q5]   (q8/q4/q5: the int8 Linear's GGUF-style weights)
//                     [--warm]   (one copy of the bf16/fp32 weights, cached once they fit: the
//                                 kernel's arithmetic without the weights' stream)
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

// Copies of one weight matrix, together larger than any cache: successive calls use successive
// copies, so the weights come from memory as they do in a model (decode streams them all).
constexpr int64_t kColdBytes = int64_t(256) << 20;
bool g_warm = false;  // --warm: one packed copy

// On 2 MB pages where the OS gives them (HostBuffer), as the engine holds its weights: on 4 KB
// pages one core streams markedly slower, which would understate both the kernels and the plain
// read beside them.
std::vector<runtime::HostBuffer> copies(const void* w, int64_t bytes) {
  std::vector<runtime::HostBuffer> out;
  for (int64_t i = 0, n = std::max<int64_t>(1, kColdBytes / bytes); i < n; ++i) {
    out.emplace_back(size_t(bytes));
    if (w) std::memcpy(out.back().data(), w, size_t(bytes));
  }
  return out;
}

// The same, packed for table t.
std::vector<cpu::PackedLinear> packed_copies(const cpu::KernelTable& t, const void* w, bool bf16, int64_t N, int64_t K) {
  const int64_t n = g_warm ? 1 : std::max<int64_t>(1, kColdBytes / (N * K * (bf16 ? 2 : 4)));
  std::vector<cpu::PackedLinear> out;
  for (int64_t i = 0; i < n; ++i) out.push_back(cpu::pack_linear_weight(t, w, bf16, N, K));
  return out;
}

// GB/s of plainly reading the copies, split over the pool like the kernels: what M = 1 should
// reach (the machine's bandwidth varies with whatever else runs on it).
double read_bandwidth(const std::vector<runtime::HostBuffer>& bufs, int reps) {
  constexpr int64_t kBlock = 4096;  // bytes
  const int64_t blocks = static_cast<int64_t>(bufs[0].size() / kBlock);
  std::vector<uint64_t> sink(64);
  size_t next = 0;
  const double sec = time_call([&] {
    const auto* bytes = reinterpret_cast<const unsigned char*>(bufs[next++ % bufs.size()].data());
    runtime::ThreadPool::global().parallel_for(blocks, [&](int64_t b, int64_t e) {
      uint64_t acc[8] = {};  // XOR of 8-byte words: vectorises, so the loads are the limit
      for (int64_t i = b * kBlock; i < e * kBlock; i += 64)
        for (int j = 0; j < 8; ++j) {
          uint64_t v;
          std::memcpy(&v, bytes + i + 8 * j, 8);
          acc[j] ^= v;
        }
      for (int j = 0; j < 8; ++j) sink[b % 64] ^= acc[j];
    }, 16);
  }, reps);
  return blocks * kBlock / sec / 1e9;
}

// Times the int8 Linear on `bits`-bit weights (8: Q8_0-like; 4/5 with fp16 scales: Q4_0 / Q5_0
// like) as the CPU backend runs it: activations quantized in 16-row tiles once, panels split
// over the pool. Returns seconds per call.
double time_q8(const cpu::KernelTable& t, int bits, const Shape& s, int64_t M, int reps, std::mt19937& rng) {
  const int64_t B = s.K / 32;
  std::vector<int8_t> qs(s.N * s.K);
  std::vector<float> d(s.N * B), mins(s.N * B, 0.f);
  std::uniform_int_distribution<int> q(bits == 8 ? -127 : 0, bits == 8 ? 127 : (1 << bits) - 1);
  for (auto& v : qs) v = int8_t(q(rng));
  for (auto& v : d) v = 1.f / 1024;
  const int64_t bytes = bits == 8 ? t.packed_q8_bytes(s.N, s.K) : t.packed_qbits_bytes(s.N, s.K, bits, true);
  std::vector<runtime::HostBuffer> ws = copies(nullptr, bytes);
  for (auto& w : ws) {
    if (bits == 8) t.pack_q8(w.data(), qs.data(), d.data(), mins.data(), s.N, s.K, 0, s.N);
    else t.pack_qbits(w.data(), qs.data(), d.data(), mins.data(), s.N, s.K, 0, s.N, bits, true);
  }
  std::normal_distribution<float> dist;
  std::vector<float> x(M * s.K), y(M * s.N), xd(M * B), xdu(M * B);
  for (auto& v : x) v = dist(rng);
  std::vector<int8_t> xq((M + 15) / 16 * 16 * s.K), xq2(xq.size());
  std::vector<int32_t> xs(M * B), xs2(M * B);
  cpu::quantize_q8_rows(x.data(), M, s.K, xq.data(), xd.data(), xs.data(), xq2.data(), xs2.data(), xdu.data(), true);
  const cpu::Q8Rows rows{xq.data(), xq2.data(), xd.data(), xs.data(), xs2.data(), xdu.data(), true};
  const int64_t panel = t.q8_panel();
  size_t next = 0;
  return time_call([&] {
    const void* w = ws[next++ % ws.size()].data();
    runtime::ThreadPool::global().parallel_for(cpu::linear_panels(panel, s.N), [&](int64_t p0, int64_t p1) {
      const int64_t n0 = p0 * panel, n1 = std::min(s.N, p1 * panel);
      if (bits == 8) t.q8_linear(y.data(), rows, w, nullptr, M, s.N, s.K, n0, n1);
      else t.qbits_linear(y.data(), rows, w, nullptr, M, s.N, s.K, n0, n1, bits, true);
    }, 1);
  }, reps);
}

}  // namespace

int main(int argc, char** argv) {
  runtime::Isa isa = runtime::active_isa();
  int reps = 7;
  std::vector<int64_t> ms = {1, 128, 512};
  std::vector<Shape> shapes = {{2048, 2048}, {5632, 2048}, {2048, 5632}};
  std::vector<std::string> formats = {"bf16", "fp32"};
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--isa" && i + 1 < argc) isa = runtime::parse_isa(argv[++i]);
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, std::atoi(argv[++i]));
    else if (a == "--m" && i + 1 < argc) ms = parse_list(argv[++i]);
    else if (a == "--quick") shapes.resize(1);
    else if (a == "--warm") g_warm = true;
    else if (a == "--formats" && i + 1 < argc) {
      formats.clear();
      for (std::string f = argv[++i]; !f.empty();) {
        const size_t comma = f.find(',');
        formats.push_back(f.substr(0, comma));
        f = comma == std::string::npos ? "" : f.substr(comma + 1);
      }
    }
    else if (a == "--shapes" && i + 1 < argc) {  // NxK,NxK,...
      shapes.clear();
      for (const char* q = argv[++i]; *q;) {
        char* end;
        const int64_t n = std::strtoll(q, &end, 10);
        const int64_t k = *end == 'x' ? std::strtoll(end + 1, &end, 10) : 0;
        if (n <= 0 || k <= 0) break;
        shapes.push_back({n, k});
        q = *end == ',' ? end + 1 : end;
      }
    }
    else {
      std::fprintf(stderr, "usage: bench_linear [--isa LEVEL] [--reps 7] [--m 1,128,512] [--quick] [--shapes NxK,...] "
                           "[--formats bf16,fp32,q8,q4,q5] [--warm]\n");
      return 2;
    }
  }
  const cpu::KernelTable& table = cpu::kernels_for(isa);
  auto& pool = runtime::ThreadPool::global();
  std::printf("isa %s, %d threads, median of %d\n", runtime::isa_name(isa), pool.num_threads(), reps);
  std::printf("%5s %5s %5s %5s %10s %10s\n", "M", "N", "K", "w", "ms", "GFLOP/s");

  std::mt19937 rng(1);
  std::normal_distribution<float> dist;
  for (const Shape& s : shapes) {
    std::vector<float> w32(s.N * s.K);
    for (auto& v : w32) v = dist(rng) * 0.02f;
    std::vector<uint16_t> w16(w32.size());
    std::transform(w32.begin(), w32.end(), w16.begin(), to_bf16);
    std::printf("reading the fp32 weights from memory: %.1f GB/s\n", read_bandwidth(copies(w32.data(), int64_t(w32.size() * sizeof(float))), reps));
    for (const std::string& f : formats) {
      if (f[0] != 'q') continue;
      const int bits = std::atoi(f.c_str() + 1);
      if (bits != 4 && bits != 5 && bits != 8) {
        std::fprintf(stderr, "bench_linear: unknown format %s\n", f.c_str());
        return 2;
      }
      for (int64_t M : ms) {
        const double sec = time_q8(table, bits, s, M, reps, rng);
        const double wbytes = double(s.N) * s.K * (bits / 8.0 + (bits == 8 ? 8.0 : 4.0) / 32);
        char extra[64] = "";
        if (M == 1) std::snprintf(extra, sizeof extra, "  %.1f GB/s", wbytes / sec / 1e9);
        std::printf("%5lld %5lld %5lld %5s %10.3f %10.1f%s\n", static_cast<long long>(M), static_cast<long long>(s.N),
                    static_cast<long long>(s.K), f.c_str(), sec * 1e3, 2.0 * M * s.N * s.K / sec / 1e9, extra);
        std::fflush(stdout);
      }
    }
    for (bool bf16 : {true, false}) {
      if (std::find(formats.begin(), formats.end(), bf16 ? "bf16" : "fp32") == formats.end()) continue;
      const auto ws = packed_copies(table, bf16 ? static_cast<const void*>(w16.data()) : w32.data(), bf16, s.N, s.K);
      for (int64_t M : ms) {
        std::vector<float> x(M * s.K), y(M * s.N);
        for (auto& v : x) v = dist(rng);
        size_t next = 0;
        runtime::AlignedVector<uint16_t> buf;
        const void* input = cpu::linear_input_for(table, bf16, x.data(), M, s.K, buf);
        const double sec = time_call([&] {
          cpu::run_linear(table, ws[next++ % ws.size()], y.data(), s.N, input, nullptr, M);
        }, reps);
        // Rounding the inputs to bf16 (the bf16 levels do it once per input, for all the Linears
        // that share it), timed apart.
        const double convert = input == x.data() ? 0.0 : time_call([&] {
          cpu::linear_input_for(table, bf16, x.data(), M, s.K, buf);
        }, reps);
        const double gflops = 2.0 * M * s.N * s.K / sec / 1e9;
        char extra[96] = "";
        if (convert > 0) std::snprintf(extra, sizeof extra, "  (+%.3f ms to bf16)", convert * 1e3);
        else if (M == 1) std::snprintf(extra, sizeof extra, "  %.1f GB/s", s.N * s.K * (bf16 ? 2.0 : 4.0) / sec / 1e9);
        std::printf("%5lld %5lld %5lld %5s %10.3f %10.1f%s\n", static_cast<long long>(M), static_cast<long long>(s.N),
                    static_cast<long long>(s.K), bf16 ? "bf16" : "fp32", sec * 1e3, gflops, extra);
        std::fflush(stdout);
      }
    }
  }
  return 0;
}
