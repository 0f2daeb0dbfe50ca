// A fixed pool of worker threads for data-parallel kernels. parallel_for splits [0, n) into
// one contiguous range per thread (the caller runs one of them) and returns when all are done.
// No allocation per call: the task is passed by reference, not copied into a std::function.
// A decode step issues ~100 parallel_for calls a few microseconds apart, and waking a sleeping
// thread costs tens of microseconds on a VM, so workers (and the waiting caller) spin for a
// short while before they sleep on a condition variable.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

namespace flashpage::runtime {

class ThreadPool {
 public:
  // num_threads <= 0: FLASHPAGE_NUM_THREADS, else the CPUs this process may run on.
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(begin, end) for disjoint ranges covering [0, n); ranges have at least `grain` items.
  // Not reentrant: call it from one thread at a time, never from inside fn.
  template <class Fn>
  void parallel_for(int64_t n, Fn&& fn, int64_t grain = 1) {
    using F = std::remove_reference_t<Fn>;
    auto call = [](void* ctx, int64_t b, int64_t e) { (*static_cast<F*>(ctx))(b, e); };
    run(n, grain, call, const_cast<void*>(static_cast<const void*>(&fn)));
  }

  // Workers stop polling and sleep until the next parallel_for: call it when the pool goes
  // unused for a while (after a model step, while Python samples with torch's own threads,
  // which polling workers would slow down).
  void rest() { resting_ = true; }

  // The process-wide pool.
  static ThreadPool& global();

 private:
  using Invoke = void (*)(void*, int64_t, int64_t);
  void run(int64_t n, int64_t grain, Invoke invoke, void* ctx);
  void worker(int index);

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_cv_, done_cv_;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<int> sleepers_{0};        // workers waiting on start_cv_
  std::atomic<bool> caller_waiting_{false};
  std::atomic<bool> resting_{false};
  std::atomic<bool> stop_{false};
  // The current job.
  Invoke invoke_ = nullptr;
  void* ctx_ = nullptr;
  int64_t n_ = 0, chunk_ = 0;
};

}  // namespace flashpage::runtime
