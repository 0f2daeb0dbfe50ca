// Hands a step's logits to Python without a copy, through DLPack (the data-exchange protocol
// torch, numpy and JAX read: torch.from_dlpack(obj) calls obj.__dlpack__()). The structs
// are DLPack's stable ABI (v0.8 "dltensor" capsules), declared here rather than vendored.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

namespace flashpage::bindings {

struct DLDevice {
  int32_t device_type;  // 1: CPU, 2: CUDA
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 2: float
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // nullptr: C-contiguous
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};

// A "dltensor" capsule viewing the fp32 matrix [rows, cols] at `data` on (device_type,
// device_id); `owner` is kept alive until the consumer lets go of the view.
pybind11::capsule dlpack_matrix(const float* data, int64_t rows, int64_t cols, int32_t device_type, int32_t device_id,
                                pybind11::object owner);

}  // namespace flashpage::bindings
