// A large, page-aligned host allocation (RAII). Backed by an anonymous mapping, so its pages
// are zero and cost nothing until first touched: a KV cache of several GiB starts instantly.
#pragma once

#include <cstddef>
#include <cstdint>

namespace flashpage::runtime {

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

}  // namespace flashpage::runtime
