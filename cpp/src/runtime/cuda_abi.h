// The C ABI between the core and libflashpage_cuda (loaded with dlopen). Every function
// returns 0 on success, or writes a message into err (at most err_len bytes) and returns -1.
#pragma once

#include <cstddef>
#include <cstdint>

#define FLASHPAGE_CUDA_ABI_VERSION 1

extern "C" {
typedef int (*flashpage_cuda_abi_version_fn)();
typedef int (*flashpage_cuda_device_count_fn)(int* count, char* err, size_t err_len);
typedef int (*flashpage_cuda_device_name_fn)(int device, char* name, size_t name_len, char* err,
                                             size_t err_len);
// y = a * x + y on the device, for host arrays of n floats: a self-test of the whole path.
typedef int (*flashpage_cuda_axpy_fn)(int n, float a, const float* x, float* y, char* err,
                                      size_t err_len);
}

// The kernels (cuda/kernels/kernels.h) on raw device pointers. dtype: 0 = float16,
// 1 = bfloat16. stream: a cudaStream_t (nullptr = the default stream).
extern "C" {
typedef int (*flashpage_cuda_num_sms_fn)(int device, int* num_sms, char* err, size_t err_len);
typedef int (*flashpage_cuda_reshape_and_cache_fn)(int dtype, const void* key, const void* value,
                                                   void* k_cache, void* v_cache,
                                                   const int32_t* slot_mapping, int num_tokens,
                                                   int num_kv_heads, int head_dim,
                                                   int block_size, void* stream, char* err,
                                                   size_t err_len);
}
