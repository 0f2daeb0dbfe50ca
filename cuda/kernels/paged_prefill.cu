// Prefill attention over the paged KV cache, for the whole flattened batch: each sequence's
// query rows are the newest tokens of its context (a prompt chunk, or one decode token), whose
// K/V are already in the cache; row j of a sequence with context n and q_len rows sits at
// position n - q_len + j and attends causally to positions <= its own, through the block
// table. FlashAttention-2 style: a CTA takes 64 query rows of one head (16 per warp), streams
// 64-key tiles of K and V through shared memory (cp.async, two stages), and keeps scores,
// probabilities and the output accumulator in registers (mma.sync m16n8k16, ldmatrix).
#include <cfloat>
#include <type_traits>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {
namespace {

constexpr int kBM = 64, kBN = 64, kWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
struct Smem {
  static constexpr int kLd = D + 8;  // padded rows: ldmatrix reads 8 rows without conflicts
  static constexpr size_t kTile = size_t(kBM) * kLd * 2;
  static constexpr size_t kBytes = 5 * kTile;  // Q, and two stages of K and V
};

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 16 bytes global -> shared without passing through registers; zero-filled when !pred.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(pred ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  Vec8<T> u;  // only the first two lanes are used
  u.v[0] = from_float<T>(lo);
  u.v[1] = from_float<T>(hi);
  return u.raw.x;
}

template <typename T, int D, int BS>
__global__ void __launch_bounds__(kWarps * 32)
paged_prefill_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                     const T* __restrict__ v_cache, const int32_t* __restrict__ block_tables,
                     int bt_stride, const int32_t* __restrict__ query_start_loc,
                     const int32_t* __restrict__ context_lens, int num_q_heads,
                     int num_kv_heads, int q_tiles, float scale_log2, T* __restrict__ out) {
  using S = Smem<D>;
  constexpr int kLd = S::kLd, kVecs = D / 8, kNT = kBN / 8, kDT = D / 8, kKS = D / 16;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  // Two stages of K and V: the next tile's loads run while this one is computed.
  auto stage_k = [&](int stage) { return reinterpret_cast<T*>(smem + (1 + 2 * stage) * S::kTile); };
  auto stage_v = [&](int stage) { return reinterpret_cast<T*>(smem + (2 + 2 * stage) * S::kTile); };
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;

  const int seq = blockIdx.x / q_tiles, tile = blockIdx.x % q_tiles;
  const int qh = blockIdx.y, kvh = qh / (num_q_heads / num_kv_heads);
  const int q_begin = query_start_loc[seq], q_len = query_start_loc[seq + 1] - q_begin;
  const int row0 = tile * kBM;
  if (row0 >= q_len) return;
  const int ctx = context_lens[seq];
  const int first_pos = ctx - q_len;
  const int rows = min(kBM, q_len - row0);
  const int kv_end = min(ctx, first_pos + row0 + rows);

  for (int i = threadIdx.x; i < kBM * kVecs; i += blockDim.x) {
    const int r = i / kVecs, c = (i % kVecs) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < rows)
      v = *reinterpret_cast<const uint4*>(
          q + (int64_t(q_begin + row0 + r) * num_q_heads + qh) * D + c);
    *reinterpret_cast<uint4*>(sq + r * kLd + c) = v;
  }
  __syncthreads();
  // This warp's 16 query rows as A fragments, one per 16-wide slice of the head dim.
  uint32_t qa[kKS][4];
#pragma unroll
  for (int ks = 0; ks < kKS; ++ks)
    ldmatrix_x4(qa[ks], sq + (warp * 16 + lane % 16) * kLd + ks * 16 + (lane / 16) * 8);

  // Rows g and g + 8 of the warp's 16.
  const int pos_lo = first_pos + row0 + warp * 16 + g, pos_hi = pos_lo + 8;
  float m_lo = -FLT_MAX, m_hi = -FLT_MAX, l_lo = 0.f, l_hi = 0.f;
  float o[kDT][4];
#pragma unroll
  for (int j = 0; j < kDT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  const int32_t* bt = block_tables + int64_t(seq) * bt_stride;
  auto load_kv = [&](int stage, int kv_start) {
    for (int i = threadIdx.x; i < kBN * kVecs; i += blockDim.x) {
      const int r = i / kVecs, c = (i % kVecs) * 8, pos = kv_start + r;
      const bool ok = pos < kv_end;
      const int64_t off =
          ok ? ((int64_t(bt[pos / BS]) * num_kv_heads + kvh) * BS + pos % BS) * D + c : 0;
      cp_async16(stage_k(stage) + r * kLd + c, k_cache + off, ok);
      cp_async16(stage_v(stage) + r * kLd + c, v_cache + off, ok);
    }
    cp_async_commit();
  };

  load_kv(0, 0);
  for (int it = 0, kv0 = 0; kv0 < kv_end; ++it, kv0 += kBN) {
    const T* sk = stage_k(it & 1);
    const T* sv = stage_v(it & 1);
    if (kv0 + kBN < kv_end) {
      load_kv((it + 1) & 1, kv0 + kBN);
      cp_async_wait<1>();  // this tile has landed; the next one is in flight
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();

    // S = Q K^T: kNT tiles of 8 keys.
    float s[kNT][4];
#pragma unroll
    for (int j = 0; j < kNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kKS; ++ks) {
#pragma unroll
      for (int j = 0; j < kNT; j += 2) {
        uint32_t b[4];
        ldmatrix_x4(b, sk + (j * 8 + lane % 8 + (lane / 16) * 8) * kLd + ks * 16 + ((lane / 8) % 2) * 8);
        mma16816<T>(s[j], qa[ks], b[0], b[1]);
        mma16816<T>(s[j + 1], qa[ks], b[2], b[3]);
      }
    }
    // Scale, mask (causal and past the context), online softmax per row.
    float mx_lo = m_lo, mx_hi = m_hi;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = kv0 + j * 8 + t * 2 + (e & 1);
        const int pos = e < 2 ? pos_lo : pos_hi;
        s[j][e] = key <= pos && key < kv_end ? s[j][e] * scale_log2 : -FLT_MAX;
      }
      mx_lo = fmaxf(mx_lo, fmaxf(s[j][0], s[j][1]));
      mx_hi = fmaxf(mx_hi, fmaxf(s[j][2], s[j][3]));
    }
#pragma unroll
    for (int off = 1; off <= 2; off <<= 1) {
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, off));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, off));
    }
    const float corr_lo = exp2f(m_lo - mx_lo), corr_hi = exp2f(m_hi - mx_hi);
    m_lo = mx_lo;
    m_hi = mx_hi;
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int j = 0; j < kNT; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = s[j][e] == -FLT_MAX ? 0.f : exp2f(s[j][e] - (e < 2 ? mx_lo : mx_hi));
        s[j][e] = p;
        (e < 2 ? sum_lo : sum_hi) += p;
      }
    }
    l_lo = l_lo * corr_lo + sum_lo;  // per-thread partial sums; reduced across the row at the end
    l_hi = l_hi * corr_hi + sum_hi;
#pragma unroll
    for (int j = 0; j < kDT; ++j) {
      o[j][0] *= corr_lo;
      o[j][1] *= corr_lo;
      o[j][2] *= corr_hi;
      o[j][3] *= corr_hi;
    }
    // O += P V: the score accumulators of two adjacent key tiles form one A fragment.
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
      uint32_t pa[4];
      pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int j = 0; j < kDT; j += 2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, sv + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kLd + j * 8 + (lane / 16) * 8);
        mma16816<T>(o[j], pa, b[0], b[1]);
        mma16816<T>(o[j + 1], pa, b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with this stage before it is refilled
  }

#pragma unroll
  for (int off = 1; off <= 2; off <<= 1) {
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, off);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, off);
  }
  const float inv_lo = l_lo > 0.f ? 1.f / l_lo : 0.f, inv_hi = l_hi > 0.f ? 1.f / l_hi : 0.f;
  const int r_lo = warp * 16 + g, r_hi = r_lo + 8;
#pragma unroll
  for (int j = 0; j < kDT; ++j) {
    const int c = j * 8 + t * 2;
    if (r_lo < rows) {
      T* dst = out + (int64_t(q_begin + row0 + r_lo) * num_q_heads + qh) * D + c;
      dst[0] = from_float<T>(o[j][0] * inv_lo);
      dst[1] = from_float<T>(o[j][1] * inv_lo);
    }
    if (r_hi < rows) {
      T* dst = out + (int64_t(q_begin + row0 + r_hi) * num_q_heads + qh) * D + c;
      dst[0] = from_float<T>(o[j][2] * inv_hi);
      dst[1] = from_float<T>(o[j][3] * inv_hi);
    }
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
