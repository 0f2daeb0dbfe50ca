// Shared declarations of the pybind11 module flashpage._core.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

namespace flashpage::bindings {

// Contiguous arrays, converting dtype on the way in where needed.
using FloatArray = pybind11::array_t<float, pybind11::array::c_style | pybind11::array::forcecast>;
using IntArray = pybind11::array_t<int32_t, pybind11::array::c_style | pybind11::array::forcecast>;

void bind_core(pybind11::module_& m);     // BlockManager, Scheduler, StepOutput
void bind_runtime(pybind11::module_& m);  // CPU ISA dispatch, kernels, CUDA backend
void bind_model(pybind11::module_& m);    // config.json, safetensors

// A read-only numpy view of `n` elements at `data` whose lifetime is tied to `owner`.
template <class T>
pybind11::array_t<T> readonly_view(const T* data, std::vector<pybind11::ssize_t> shape,
                                   pybind11::handle owner) {
  static const T empty{};
  pybind11::array_t<T> a(std::move(shape), data ? data : &empty, owner);
  pybind11::detail::array_proxy(a.ptr())->flags &= ~pybind11::detail::npy_api::NPY_ARRAY_WRITEABLE_;
  return a;
}

}  // namespace flashpage::bindings
