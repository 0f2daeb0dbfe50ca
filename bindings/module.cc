#include "bindings.h"

#include "flashpage/scheduler.h"

namespace py = pybind11;

PYBIND11_MODULE(_core, m) {
  m.doc() = "flashpage's C++ core: block manager, scheduler, kernels, backends";
  m.attr("__version__") = FLASHPAGE_VERSION;
  static py::exception<flashpage::RequestRejected> rejected(m, "RequestRejected", PyExc_ValueError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const flashpage::RequestRejected& e) {
      py::set_error(rejected, e.what());
    } catch (const flashpage::UnknownRequest& e) {
      py::set_error(PyExc_KeyError, e.what());
    }
  });
  flashpage::bindings::bind_core(m);
  flashpage::bindings::bind_runtime(m);
  flashpage::bindings::bind_model(m);
  flashpage::bindings::bind_engine(m);
}
