// Prefill attention over the paged KV cache, for the whole flattened batch: each sequence's
// query rows are the newest tokens of its context (a prompt chunk, or one decode token), whose
// K/V are already in the cache; row j of a sequence with context n and q_len rows sits at
// position n - q_len + j and attends causally to positions <= its own, through the block
// table. Tiled (64 query rows x 64 keys), online softmax, tensor cores through WMMA.
//
// This first version keeps the softmax and the output accumulator in shared memory (WMMA's
// fragment layout is opaque): correct for every shape, not yet FlashAttention-fast.
#include <mma.h>

#include <cfloat>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {
namespace {

using namespace nvcuda;

constexpr int kBM = 64, kBN = 64, kWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Smem {
  static constexpr int kLd = D + 8;    // 16-bit rows, padded against bank conflicts
  static constexpr int kSLd = kBN + 4;  // fp32 scores
  static constexpr int kPLd = kBN + 8;  // 16-bit probabilities
  static constexpr int kOLd = D + 4;    // fp32 output accumulator
  static constexpr size_t kQ = size_t(kBM) * kLd * 2, kK = size_t(kBN) * kLd * 2;
  static constexpr size_t kS = size_t(16) * kSLd * 4, kP = size_t(16) * kPLd * 2;
  static constexpr size_t kO = size_t(16) * kOLd * 4;
  static constexpr size_t kBytes = kQ + 2 * kK + kWarps * (kS + kP + kO);
};

template <typename T, int D, int BS>
__global__ void __launch_bounds__(kWarps * 32)
paged_prefill_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                     const T* __restrict__ v_cache, const int32_t* __restrict__ block_tables,
                     int bt_stride, const int32_t* __restrict__ query_start_loc,
                     const int32_t* __restrict__ context_lens, int num_q_heads,
                     int num_kv_heads, int q_tiles, float scale_log2, T* __restrict__ out) {
  using S = Smem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sk = reinterpret_cast<T*>(smem + S::kQ);
  T* sv = reinterpret_cast<T*>(smem + S::kQ + S::kK);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned char* wbase = smem + S::kQ + 2 * S::kK + warp * (S::kS + S::kP + S::kO);
  float* ss = reinterpret_cast<float*>(wbase);
  T* sp = reinterpret_cast<T*>(wbase + S::kS);
  float* so = reinterpret_cast<float*>(wbase + S::kS + S::kP);

  const int seq = blockIdx.x / q_tiles, tile = blockIdx.x % q_tiles;
  const int qh = blockIdx.y, kvh = qh / (num_q_heads / num_kv_heads);
  const int q_begin = query_start_loc[seq], q_len = query_start_loc[seq + 1] - q_begin;
  const int row0 = tile * kBM;
  if (row0 >= q_len) return;
  const int ctx = context_lens[seq];
  const int first_pos = ctx - q_len;  // position of query row 0
  const int rows = min(kBM, q_len - row0);
  const int kv_end = min(ctx, first_pos + row0 + rows);  // causal: keys up to the last row
  constexpr int kVecs = D / 8;

  // Q tile -> shared memory (missing rows are zeros).
  for (int i = threadIdx.x; i < kBM * kVecs; i += blockDim.x) {
    const int r = i / kVecs, c = (i % kVecs) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows)
      v = *reinterpret_cast<const uint4*>(
          q + (int64_t(q_begin + row0 + r) * num_q_heads + qh) * D + c);
    *reinterpret_cast<uint4*>(sq + r * S::kLd + c) = v;
  }
  for (int i = lane; i < 16 * S::kOLd; i += 32) so[i] = 0.f;
  // Softmax state of this lane's row (two lanes per row: halves of the columns).
  const int my_row = lane / 2, half = lane % 2;
  const int my_pos = first_pos + row0 + warp * 16 + my_row;
  float m = -FLT_MAX, l = 0.f;
  const int32_t* bt = block_tables + int64_t(seq) * bt_stride;

  for (int kv0 = 0; kv0 < kv_end; kv0 += kBN) {
    __syncthreads();  // the previous tile is consumed
    for (int i = threadIdx.x; i < kBN * kVecs; i += blockDim.x) {
      const int r = i / kVecs, c = (i % kVecs) * 8, pos = kv0 + r;
      uint4 kx = make_uint4(0, 0, 0, 0), vx = kx;
      if (pos < kv_end) {
        const int64_t off = ((int64_t(bt[pos / BS]) * num_kv_heads + kvh) * BS + pos % BS) * D + c;
        kx = *reinterpret_cast<const uint4*>(k_cache + off);
        vx = *reinterpret_cast<const uint4*>(v_cache + off);
      }
      *reinterpret_cast<uint4*>(sk + r * S::kLd + c) = kx;
      *reinterpret_cast<uint4*>(sv + r * S::kLd + c) = vx;
    }
    __syncthreads();

    // S = Q_w K^T for this warp's 16 rows.
    for (int n = 0; n < kBN / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.f);
#pragma unroll
      for (int k = 0; k < D / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, sq + warp * 16 * S::kLd + k * 16, S::kLd);
        wmma::load_matrix_sync(b, sk + n * 16 * S::kLd + k * 16, S::kLd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(ss + n * 16, acc, S::kSLd, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax on this lane's half row; P to shared memory; rescale the accumulator.
    float* srow = ss + my_row * S::kSLd + half * (kBN / 2);
    float mx = m;
    for (int j = 0; j < kBN / 2; ++j) {
      const int pos = kv0 + half * (kBN / 2) + j;
      const float s = pos <= my_pos && pos < kv_end ? srow[j] * scale_log2 : -FLT_MAX;
      srow[j] = s;
      mx = fmaxf(mx, s);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float corr = exp2f(m - mx);
    float sum = 0.f;
    T* prow = sp + my_row * S::kPLd + half * (kBN / 2);
    for (int j = 0; j < kBN / 2; ++j) {
      const float p = srow[j] == -FLT_MAX ? 0.f : exp2f(srow[j] - mx);
      sum += p;
      prow[j] = from_float<T>(p);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * corr + sum;
    m = mx;
    float* orow = so + my_row * S::kOLd + half * (D / 2);
    for (int j = 0; j < D / 2; ++j) orow[j] *= corr;
    __syncwarp();

    // O_w += P V.
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::load_matrix_sync(acc, so + n * 16, S::kOLd, wmma::mem_row_major);
#pragma unroll
      for (int k = 0; k < kBN / 16; ++k) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, sp + k * 16, S::kPLd);
        wmma::load_matrix_sync(b, sv + k * 16 * S::kLd + n * 16, S::kLd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(so + n * 16, acc, S::kOLd, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // Normalize and write this lane's half row.
  const int r = warp * 16 + my_row;
  if (r >= rows) return;
  const float inv = l > 0.f ? 1.f / l : 0.f;
  T* dst = out + (int64_t(q_begin + row0 + r) * num_q_heads + qh) * D + half * (D / 2);
  const float* orow = so + my_row * S::kOLd + half * (D / 2);
  for (int j = 0; j < D / 2; j += 8) {
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = orow[j + i] * inv;
    store8(dst + j, v);
  }
}

template <typename T, int D, int BS>
cudaError_t launch(const PagedPrefillParams& p, cudaStream_t stream) {
  auto kernel = paged_prefill_kernel<T, D, BS>;
  const size_t bytes = Smem<D>::kBytes;
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e != cudaSuccess) return e;
  const int q_tiles = (p.max_query_len + kBM - 1) / kBM;
  dim3 grid(p.num_seqs * q_tiles, p.num_q_heads);
  kernel<<<grid, kWarps * 32, bytes, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k_cache), static_cast<const T*>(p.v_cache),
      p.block_tables, p.block_table_stride, p.query_start_loc, p.context_lens, p.num_q_heads,
      p.num_kv_heads, q_tiles, p.scale * kLog2e, static_cast<T*>(p.out));
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t dispatch_block(const PagedPrefillParams& p, cudaStream_t stream) {
  return p.block_size == 16 ? launch<T, D, 16>(p, stream) : launch<T, D, 32>(p, stream);
}

}  // namespace

bool paged_prefill_supported(int head_dim, int block_size, int num_q_heads, int num_kv_heads) {
  return (head_dim == 64 || head_dim == 128) && (block_size == 16 || block_size == 32) &&
         num_kv_heads > 0 && num_q_heads % num_kv_heads == 0;
}

cudaError_t paged_prefill(const PagedPrefillParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0 || p.max_query_len == 0) return cudaSuccess;
  if (!paged_prefill_supported(p.head_dim, p.block_size, p.num_q_heads, p.num_kv_heads))
    return cudaErrorInvalidValue;
  cudaError_t e = cudaErrorInvalidValue;
  FLASHPAGE_DISPATCH_DTYPE(p.dtype, T, {
    e = p.head_dim == 64 ? dispatch_block<T, 64>(p, stream) : dispatch_block<T, 128>(p, stream);
  });
  return e;
}

}  // namespace flashpage::cuda
