// KV-cache write, fused residual-add RMSNorm, SiLU*mul and rotary embedding.
#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {
namespace {

template <typename T>
__global__ void reshape_and_cache_kernel(const T* __restrict__ key, const T* __restrict__ value,
                                         T* __restrict__ k_cache, T* __restrict__ v_cache,
                                         const int32_t* __restrict__ slot_mapping,
                                         int num_kv_heads, int head_dim, int block_size) {
  const int token = blockIdx.x;
  const int64_t slot = slot_mapping[token];
  if (slot < 0) return;
  const int64_t block = slot / block_size, offset = slot % block_size;
  const int vecs_per_head = head_dim / 8;
  for (int i = threadIdx.x; i < num_kv_heads * vecs_per_head; i += blockDim.x) {
    const int h = i / vecs_per_head, d = (i % vecs_per_head) * 8;
    const int64_t src = (static_cast<int64_t>(token) * num_kv_heads + h) * head_dim + d;
    const int64_t dst = ((block * num_kv_heads + h) * block_size + offset) * head_dim + d;
    *reinterpret_cast<uint4*>(k_cache + dst) = *reinterpret_cast<const uint4*>(key + src);
    *reinterpret_cast<uint4*>(v_cache + dst) = *reinterpret_cast<const uint4*>(value + src);
  }
}

template <typename T>
__global__ void fused_add_rms_norm_kernel(T* __restrict__ out, const T* __restrict__ x,
                                          T* __restrict__ residual, const T* __restrict__ weight,
                                          int hidden, float eps) {
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * hidden;
  float ss = 0.f;
  for (int d = threadIdx.x * 8; d < hidden; d += blockDim.x * 8) {
    float v[8];
    load8(x + row + d, v);
    if (residual != nullptr) {
      float r[8];
      load8(residual + row + d, r);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] += r[i];
      store8(residual + row + d, v);
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) ss += v[i] * v[i];
  }
  const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
  // The residual is read back as rounded to T, which is what the next layer sees too.
  const T* src = residual != nullptr ? residual : x;
  for (int d = threadIdx.x * 8; d < hidden; d += blockDim.x * 8) {
    float v[8], w[8];
    load8(src + row + d, v);
    load8(weight + d, w);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = v[i] * inv * w[i];
    store8(out + row + d, v);
  }
}

template <typename T>
__global__ void silu_and_mul_kernel(T* __restrict__ out, const T* __restrict__ in, int inter) {
  const int64_t t = blockIdx.x;
  for (int d = threadIdx.x * 8; d < inter; d += blockDim.x * 8) {
    float g[8], u[8];
    load8(in + t * 2 * inter + d, g);
    load8(in + t * 2 * inter + inter + d, u);
#pragma unroll
    for (int i = 0; i < 8; ++i) g[i] = g[i] / (1.f + __expf(-g[i])) * u[i];
    store8(out + t * inter + d, g);
  }
}

template <typename T>
__global__ void rotary_kernel(T* __restrict__ q, T* __restrict__ k,
                              const int32_t* __restrict__ positions,
                              const float* __restrict__ cos_sin, int num_q_heads,
                              int num_kv_heads, int head_dim) {
  const int64_t t = blockIdx.x;
  const int half = head_dim / 2;
  const float* cs = cos_sin + static_cast<int64_t>(positions[t]) * head_dim;
  const int total = (num_q_heads + num_kv_heads) * half;
  for (int i = threadIdx.x; i < total; i += blockDim.x) {
    const int h = i / half, j = i % half;
    T* base = h < num_q_heads ? q + (t * num_q_heads + h) * head_dim
                              : k + (t * num_kv_heads + (h - num_q_heads)) * head_dim;
    const float c = cs[j], s = cs[half + j];
    const float x1 = to_float(base[j]), x2 = to_float(base[j + half]);
    base[j] = from_float<T>(x1 * c - x2 * s);
    base[j + half] = from_float<T>(x2 * c + x1 * s);
  }
}

int threads_for(int work) {
  int t = 32;
  while (t < work && t < 1024) t *= 2;
  return t;
}

}  // namespace


cudaError_t reshape_and_cache(DType dtype, const void* key, const void* value, void* k_cache,
                              void* v_cache, const int32_t* slot_mapping, int num_tokens,
                              int num_kv_heads, int head_dim, int block_size, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (head_dim % 8 != 0) return cudaErrorInvalidValue;
  const int threads = threads_for(num_kv_heads * head_dim / 8);
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
      reshape_and_cache_kernel<T><<<num_tokens, threads, 0, stream>>>(
          static_cast<const T*>(key), static_cast<const T*>(value), static_cast<T*>(k_cache),
          static_cast<T*>(v_cache), slot_mapping, num_kv_heads, head_dim, block_size));
  return cudaGetLastError();
}

cudaError_t fused_add_rms_norm(DType dtype, void* out, const void* x, void* residual,
                               const void* weight, int num_tokens, int hidden, float eps,
                               cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (hidden % 8 != 0) return cudaErrorInvalidValue;
  const int threads = threads_for(hidden / 8);
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
      fused_add_rms_norm_kernel<T><<<num_tokens, threads, 0, stream>>>(
          static_cast<T*>(out), static_cast<const T*>(x), static_cast<T*>(residual),
          static_cast<const T*>(weight), hidden, eps));
  return cudaGetLastError();
}

cudaError_t silu_and_mul(DType dtype, void* out, const void* in, int num_tokens, int inter,
                         cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (inter % 8 != 0) return cudaErrorInvalidValue;
  const int threads = threads_for(inter / 8);
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
      silu_and_mul_kernel<T><<<num_tokens, threads, 0, stream>>>(
          static_cast<T*>(out), static_cast<const T*>(in), inter));
  return cudaGetLastError();
}

cudaError_t rotary_embedding(DType dtype, void* q, void* k, const int32_t* positions,
                             const float* cos_sin, int num_tokens, int num_q_heads,
                             int num_kv_heads, int head_dim, cudaStream_t stream) {
  if (num_tokens == 0) return cudaSuccess;
  if (head_dim % 2 != 0) return cudaErrorInvalidValue;
  const int threads = threads_for((num_q_heads + num_kv_heads) * head_dim / 2);
  FLASHPAGE_DISPATCH_DTYPE(dtype, T,
      rotary_kernel<T><<<num_tokens, threads, 0, stream>>>(
          static_cast<T*>(q), static_cast<T*>(k), positions, cos_sin, num_q_heads,
          num_kv_heads, head_dim));
  return cudaGetLastError();
}

}  // namespace flashpage::cuda
