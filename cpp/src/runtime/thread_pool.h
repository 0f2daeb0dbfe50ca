// A fixed pool of worker threads for data-parallel kernels. parallel_for hands out [0, n) in
// chunks that threads claim as they go (guided: large first, smaller toward the end), the caller
// taking part too, and returns when all are done. No allocation per call: the task is passed by
// reference, not copied into a std::function.
//
// Behaving on a shared machine: a decode step issues ~150 parallel_for calls a few microseconds
// apart, so idle threads poll for a short while (50 us; 10 us while workers wake late, a sign
// that other work shares their cores) before they sleep on a futex, rather than for
// milliseconds; a thread that another process keeps off its core holds up only the
// chunk it is in, as the others claim the rest; and the caller sleeps rather than polls while
// the last chunks finish, leaving its core to whoever can use it.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>
#include <type_traits>
#include <vector>

namespace flashpage::runtime {

// Threads this process should use: FLASHPAGE_NUM_THREADS if set, else the CPUs in its affinity
// mask, capped by its cgroup's CPU quota (a container given 2 CPUs of a 64-core host gets 2).
int default_num_threads();
// The cgroup CPU quota in CPUs, rounded up (cgroup v2 cpu.max, or v1 cfs quota / period, the
// smallest along the process's cgroup path); 0 when there is none.
int cgroup_cpu_limit();

class ThreadPool {
 public:
  // num_threads <= 0: default_num_threads().
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(begin, end) for disjoint ranges covering [0, n); every range holds whole groups of
  // `grain` items (begin a multiple of grain; only the last range may end short). Which thread
  // runs which range varies from call to call.
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
  void rest() { resting_.store(true, std::memory_order_relaxed); }

  // The process-wide pool.
  static ThreadPool& global();

 private:
  using Invoke = void (*)(void*, int64_t, int64_t);
  void run(int64_t n, int64_t grain, Invoke invoke, void* ctx);
  void work(uint32_t gen);  // claims and runs chunks of job `gen` until none is left
  void worker();
  // Polls `done` for a while (shorter while contended): true if it came true.
  template <class Done>
  bool poll(Done&& done);
  bool contended(int64_t now_ns) const;
  void mark_contended(int64_t now_ns);

  std::vector<std::thread> workers_;
  // The current job. Its fields are written while claim_ is locked for its generation, then
  // claim_ and generation_ name it; a thread reads them only after seeing a claim word of its
  // job, and claims by CAS on that word, so fields of another job never serve a claim.
  std::atomic<Invoke> invoke_{nullptr};
  std::atomic<void*> ctx_{nullptr};
  std::atomic<int64_t> n_{0}, grain_{1};
  std::atomic<int> parts_{1};
  alignas(64) std::atomic<uint32_t> generation_{0};  // a new job (or stop) bumps it; workers wait on it
  alignas(64) std::atomic<uint64_t> claim_{0};       // generation << 32 | the first unclaimed item
  alignas(64) std::atomic<int> busy_{0};             // threads claiming or running a chunk
  std::atomic<bool> caller_waiting_{false};
  // Steady-clock ns: when the current job was published, and until when the pool's threads
  // count as contended (kept off their CPUs by other work: they then poll for less).
  std::atomic<int64_t> published_ns_{0};
  std::atomic<int64_t> contended_until_ns_{0};
  std::atomic<bool> resting_{false};
  std::atomic<bool> stop_{false};
};

}  // namespace flashpage::runtime
