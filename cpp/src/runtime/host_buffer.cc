#include "runtime/host_buffer.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <new>
#include <stdexcept>
#include <string>
#include <utility>

namespace flashpage::runtime {

HostBuffer::HostBuffer(size_t bytes) : size_(bytes) {
  if (bytes == 0) return;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    throw std::runtime_error("cannot allocate " + std::to_string(bytes >> 20) + " MiB of host memory");
  data_ = p;
  // Weights and KV blocks are streamed: 2 MiB pages cut TLB misses (a hint; may be ignored).
  madvise(p, bytes, MADV_HUGEPAGE);
}

HostBuffer::~HostBuffer() { release(); }

HostBuffer::HostBuffer(HostBuffer&& o) noexcept
    : data_(std::exchange(o.data_, nullptr)), size_(std::exchange(o.size_, 0)) {}

HostBuffer& HostBuffer::operator=(HostBuffer&& o) noexcept {
  if (this != &o) {
    release();
    data_ = std::exchange(o.data_, nullptr);
    size_ = std::exchange(o.size_, 0);
  }
  return *this;
}

bool HostBuffer::prefault(size_t begin, size_t end) {
#ifdef MADV_POPULATE_WRITE
  // madvise wants a page-aligned start (EINVAL otherwise): a layer's K or V region need not
  // start on a page. The mapping covers whole pages, so rounding outwards stays inside it.
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  begin = begin / page * page;
  end = std::min((std::min(end, size_) + page - 1) / page * page, (size_ + page - 1) / page * page);
  return begin >= end || madvise(static_cast<char*>(data_) + begin, end - begin, MADV_POPULATE_WRITE) == 0;
#else
  (void)begin, (void)end;
  return false;
#endif
}

void HostBuffer::release() {
  if (data_) munmap(data_, size_);
  data_ = nullptr;
  size_ = 0;
}

}  // namespace flashpage::runtime
