// HostBuffer: prefault brings in the pages of any byte range, page-aligned or not (a layer's K or
// V region of the KV cache starts wherever the previous one ended).
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "runtime/host_buffer.h"
#include "test_util.h"

using namespace flashpage;

TEST(host_buffer_prefaults_unaligned_ranges) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  runtime::HostBuffer buf(8 * page + 100);
  CHECK(buf.prefault(0, 0));  // an empty range is always fine
  if (!buf.prefault(7 * page, 8 * page)) {  // aligned: false only where the kernel lacks it
    std::printf("  (MADV_POPULATE_WRITE unsupported by this kernel: skipped)\n");
    return;
  }
  // Bytes [page + 100, 3 * page + 1): pages 1, 2 and 3 are touched, not 0 or 5.
  CHECK(buf.prefault(page + 100, 3 * page + 1));
  std::vector<unsigned char> resident(9);
  REQUIRE(mincore(buf.data(), 9 * page, resident.data()) == 0);
  CHECK_EQ(resident[1] & 1, 1);
  CHECK_EQ(resident[2] & 1, 1);
  CHECK_EQ(resident[3] & 1, 1);
  CHECK_EQ(resident[0] & 1, 0);
  CHECK_EQ(resident[5] & 1, 0);
  // The tail, past the last whole page, and ranges beyond the end are clamped.
  CHECK(buf.prefault(8 * page + 50, 100 * page));
  CHECK(buf.prefault(200 * page, 300 * page));
}

TEST(host_buffer_aligns_large_buffers_to_huge_pages) {
  for (size_t bytes : {runtime::kHugePage, runtime::kHugePage * 3 + 12345}) {
    runtime::HostBuffer buf(bytes);
    CHECK_EQ(reinterpret_cast<uintptr_t>(buf.data()) % runtime::kHugePage, 0u);
    CHECK_EQ(buf.size(), bytes);
    auto* p = buf.as<unsigned char>();
    p[0] = 1;
    p[bytes - 1] = 2;  // the whole size is mapped and writable
    CHECK_EQ(int(p[bytes - 1]), 2);
  }
  runtime::HostBuffer moved(runtime::HostBuffer(5 * runtime::kHugePage));
  CHECK(moved.data() != nullptr);
}

TEST(host_arena_carves_aligned_pieces_that_outlive_it) {
  std::shared_ptr<void> a, b, big;
  {
    runtime::HostArena arena(runtime::kHugePage);
    a = arena.take(100);
    b = arena.take(4000);
    big = arena.take(3 * runtime::kHugePage + 1);  // larger than a chunk: a mapping of its own
    auto* pa = static_cast<unsigned char*>(a.get());
    auto* pb = static_cast<unsigned char*>(b.get());
    CHECK_EQ(reinterpret_cast<uintptr_t>(pa) % 64, 0u);
    CHECK_EQ(reinterpret_cast<uintptr_t>(pb) % 64, 0u);
    CHECK(pb >= pa + 100);  // one after another in the same chunk, not overlapping
    CHECK(pb < pa + runtime::kHugePage);
    CHECK_EQ(reinterpret_cast<uintptr_t>(big.get()) % runtime::kHugePage, 0u);
    for (int i = 0; i < 4000; ++i) CHECK_EQ(int(pb[i]), 0);  // zeroed
  }
  // The arena is gone; its pieces still own their memory.
  static_cast<unsigned char*>(a.get())[99] = 7;
  static_cast<unsigned char*>(big.get())[3 * runtime::kHugePage] = 9;
  CHECK_EQ(int(static_cast<unsigned char*>(a.get())[99]), 7);
}
