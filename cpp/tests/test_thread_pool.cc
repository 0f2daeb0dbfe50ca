// The thread pool: every item of every job runs exactly once, whatever the sizes, grains and
// thread counts, jobs following each other as fast as a model step issues them; and the thread
// count respects the affinity mask and the cgroup quota.
#include <sched.h>

#include <atomic>
#include <random>
#include <thread>
#include <vector>

#include "runtime/thread_pool.h"
#include "test_util.h"

using namespace flashpage;

TEST(thread_pool_covers_every_index_once) {
  for (int threads : {1, 2, 3, 8}) {
    runtime::ThreadPool pool(threads);
    CHECK_EQ(pool.num_threads(), threads);
    for (int64_t n : {0, 1, 5, 7, 1000}) {
      for (int round = 0; round < 20; ++round) {
        std::vector<std::atomic<int>> hits(n);
        pool.parallel_for(n, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) hits[i].fetch_add(1);
        });
        for (int64_t i = 0; i < n; ++i) CHECK_EQ(hits[i].load(), 1);
      }
    }
  }
}

TEST(thread_pool_runs_every_item_once) {
  std::mt19937 rng(3);
  for (int threads : {1, 2, 3, 5}) {
    runtime::ThreadPool pool(threads);
    CHECK_EQ(pool.num_threads(), threads);
    std::vector<std::atomic<int>> hits(5000);
    for (int job = 0; job < 2000; ++job) {
      const int64_t n = int64_t(rng() % 5000), grain = 1 + int64_t(rng() % 40);
      for (int64_t i = 0; i < n; ++i) hits[size_t(i)] = 0;
      std::atomic<int64_t> short_ranges{0}, split_groups{0};
      pool.parallel_for(n, [&](int64_t b, int64_t e) {
        short_ranges += (e - b < grain && e != n);  // only the last range may be short
        split_groups += (b % grain != 0);           // ranges hold whole groups of `grain`
        for (int64_t i = b; i < e; ++i) hits[size_t(i)]++;
      }, grain);
      int64_t wrong = 0;
      for (int64_t i = 0; i < n; ++i) wrong += hits[size_t(i)] != 1;
      CHECK_EQ(wrong, 0);
      CHECK_EQ(short_ranges.load(), 0);
      CHECK_EQ(split_groups.load(), 0);
      if (job % 500 == 0) pool.rest();  // workers asleep: the next job must wake them
    }
  }
}

TEST(thread_pool_respects_affinity_and_quota) {
  cpu_set_t set;
  REQUIRE(sched_getaffinity(0, sizeof set, &set) == 0);
  const int allowed = CPU_COUNT(&set);
  const int quota = runtime::cgroup_cpu_limit();
  CHECK(quota >= 0);
  const int want = quota > 0 ? std::min(allowed, quota) : allowed;
  if (std::getenv("FLASHPAGE_NUM_THREADS") == nullptr) CHECK_EQ(runtime::default_num_threads(), want);
}
