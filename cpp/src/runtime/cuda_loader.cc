#include "runtime/cuda_loader.h"

#include <dlfcn.h>

#include <cstdlib>
#include <stdexcept>

namespace flashpage::runtime {
namespace {

std::string dir_of_this_binary() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void*>(&cuda_probe), &info) == 0 || info.dli_fname == nullptr)
    return ".";
  std::string path = info.dli_fname;
  const auto slash = path.rfind('/');
  return slash == std::string::npos ? "." : path.substr(0, slash);
}

CudaProbe probe() {
  CudaProbe b;
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
  auto get_ops = reinterpret_cast<flashpage_cuda_get_ops_fn>(dlsym(lib, FLASHPAGE_CUDA_GET_OPS));
  if (get_ops == nullptr) {
    b.reason = b.library_path + " lacks the symbol " FLASHPAGE_CUDA_GET_OPS " (an older build?)";
    return b;
  }
  const flashpage_cuda_ops* ops = get_ops();
  if (ops == nullptr || ops->abi_version != FLASHPAGE_CUDA_ABI_VERSION || ops->size < sizeof(flashpage_cuda_ops)) {
    b.reason = b.library_path + " has ABI version " + std::to_string(ops ? ops->abi_version : 0) +
               " (table of " + std::to_string(ops ? ops->size : 0) + " bytes), expected " +
               std::to_string(FLASHPAGE_CUDA_ABI_VERSION) + " (" + std::to_string(sizeof(flashpage_cuda_ops)) +
               " bytes)";
    return b;
  }
  char err[512] = {0};
  if (ops->device_count(&b.device_count, err, sizeof err) != 0) {
    b.reason = err;
    return b;
  }
  if (b.device_count == 0) {
    b.reason = "the NVIDIA driver reports no CUDA device";
    return b;
  }
  for (int d = 0; d < b.device_count; ++d) {
    char buf[256] = {0};
    b.device_names.push_back(ops->device_name(d, buf, sizeof buf, err, sizeof err) == 0 ? buf : err);
  }
  b.ops = ops;
  b.available = true;
  return b;
}

}  // namespace

const CudaProbe& cuda_probe() {
  static const CudaProbe result = probe();
  return result;
}

void cuda_axpy(float a, const std::vector<float>& x, std::vector<float>& y) {
  const CudaProbe& b = cuda_probe();
  if (!b.available) throw std::runtime_error("CUDA backend not available: " + b.reason);
  if (x.size() != y.size())
    throw std::invalid_argument("cuda_axpy: x has " + std::to_string(x.size()) +
                                " elements but y has " + std::to_string(y.size()));
  char err[512] = {0};
  if (b.ops->axpy(static_cast<int>(x.size()), a, x.data(), y.data(), err, sizeof err) != 0)
    throw std::runtime_error(err);
}

}  // namespace flashpage::runtime
