#include "runtime/thread_pool.h"

#include <sched.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>

namespace flashpage::runtime {
namespace {

int default_threads() {
  if (const char* env = std::getenv("FLASHPAGE_NUM_THREADS"); env && *env) {
    const int n = std::atoi(env);
    if (n > 0) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
  return std::max(1u, std::thread::hardware_concurrency());
}

// About a millisecond of polling: longer than the gaps between the kernels of one step, shorter
// than anything worth keeping a core busy for.
constexpr int kSpins = 20000;

inline void cpu_relax() {
#if defined(__x86_64__)
  _mm_pause();
#endif
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  const int n = num_threads > 0 ? num_threads : default_threads();
  for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { worker(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    ++generation_;
  }
  start_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::global() {
  static ThreadPool pool;
  return pool;
}

void ThreadPool::run(int64_t n, int64_t grain, Invoke invoke, void* ctx) {
  if (n <= 0) return;
  const int64_t max_parts = std::max<int64_t>(1, n / std::max<int64_t>(grain, 1));
  const int parts = static_cast<int>(std::min<int64_t>(num_threads(), max_parts));
  if (parts == 1) {
    invoke(ctx, 0, n);
    return;
  }
  const int64_t chunk = (n + parts - 1) / parts;
  {
    // Under the lock, so that a worker about to sleep either sees the new generation or is
    // counted in sleepers_ (and notified).
    std::lock_guard<std::mutex> lock(mu_);
    invoke_ = invoke;
    ctx_ = ctx;
    n_ = n;
    chunk_ = chunk;
    pending_ = static_cast<int>(workers_.size());
    resting_ = false;
    ++generation_;
  }
  if (sleepers_ > 0) start_cv_.notify_all();
  invoke(ctx, 0, std::min(n, chunk));  // the caller takes part 0
  for (int i = 0; i < kSpins && pending_ != 0; ++i) cpu_relax();
  if (pending_ == 0) return;
  std::unique_lock<std::mutex> lock(mu_);
  caller_waiting_ = true;
  done_cv_.wait(lock, [this] { return pending_ == 0; });
  caller_waiting_ = false;
}

void ThreadPool::worker(int index) {
  uint64_t seen = 0;
  while (true) {
    for (int i = 0; i < kSpins && generation_ == seen && !resting_; ++i) cpu_relax();
    Invoke invoke;
    void* ctx;
    int64_t begin, end;
    {
      std::unique_lock<std::mutex> lock(mu_);
      if (generation_ == seen) {
        ++sleepers_;
        start_cv_.wait(lock, [&] { return generation_ != seen; });
        --sleepers_;
      }
      if (stop_) return;
      seen = generation_;
      invoke = invoke_;
      ctx = ctx_;
      begin = std::min(n_, index * chunk_);
      end = std::min(n_, begin + chunk_);
    }
    if (begin < end) invoke(ctx, begin, end);
    if (pending_.fetch_sub(1) == 1 && caller_waiting_) {
      std::lock_guard<std::mutex> lock(mu_);
      done_cv_.notify_one();
    }
  }
}

}  // namespace flashpage::runtime
