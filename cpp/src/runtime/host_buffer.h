// A large, page-aligned host allocation (RAII). Backed by an anonymous mapping, so its pages
// are zero and cost nothing until first touched: a KV cache of several GiB starts instantly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>

namespace flashpage::runtime {

constexpr size_t kHugePage = size_t(2) << 20;

class HostBuffer {
 public:
  HostBuffer() = default;
  explicit HostBuffer(size_t bytes);  // throws std::bad_alloc naming the size if the OS refuses
  ~HostBuffer();
  HostBuffer(HostBuffer&& o) noexcept;
  HostBuffer& operator=(HostBuffer&& o) noexcept;
  HostBuffer(const HostBuffer&) = delete;
  HostBuffer& operator=(const HostBuffer&) = delete;

  // Faults in the pages of bytes [begin, end) (MADV_POPULATE_WRITE, Linux 5.14+; false, doing
  // nothing, elsewhere). Contents are not changed.
  bool prefault(size_t begin, size_t end);

  void* data() const { return data_; }
  size_t size() const { return size_; }
  template <class T>
  T* as() const { return static_cast<T*>(data_); }

 private:
  void release();
  void* data_ = nullptr;
  size_t size_ = 0;
};

// Many pieces carved, in order, from a few large HostBuffers, each piece sharing the ownership
// of the buffer it lies in. For a model's packed weights: most Linears are smaller than a 2 MiB
// page, and a mapping of their own would keep them on 4 KiB pages, which one core streams
// markedly slower (a third of a 1.1B Q4_0 model's weights were, measured).
class HostArena {
 public:
  explicit HostArena(size_t chunk_bytes = size_t(128) << 20);
  // `bytes` of zeroed memory, 64-byte aligned.
  std::shared_ptr<void> take(size_t bytes);

 private:
  size_t chunk_bytes_;
  std::shared_ptr<HostBuffer> chunk_;
  size_t used_ = 0;
};

}  // namespace flashpage::runtime
