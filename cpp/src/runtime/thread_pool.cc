#include "runtime/thread_pool.h"

#include <sched.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

namespace flashpage::runtime {
namespace {

using Clock = std::chrono::steady_clock;

// How long an idle thread polls before it sleeps: long enough to catch the next kernel of a step
// (they follow each other within microseconds), short enough that a process sharing the core
// loses little. No sched_yield while polling: under EEVDF each yield pushes the thread's
// deadline back, and a worker that yields while it waits ends up starved beside a busy process
// (measured: it got ~10 % of the shared core and did a tenth of the work).
constexpr auto kPollFor = std::chrono::microseconds(50);
// While the pool's threads are being kept off their CPUs, they poll for less: a thread that
// sleeps often keeps its EEVDF lag and, woken, preempts the CPU-bound neighbour; one that polls
// through its slice is preempted mid-chunk and the step waits out the neighbour's whole slice.
// `bench.shared_core`: busy / quiet 0.55-0.58 with 50 us, 0.61-0.75 with 10 us always; but
// 10 us on a quiet machine cost batch-16 decode 6 % and batch-1 decode through Python 0-15 %
// (workers asleep between a step's regions), hence only while contended: 0.58-0.63.
constexpr auto kPollContended = std::chrono::microseconds(10);
// The sign of contention: a sleeping worker woken this long after its job was published. On a
// quiet 2-core VM, in ~260 steps of batch-16 decode, three wakes took 0.3-1 ms and none longer;
// beside a busy process ~30 a second took 1-10 ms. (Gaps in a polling thread's clock readings
// were no sign: the quiet VM had dozens of 40-100 us.)
constexpr auto kLateWake = std::chrono::milliseconds(1);
// How long one late wake keeps the short polls.
constexpr auto kContendedFor = std::chrono::milliseconds(500);

template <class Duration>
constexpr int64_t ns(Duration d) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
}
int64_t now_ns() { return ns(Clock::now().time_since_epoch()); }

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

// The quota (CPUs, rounded up) in a cgroup v2 cpu.max ("max 100000" or "150000 100000") or 0.
int quota_v2(const std::string& path) {
  std::ifstream f(path);
  std::string quota;
  double period = 0;
  if (!(f >> quota >> period) || quota == "max" || period <= 0) return 0;
  return std::max(1, int(std::ceil(std::stod(quota) / period)));
}

int quota_v1(const std::string& dir) {
  std::ifstream q(dir + "/cpu.cfs_quota_us"), p(dir + "/cpu.cfs_period_us");
  double quota = -1, period = 0;
  if (!(q >> quota) || !(p >> period) || quota <= 0 || period <= 0) return 0;
  return std::max(1, int(std::ceil(quota / period)));
}

uint32_t gen_of(uint64_t claim) { return uint32_t(claim >> 32); }
int64_t next_of(uint64_t claim) { return int64_t(claim & 0xFFFFFFFFu); }
uint64_t make_claim(uint32_t gen, int64_t next) { return (uint64_t(gen) << 32) | uint64_t(next); }
constexpr int64_t kLocked = 0xFFFFFFFF;  // "next" while a job's fields are being written: beyond any n

}  // namespace

int cgroup_cpu_limit() {
  // /proc/self/cgroup: "0::/path" (v2) or "N:cpu,cpuacct:/path" (v1). The limit that binds is
  // the smallest along the path, so walk up to the root.
  std::ifstream f("/proc/self/cgroup");
  std::string line;
  int limit = 0;
  auto take = [&](int q) {
    if (q > 0) limit = limit == 0 ? q : std::min(limit, q);
  };
  while (std::getline(f, line)) {
    const size_t a = line.find(':'), b = line.find(':', a + 1);
    if (a == std::string::npos || b == std::string::npos) continue;
    const std::string controllers = line.substr(a + 1, b - a - 1);
    std::string path = line.substr(b + 1);
    const bool v2 = controllers.empty();
    if (!v2 && controllers.find("cpu") == std::string::npos) continue;
    for (;;) {
      if (v2) take(quota_v2("/sys/fs/cgroup" + path + "/cpu.max"));
      else take(quota_v1("/sys/fs/cgroup/cpu,cpuacct" + path)), take(quota_v1("/sys/fs/cgroup/cpu" + path));
      if (path.empty() || path == "/") break;
      path = path.substr(0, path.rfind('/'));
    }
  }
  return limit;
}

int default_num_threads() {
  if (const char* env = std::getenv("FLASHPAGE_NUM_THREADS"); env && *env) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  int n = int(std::max(1u, std::thread::hardware_concurrency()));
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) n = std::max(1, CPU_COUNT(&set));
  if (const int quota = cgroup_cpu_limit(); quota > 0) n = std::min(n, quota);
  return n;
}

ThreadPool::ThreadPool(int num_threads) {
  const int n = num_threads > 0 ? num_threads : default_num_threads();
  for (int i = 1; i < n; ++i) workers_.emplace_back([this] { worker(); });
}

ThreadPool::~ThreadPool() {
  stop_.store(true);
  generation_.fetch_add(1);
  generation_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool;
  return pool;
}

void ThreadPool::run(int64_t n, int64_t grain, Invoke invoke, void* ctx) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  const int parts = static_cast<int>(std::min<int64_t>(num_threads(), std::max<int64_t>(1, n / grain)));
  if (parts == 1 || n >= (int64_t(1) << 32)) {
    invoke(ctx, 0, n);
    return;
  }
  // Publish the job. The claim word is locked first: a worker still in the previous job (its
  // items all claimed, but it may be about to read the fields) cannot claim anything while the
  // fields change; then the fields; then the claim word and the generation that name the job.
  const uint32_t gen = generation_.load(std::memory_order_relaxed) + 1;
  claim_.store(make_claim(gen, kLocked));
  invoke_.store(invoke);
  ctx_.store(ctx);
  n_.store(n);
  grain_.store(grain);
  parts_.store(parts);
  claim_.store(make_claim(gen, 0));
  resting_.store(false, std::memory_order_relaxed);
  published_ns_.store(now_ns(), std::memory_order_relaxed);
  generation_.store(gen, std::memory_order_release);
  generation_.notify_all();
  work(gen);
  // Every item is claimed; wait for the chunks still running elsewhere.
  if (poll([&] { return busy_.load(std::memory_order_acquire) == 0; })) return;
  caller_waiting_.store(true);
  for (int b; (b = busy_.load()) != 0;) busy_.wait(b);
  caller_waiting_.store(false);
}

void ThreadPool::work(uint32_t gen) {
  for (;;) {
    // Counted as busy before claiming, so that the caller never sees "nothing running" while a
    // claim is about to succeed. The job's fields are read after a claim word of this job was
    // seen, and any claim is a CAS on that word: fields of a newer job (written while the word
    // was locked) can never be used to claim in this one.
    busy_.fetch_add(1);
    uint64_t c = claim_.load();
    bool claimed = false;
    int64_t begin = 0, end = 0;
    Invoke invoke = nullptr;
    void* ctx = nullptr;
    if (gen_of(c) == gen) {
      invoke = invoke_.load();
      ctx = ctx_.load();
      const int64_t n = n_.load(), grain = grain_.load();
      const int parts = parts_.load();
      for (;;) {
        begin = next_of(c);
        if (gen_of(c) != gen || begin >= n) break;  // another job, nothing left, or locked
        // Guided: a share of what is left, so early chunks are large and late ones small.
        // Whole multiples of the grain, so that a kernel working in groups of `grain` items
        // is never handed a part-group in the middle of the range.
        end = std::min(n, begin + (std::max(grain, (n - begin) / (2 * parts)) + grain - 1) / grain * grain);
        if (claim_.compare_exchange_weak(c, make_claim(gen, end))) {
          claimed = true;
          break;
        }
      }
    }
    if (claimed) invoke(ctx, begin, end);
    if (busy_.fetch_sub(1) == 1 && caller_waiting_.load()) busy_.notify_all();
    if (!claimed) return;
  }
}

void ThreadPool::worker() {
  uint32_t seen = 0;
  for (;;) {
    auto fresh = [&] { return generation_.load(std::memory_order_acquire) != seen; };
    bool slept = false;
    if (resting_.load(std::memory_order_relaxed) || !poll([&] { return fresh() || resting_.load(std::memory_order_relaxed); }))
      for (; !fresh(); slept = true) generation_.wait(seen);
    if (!fresh()) continue;  // woke to rest
    if (stop_.load()) return;
    seen = generation_.load(std::memory_order_acquire);
    if (slept) {
      const int64_t now = now_ns();
      if (now - published_ns_.load(std::memory_order_relaxed) > ns(kLateWake)) mark_contended(now);
    }
    work(seen);
  }
}

bool ThreadPool::contended(int64_t now) const {
  return now < contended_until_ns_.load(std::memory_order_relaxed);
}

void ThreadPool::mark_contended(int64_t now) {
  contended_until_ns_.store(now + ns(kContendedFor), std::memory_order_relaxed);
}

template <class Done>
bool ThreadPool::poll(Done&& done) {
  const auto start = Clock::now();
  const auto limit = contended(ns(start.time_since_epoch())) ? kPollContended : kPollFor;
  for (int i = 1;; ++i) {
    if (done()) return true;
    if (i % 64 == 0 && Clock::now() - start > limit) return false;
    cpu_relax();
  }
}

}  // namespace flashpage::runtime
