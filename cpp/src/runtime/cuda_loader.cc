#include "runtime/cuda_loader.h"

#include <dlfcn.h>

#include <cstdlib>
#include <stdexcept>

namespace flashpage::runtime {
namespace {

std::string dir_of_this_binary() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&cuda_backend), &info) == 0 || info.dli_fname == nullptr)
    return ".";
  std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

template <class Fn>
Fn symbol(void* lib, const char* name, std::string& missing) {
  auto* f = reinterpret_cast<Fn>(dlsym(lib, name));
  if (f == nullptr && missing.empty()) missing = name;
  return f;
}

CudaBackend probe() {
  CudaBackend b;
  const char* env = std::getenv("FLASHPAGE_CUDA_LIBRARY");
  b.library_path = env && *env ? env : dir_of_this_binary() + "/libflashpage_cuda.so";
  // The driver library comes with the NVIDIA driver; without it there is no GPU to use, and
  // the backend is not even opened.
  void* driver = dlopen("libcuda.so.1", RTLD_LAZY | RTLD_LOCAL);
  if (driver == nullptr) {
    b.reason = "no NVIDIA driver (libcuda.so.1 not found)";
    return b;
  }
  b.driver_found = true;
  // Handles stay open for the life of the process: the backend is used until exit.
  void* lib = dlopen(b.library_path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    const char* e = dlerror();
    b.reason = "cannot load " + b.library_path + ": " + (e ? e : "unknown error");
    return b;
  }
  std::string missing;
  auto version = symbol<flashpage_cuda_abi_version_fn>(lib, "flashpage_cuda_abi_version", missing);
  auto count = symbol<flashpage_cuda_device_count_fn>(lib, "flashpage_cuda_device_count", missing);
  auto name = symbol<flashpage_cuda_device_name_fn>(lib, "flashpage_cuda_device_name", missing);
  auto axpy = symbol<flashpage_cuda_axpy_fn>(lib, "flashpage_cuda_axpy", missing);
  if (!missing.empty()) {
    b.reason = b.library_path + " lacks the symbol " + missing;
    return b;
  }
  if (version() != FLASHPAGE_CUDA_ABI_VERSION) {
    b.reason = b.library_path + " has ABI version " + std::to_string(version()) + ", expected " +
               std::to_string(FLASHPAGE_CUDA_ABI_VERSION);
    return b;
  }
  char err[512] = {0};
  if (count(&b.device_count, err, sizeof err) != 0) {
    b.reason = err;
    return b;
  }
  if (b.device_count == 0) {
    b.reason = "the NVIDIA driver reports no CUDA device";
    return b;
  }
  for (int d = 0; d < b.device_count; ++d) {
    char buf[256] = {0};
    b.device_names.push_back(name(d, buf, sizeof buf, err, sizeof err) == 0 ? buf : err);
  }
  b.axpy = axpy;
  b.available = true;
  return b;
}

}  // namespace

const CudaBackend& cuda_backend() {
  static const CudaBackend backend = probe();
  return backend;
}

void cuda_axpy(float a, const std::vector<float>& x, std::vector<float>& y) {
  const CudaBackend& b = cuda_backend();
  if (!b.available) throw std::runtime_error("CUDA backend not available: " + b.reason);
  if (x.size() != y.size())
    throw std::invalid_argument("cuda_axpy: x has " + std::to_string(x.size()) +
                                " elements but y has " + std::to_string(y.size()));
  char err[512] = {0};
  if (b.axpy(static_cast<int>(x.size()), a, x.data(), y.data(), err, sizeof err) != 0)
    throw std::runtime_error(err);
}

}  // namespace flashpage::runtime
