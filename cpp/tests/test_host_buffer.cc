// HostBuffer: prefault brings in the pages of any byte range, page-aligned or not (a layer's K or
// V region of the KV cache starts wherever the previous one ended).
#include <sys/mman.h>
#include <unistd.h>

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
