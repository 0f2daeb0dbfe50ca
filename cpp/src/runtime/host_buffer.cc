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
  // From 2 MiB up, the start is 2 MiB aligned (the mapping made larger, its ends unmapped): only
  // aligned 2 MiB ranges can be huge pages, and an unaligned start leaves up to 2 MiB of the
  // buffer on 4 KiB pages.
  const size_t align = bytes >= kHugePage ? kHugePage : 0;
  void* p = mmap(nullptr, bytes + align, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED)
    throw std::runtime_error("cannot allocate " + std::to_string(bytes >> 20) + " MiB of host memory");
  if (align) {
    const auto at = reinterpret_cast<uintptr_t>(p), start = (at + align - 1) / align * align;
    const size_t page = size_t(sysconf(_SC_PAGESIZE)), end = (start + bytes + page - 1) / page * page;
    if (start > at) munmap(p, start - at);
    if (at + bytes + align > end) munmap(reinterpret_cast<void*>(end), at + bytes + align - end);
    p = reinterpret_cast<void*>(start);
  }
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

HostArena::HostArena(size_t chunk_bytes) : chunk_bytes_(chunk_bytes) {}

std::shared_ptr<void> HostArena::take(size_t bytes) {
  constexpr size_t kAlign = 64;
  bytes = (bytes + kAlign - 1) / kAlign * kAlign;
  if (!chunk_ || used_ + bytes > chunk_->size()) {
    // A piece larger than a chunk gets a mapping of its own, rounded to whole 2 MiB pages.
    chunk_ = std::make_shared<HostBuffer>(std::max(chunk_bytes_, (bytes + kHugePage - 1) / kHugePage * kHugePage));
    used_ = 0;
  }
  void* at = static_cast<char*>(chunk_->data()) + used_;
  used_ += bytes;
  return std::shared_ptr<void>(chunk_, at);  // shares the chunk's ownership
}

}  // namespace flashpage::runtime
