#include "dlpack.h"

#include <memory>

namespace py = pybind11;

namespace flashpage::bindings {
namespace {

struct Managed {
  DLManagedTensor tensor{};
  int64_t shape[2]{};
  PyObject* owner = nullptr;  // a strong reference
};

void delete_managed(DLManagedTensor* t) {
  std::unique_ptr<Managed> m(static_cast<Managed*>(t->manager_ctx));
  // The consumer may let go on any thread, with or without the GIL.
  PyGILState_STATE g = PyGILState_Ensure();
  Py_XDECREF(m->owner);
  PyGILState_Release(g);
}

}  // namespace

py::capsule dlpack_matrix(const float* data, int64_t rows, int64_t cols, int32_t device_type, int32_t device_id,
                          py::object owner) {
  auto m = std::make_unique<Managed>();
  m->shape[0] = rows;
  m->shape[1] = cols;
  m->owner = owner.release().ptr();
  DLTensor& t = m->tensor.dl_tensor;
  t.data = const_cast<float*>(data);
  t.device = {device_type, device_id};
  t.ndim = 2;
  t.dtype = {2, 32, 1};
  t.shape = m->shape;
  t.strides = nullptr;
  t.byte_offset = 0;
  m->tensor.manager_ctx = m.get();
  m->tensor.deleter = delete_managed;
  DLManagedTensor* raw = &m.release()->tensor;
  // Unconsumed capsules free the tensor themselves; a consumer renames the capsule to
  // "used_dltensor" and calls the deleter when it is done.
  PyObject* cap = PyCapsule_New(raw, "dltensor", [](PyObject* c) {
    if (!PyCapsule_IsValid(c, "dltensor")) return;
    auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(c, "dltensor"));
    if (t && t->deleter) t->deleter(t);
  });
  if (!cap) {
    raw->deleter(raw);
    throw py::error_already_set();
  }
  return py::reinterpret_steal<py::capsule>(cap);
}

}  // namespace flashpage::bindings
