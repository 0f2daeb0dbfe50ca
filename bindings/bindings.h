// Shared declarations of the pybind11 module flashpage._core.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <span>
#include <stdexcept>
#include <string>

#include "flashpage/scheduler.h"

namespace flashpage::bindings {

// Contiguous arrays, converting dtype on the way in where needed.
using FloatArray = pybind11::array_t<float, pybind11::array::c_style | pybind11::array::forcecast>;
using IntArray = pybind11::array_t<int32_t, pybind11::array::c_style | pybind11::array::forcecast>;

void bind_core(pybind11::module_& m);     // BlockManager, Scheduler, SchedulerOutput
void bind_runtime(pybind11::module_& m);  // CPU ISA dispatch, kernels, CUDA backend
void bind_model(pybind11::module_& m);    // config.json, safetensors
void bind_engine(pybind11::module_& m);   // Engine

inline std::span<const int32_t> as_span(const IntArray& a) {
  if (a.ndim() != 1) throw std::invalid_argument("expected a 1-D array of token ids");
  return {a.data(), static_cast<size_t>(a.shape(0))};
}

// (request_ids, tokens, finish_reasons) of a list of events with request_id, token and finish
// (RequestUpdate, TokenEvent); a reason is None while the request goes on.
template <class Event>
pybind11::tuple events_as_arrays(const std::vector<Event>& events) {
  const auto n = static_cast<pybind11::ssize_t>(events.size());
  pybind11::array_t<int64_t> ids(n);
  pybind11::array_t<int32_t> toks(n);
  pybind11::list reasons;
  for (pybind11::ssize_t i = 0; i < n; ++i) {
    ids.mutable_at(i) = events[i].request_id;
    toks.mutable_at(i) = events[i].token;
    if (events[i].finish == FinishReason::kNone) reasons.append(pybind11::none());
    else reasons.append(pybind11::str(finish_reason_name(events[i].finish)));
  }
  return pybind11::make_tuple(ids, toks, reasons);
}

inline SchedulingPolicy parse_policy(const std::string& policy) {
  if (policy == "fcfs") return SchedulingPolicy::kFcfs;
  if (policy == "priority") return SchedulingPolicy::kPriority;
  throw std::invalid_argument("policy must be 'fcfs' or 'priority', got '" + policy + "'");
}

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
