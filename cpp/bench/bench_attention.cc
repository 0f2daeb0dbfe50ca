// Times the CPU paged-attention kernel on decode rows (one query position per sequence, every
// head of its GQA group), with K and V coming from memory as in a served step of many sequences:
// successive calls read successive copies of the cache, together larger than any cache. Prints
// the K + V bytes read per second, beside one thread plainly reading the same copies.
// Usage: bench_attention [--isa LEVEL] [--seqs 64] [--ctx 320] [--kv-heads 3] [--group 3]
//                        [--head-dim 64] [--block-size 16] [--shuffle] [--pool] [--warm] [--prefill] [--reps 15]
//   --shuffle: each sequence's blocks scattered over the cache (a long-running server's tables)
//   --pool:    sequences split over ThreadPool::global() as the CPU backend does (else one thread)
//   --warm:    one cache of just the sequences' blocks, read again and again (what the kernel's
//              arithmetic alone reaches, with K and V in the core's caches)
//   --prefill: every sequence's whole context is its prompt (ctx query positions, causal; implies
//              --warm); prints the attention FLOP/s (4 x head_dim per query head and key seen)
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cpu/kernels.h"
#include "runtime/cpu_features.h"
#include "runtime/host_buffer.h"
#include "runtime/thread_pool.h"

using namespace flashpage;
using Clock = std::chrono::steady_clock;

namespace {

// K + V copies, together beyond the caches (this VM's L3 is 480 MB: 512 MB of copies read at
// 17-18 GB/s on one thread, against 11 from memory).
constexpr int64_t kColdBytes = int64_t(2) << 30;

template <class Fn>
double median_seconds(Fn&& fn, int reps) {
  fn();  // warm-up
  std::vector<double> samples;
  for (int r = 0; r < reps; ++r) {
    const auto t = Clock::now();
    fn();
    samples.push_back(std::chrono::duration<double>(Clock::now() - t).count());
  }
  std::sort(samples.begin(), samples.end());
  return samples[samples.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  runtime::Isa isa = runtime::active_isa();
  int64_t seqs = 64, ctx = 320, nkv = 3, group = 3, D = 64, bs = 16;
  int reps = 15;
  bool shuffle = false, use_pool = false, warm = false, prefill = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&] { return std::atoll(argv[++i]); };
    if (a == "--isa" && i + 1 < argc) isa = runtime::parse_isa(argv[++i]);
    else if (a == "--seqs" && i + 1 < argc) seqs = std::max<int64_t>(1, value());
    else if (a == "--ctx" && i + 1 < argc) ctx = std::max<int64_t>(1, value());
    else if (a == "--kv-heads" && i + 1 < argc) nkv = std::max<int64_t>(1, value());
    else if (a == "--group" && i + 1 < argc) group = std::max<int64_t>(1, value());
    else if (a == "--head-dim" && i + 1 < argc) D = std::max<int64_t>(16, value());
    else if (a == "--block-size" && i + 1 < argc) bs = std::max<int64_t>(1, value());
    else if (a == "--reps" && i + 1 < argc) reps = std::max(1, int(value()));
    else if (a == "--shuffle") shuffle = true;
    else if (a == "--pool") use_pool = true;
    else if (a == "--warm") warm = true;
    else if (a == "--prefill") prefill = warm = true;
    else {
      std::fprintf(stderr,
                   "usage: bench_attention [--isa LEVEL] [--seqs 64] [--ctx 320] [--kv-heads 3] [--group 3] "
                   "[--head-dim 64] [--block-size 16] [--shuffle] [--pool] [--warm] [--prefill] [--reps 15]\n");
      return 2;
    }
  }
  const cpu::KernelTable& table = cpu::kernels_for(isa);
  runtime::ThreadPool& pool = runtime::ThreadPool::global();
  const int64_t nq = nkv * group, per_seq = (ctx + bs - 1) / bs;
  // A pool of blocks, as a server's.
  const int64_t blocks = warm ? seqs * per_seq : std::max(seqs * per_seq, int64_t(1) << 14);
  const int64_t cache_bytes = blocks * nkv * bs * D * 2;  // bf16
  const int64_t copies = warm ? 1 : std::max<int64_t>(2, kColdBytes / (2 * cache_bytes));
  std::vector<runtime::HostBuffer> k, v;
  std::mt19937 rng(1);
  for (int64_t c = 0; c < copies; ++c) {
    for (auto* list : {&k, &v}) {
      list->emplace_back(static_cast<size_t>(cache_bytes));
      auto* p = static_cast<uint16_t*>(list->back().data());
      if (c > 0) {
        std::memcpy(p, (*list)[0].data(), size_t(cache_bytes));
        continue;
      }
      for (int64_t i = 0; i < cache_bytes / 2; ++i) p[i] = uint16_t(0x3c00 + (rng() & 0xff));  // bf16 near 0.01
    }
  }
  std::vector<int32_t> order(static_cast<size_t>(blocks));
  std::iota(order.begin(), order.end(), 0);
  if (shuffle) std::shuffle(order.begin(), order.end(), rng);
  std::vector<int32_t> tables(static_cast<size_t>(seqs * per_seq)), starts(static_cast<size_t>(seqs + 1));
  std::vector<int32_t> lens(static_cast<size_t>(seqs), static_cast<int32_t>(ctx));
  std::copy_n(order.begin(), tables.size(), tables.begin());
  const int64_t q_len = prefill ? ctx : 1;
  for (int64_t i = 0; i <= seqs; ++i) starts[size_t(i)] = static_cast<int32_t>(i * q_len);
  std::vector<float> q(static_cast<size_t>(seqs * q_len * nq * D)), out(q.size());
  for (float& x : q) x = float(int(rng() % 2001) - 1000) * 1e-3f;
  cpu::PagedAttentionArgs args{out.data(), q.data(), nullptr, nullptr, true, tables.data(), per_seq,
                               starts.data(), lens.data(), nq, nkv, D, bs, 1.f / std::sqrt(float(D))};
  size_t next = 0;
  const double sec = median_seconds(
      [&] {
        args.k_cache = k[next % k.size()].data();
        args.v_cache = v[next % v.size()].data();
        ++next;
        if (!use_pool) return table.paged_attention(args, 0, seqs);
        pool.parallel_for(seqs, [&](int64_t b, int64_t e) { table.paged_attention(args, b, e); });
      },
      reps);
  // One thread reading the copies plainly: what a core's loads alone reach (the pool's workers
  // asleep, not polling beside it).
  pool.rest();
  std::vector<uint64_t> sink(8);
  const double plain = median_seconds(
      [&] {
        const runtime::HostBuffer& buf = (next % 2 ? v : k)[next / 2 % k.size()];  // all the copies in turn
        ++next;
        const auto* bytes = static_cast<const unsigned char*>(buf.data());
        uint64_t acc[8] = {};
        for (int64_t i = 0; i + 64 <= cache_bytes; i += 64)
          for (int j = 0; j < 8; ++j) {
            uint64_t w;
            std::memcpy(&w, bytes + i + 8 * j, 8);
            acc[j] ^= w;
          }
        for (int j = 0; j < 8; ++j) sink[size_t(j)] ^= acc[j];
      },
      reps);
  if (prefill) {
    const double flops = 4.0 * double(D) * double(nq) * double(seqs) * double(ctx) * double(ctx + 1) / 2;
    std::printf("isa %s, %s, %lld prompts of %lld positions, %lld KV heads (group %lld, head_dim %lld)\n",
                runtime::isa_name(isa), use_pool ? "the pool's threads" : "one thread", (long long)seqs,
                (long long)ctx, (long long)nkv, (long long)group, (long long)D);
    std::printf("prefill attention: %.3f ms, %.1f GFLOP/s\n", sec * 1e3, flops / sec / 1e9);
    return 0;
  }
  const double kv_bytes = double(seqs) * double(ctx) * double(nkv) * double(D) * 2 * 2;
  std::printf("isa %s, %s, %lld sequences x %lld positions, %lld KV heads (group %lld, head_dim %lld, block %lld)%s%s\n",
              runtime::isa_name(isa), use_pool ? "the pool's threads" : "one thread", (long long)seqs,
              (long long)ctx, (long long)nkv, (long long)group, (long long)D, (long long)bs,
              shuffle ? ", blocks shuffled" : "", warm ? ", warm" : "");
  std::printf("decode attention: %.3f ms, %.1f GB/s of K+V (one thread reading plainly: %.1f GB/s)%s\n", sec * 1e3,
              kv_bytes / sec / 1e9, double(cache_bytes) / plain / 1e9, sink[0] == 42 ? " " : "");
  return 0;
}
