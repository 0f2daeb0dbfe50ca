// Decode attention over the paged KV cache: one query token per sequence, split-KV
// ("flash-decoding") so that long contexts at small batch still fill the GPU. One CTA handles
// one (sequence, KV head, split) and all the query heads of that KV head's group, so each KV
// block is read once for the group. Scores and softmax in fp32 (base-2 exponentials).
#include <algorithm>
#include <cfloat>

#include "kernels/common.cuh"
#include "kernels/kernels.h"

namespace flashpage::cuda {
namespace {

constexpr int kWarps = 4;
constexpr float kLog2e = 1.4426950408889634f;

// Merges the softmax state (m, l, acc) of `other` into this one.
template <int G, int V>
__device__ __forceinline__ void merge_state(float (&m)[G], float (&l)[G], float (&acc)[G][V],
                                            const float (&m2)[G], const float (&l2)[G],
                                            const float (&acc2)[G][V]) {
#pragma unroll
  for (int g = 0; g < G; ++g) {
    const float mn = fmaxf(m[g], m2[g]);
    if (mn == -FLT_MAX) continue;  // both empty
    const float a = exp2f(m[g] - mn), b = exp2f(m2[g] - mn);
    l[g] = l[g] * a + l2[g] * b;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[g][i] = acc[g][i] * a + acc2[g][i] * b;
    m[g] = mn;
  }
}

template <typename T, int D, int G, int BS>
__global__ void __launch_bounds__(kWarps * 32)
paged_decode_kernel(const T* __restrict__ q, const T* __restrict__ k_cache,
                    const T* __restrict__ v_cache, const int32_t* __restrict__ block_tables,
                    int bt_stride, const int32_t* __restrict__ context_lens, int num_q_heads,
                    int num_kv_heads, int group_chunks, int g_active, float scale_log2,
                    int partition_blocks,
                    T* __restrict__ out, float* __restrict__ part_out,
                    float* __restrict__ part_lse) {
  constexpr int V = 8;             // elements per lane: one 16-byte load
  constexpr int LPT = D / V;       // lanes per token row
  constexpr int TPI = 32 / LPT;    // tokens per warp per step
  constexpr int ITERS = BS / TPI;  // steps per block
  static_assert(D % V == 0 && 32 % LPT == 0 && BS % TPI == 0, "unsupported shape");

  const int seq = blockIdx.x;
  const int kvh = blockIdx.y / group_chunks;
  const int qh0 = kvh * (num_q_heads / num_kv_heads) + (blockIdx.y % group_chunks) * G;
  const int split = blockIdx.z, num_splits = gridDim.z;
  const int ctx = context_lens[seq];
  const int seq_blocks = (ctx + BS - 1) / BS;
  const int blk_begin = split * partition_blocks;
  if (blk_begin >= seq_blocks) return;  // this sequence needs fewer splits
  const int blk_end = min(blk_begin + partition_blocks, seq_blocks);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int row = lane / LPT, sub = lane % LPT;

  // G is a compiled group width; only g_active of its heads exist (a group of 3 or 7 runs in
  // the 4- or 8-wide kernel: extra arithmetic, no extra memory traffic).
  float qv[G][V];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < g_active) {
      load8(q + (static_cast<int64_t>(seq) * num_q_heads + qh0 + g) * D + sub * V, qv[g]);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) qv[g][i] = 0.f;
    }
#pragma unroll
    for (int i = 0; i < V; ++i) qv[g][i] *= scale_log2;
  }
  float m[G], l[G], acc[G][V];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -FLT_MAX;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) acc[g][i] = 0.f;
  }

  const int32_t* bt = block_tables + static_cast<int64_t>(seq) * bt_stride;
  // A block is consumed in chunks of CH rows per lane: K and V of a chunk are loaded together
  // (16-byte loads in flight), scored, then folded into the running softmax state.
  constexpr int CH = ITERS < 4 ? ITERS : 4;
  for (int b = blk_begin + warp; b < blk_end; b += kWarps) {
    const int64_t base = (static_cast<int64_t>(bt[b]) * num_kv_heads + kvh) * BS * D;
    const T* kb = k_cache + base + row * D + sub * V;
    const T* vb = v_cache + base + row * D + sub * V;
#pragma unroll
    for (int c0 = 0; c0 < ITERS; c0 += CH) {
      uint4 kr[CH], vr[CH];
#pragma unroll
      for (int it = 0; it < CH; ++it)
        kr[it] = *reinterpret_cast<const uint4*>(kb + (c0 + it) * TPI * D);
#pragma unroll
      for (int it = 0; it < CH; ++it)
        vr[it] = *reinterpret_cast<const uint4*>(vb + (c0 + it) * TPI * D);

      float s[CH][G];
#pragma unroll
      for (int it = 0; it < CH; ++it) {
        Vec8<T> kx;
        kx.raw = kr[it];
        float kf[V];
#pragma unroll
        for (int i = 0; i < V; ++i) kf[i] = to_float(kx.v[i]);
        const bool valid = b * BS + (c0 + it) * TPI + row < ctx;
#pragma unroll
        for (int g = 0; g < G; ++g) {
          float d = 0.f;
#pragma unroll
          for (int i = 0; i < V; ++i) d = fmaf(qv[g][i], kf[i], d);
#pragma unroll
          for (int o = LPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
          s[it][g] = valid ? d : -FLT_MAX;
        }
      }
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float mx = m[g];
#pragma unroll
        for (int it = 0; it < CH; ++it) mx = fmaxf(mx, s[it][g]);
        const float corr = exp2f(m[g] - mx);
        l[g] *= corr;
#pragma unroll
        for (int i = 0; i < V; ++i) acc[g][i] *= corr;
        m[g] = mx;
      }
#pragma unroll
      for (int it = 0; it < CH; ++it) {
        Vec8<T> vx;
        vx.raw = vr[it];
        float vf[V];
#pragma unroll
        for (int i = 0; i < V; ++i) vf[i] = to_float(vx.v[i]);
#pragma unroll
        for (int g = 0; g < G; ++g) {
          const float p = s[it][g] == -FLT_MAX ? 0.f : exp2f(s[it][g] - m[g]);
          l[g] += p;
#pragma unroll
          for (int i = 0; i < V; ++i) acc[g][i] = fmaf(p, vf[i], acc[g][i]);
        }
      }
    }
  }

  // Merge the TPI token rows of the warp (lanes with equal `sub` hold the same elements).
#pragma unroll
  for (int o = LPT; o < 32; o <<= 1) {
    float m2[G], l2[G], acc2[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      m2[g] = __shfl_xor_sync(0xffffffffu, m[g], o);
      l2[g] = __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
      for (int i = 0; i < V; ++i) acc2[g][i] = __shfl_xor_sync(0xffffffffu, acc[g][i], o);
    }
    merge_state<G, V>(m, l, acc, m2, l2, acc2);
  }
  // Merge the warps through shared memory.
  __shared__ float sm_m[kWarps][G], sm_l[kWarps][G], sm_acc[kWarps][G][D];
  if (row == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (sub == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
#pragma unroll
      for (int i = 0; i < V; ++i) sm_acc[warp][g][sub * V + i] = acc[g][i];
    }
  }
  __syncthreads();
  if (warp != 0 || row != 0) return;
  for (int w = 1; w < kWarps; ++w) {
    float m2[G], l2[G], acc2[G][V];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      m2[g] = sm_m[w][g];
      l2[g] = sm_l[w][g];
#pragma unroll
      for (int i = 0; i < V; ++i) acc2[g][i] = sm_acc[w][g][sub * V + i];
    }
    merge_state<G, V>(m, l, acc, m2, l2, acc2);
  }
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g >= g_active) break;
    const int64_t head = static_cast<int64_t>(seq) * num_q_heads + qh0 + g;
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    float o[V];
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] = acc[g][i] * inv;
    if (num_splits == 1) {
      store8(out + head * D + sub * V, o);
    } else {
      float* po = part_out + (head * num_splits + split) * D + sub * V;
#pragma unroll
      for (int i = 0; i < V; ++i) po[i] = o[i];
      if (sub == 0) part_lse[head * num_splits + split] = m[g] + log2f(l[g]);
    }
  }
}

// Combines the splits of each (sequence, query head): weights 2^(lse_s - max lse).
template <typename T, int D>
__global__ void combine_splits_kernel(const float* __restrict__ part_out,
                                      const float* __restrict__ part_lse,
                                      const int32_t* __restrict__ context_lens, int num_q_heads,
                                      int num_splits, int partition_tokens, T* __restrict__ out) {
  const int64_t head = blockIdx.x;  // seq * num_q_heads + qh
  const int seq = static_cast<int>(head / num_q_heads);
  const int used = min(num_splits, (context_lens[seq] + partition_tokens - 1) / partition_tokens);
  const float* lse = part_lse + head * num_splits;
  float mx = -FLT_MAX;
  for (int s = 0; s < used; ++s) mx = fmaxf(mx, lse[s]);
  float total = 0.f;
  for (int s = 0; s < used; ++s) total += exp2f(lse[s] - mx);
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < used; ++s) o += exp2f(lse[s] - mx) * part_out[(head * num_splits + s) * D + d];
    out[head * D + d] = from_float<T>(o / total);
  }
}

// The compiled group width for a GQA ratio: 1, 2, 4 or 8 (larger groups run in chunks of 8).
int group_width(int g) { return g <= 1 ? 1 : g <= 2 ? 2 : g <= 4 ? 4 : 8; }

struct Plan {
  int splits, partition_blocks;
};

Plan plan(const PagedDecodeParams& p) {
  const int max_blocks = std::max(1, (p.max_context_len + p.block_size - 1) / p.block_size);
  const int g = p.num_q_heads / p.num_kv_heads;
  const int ctas = p.num_seqs * p.num_kv_heads * ((g + 7) / 8);
  int splits = p.num_splits;
  if (splits <= 0) {
    // Split until there are ~4 CTAs per SM (the best of 1-128 splits in an H100 sweep at
    // batch 32-128, 2k-32k context), keeping at least 8 blocks (2 per warp) per split.
    const int target = 4 * std::max(p.num_sms, 1);
    splits = std::max(1, (target + ctas - 1) / std::max(ctas, 1));
    splits = std::min(splits, std::max(1, max_blocks / 8));
  }
  splits = std::min(splits, max_blocks);
  const int partition_blocks = (max_blocks + splits - 1) / splits;
  return {(max_blocks + partition_blocks - 1) / partition_blocks, partition_blocks};
}

template <typename T, int D, int G, int BS>
cudaError_t launch(const PagedDecodeParams& p, cudaStream_t stream) {
  const Plan pl = plan(p);
  const int group = p.num_q_heads / p.num_kv_heads;
  const int chunks = group > G ? group / G : 1;
  const int g_active = group > G ? G : group;
  dim3 grid(p.num_seqs, p.num_kv_heads * chunks, pl.splits);
  float* part_out = p.workspace;
  float* part_lse = pl.splits > 1 ? p.workspace + int64_t(p.num_seqs) * p.num_q_heads * pl.splits * D : nullptr;
  if (pl.splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  paged_decode_kernel<T, D, G, BS><<<grid, kWarps * 32, 0, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k_cache),
      static_cast<const T*>(p.v_cache), p.block_tables, p.block_table_stride, p.context_lens,
      p.num_q_heads, p.num_kv_heads, chunks, g_active, p.scale * kLog2e, pl.partition_blocks,
      static_cast<T*>(p.out), part_out, part_lse);
  if (pl.splits > 1) {
    combine_splits_kernel<T, D><<<p.num_seqs * p.num_q_heads, std::min(D, 128), 0, stream>>>(
        part_out, part_lse, p.context_lens, p.num_q_heads, pl.splits,
        pl.partition_blocks * p.block_size, static_cast<T*>(p.out));
  }
  return cudaGetLastError();
}

template <typename T, int D, int BS>
cudaError_t dispatch_group(const PagedDecodeParams& p, cudaStream_t stream) {
  switch (group_width(p.num_q_heads / p.num_kv_heads)) {
    case 1: return launch<T, D, 1, BS>(p, stream);
    case 2: return launch<T, D, 2, BS>(p, stream);
    case 4: return launch<T, D, 4, BS>(p, stream);
    default: return launch<T, D, 8, BS>(p, stream);
  }
}

template <typename T, int D>
cudaError_t dispatch_block(const PagedDecodeParams& p, cudaStream_t stream) {
  return p.block_size == 16 ? dispatch_group<T, D, 16>(p, stream)
                            : dispatch_group<T, D, 32>(p, stream);
}

}  // namespace

bool paged_decode_supported(int head_dim, int block_size, int num_q_heads, int num_kv_heads) {
  if (head_dim != 64 && head_dim != 128) return false;
  if (block_size != 16 && block_size != 32) return false;
  if (num_kv_heads <= 0 || num_q_heads % num_kv_heads != 0) return false;
  const int g = num_q_heads / num_kv_heads;
  return g <= 8 || g % 8 == 0;
}

int64_t paged_decode_workspace_floats(const PagedDecodeParams& p) {
  const Plan pl = plan(p);
  if (pl.splits <= 1) return 0;
  return int64_t(p.num_seqs) * p.num_q_heads * pl.splits * (p.head_dim + 1);
}

cudaError_t paged_decode(const PagedDecodeParams& p, cudaStream_t stream) {
  if (p.num_seqs == 0) return cudaSuccess;
  if (!paged_decode_supported(p.head_dim, p.block_size, p.num_q_heads, p.num_kv_heads))
    return cudaErrorInvalidValue;
  cudaError_t e = cudaErrorInvalidValue;
  FLASHPAGE_DISPATCH_DTYPE(p.dtype, T, {
    e = p.head_dim == 64 ? dispatch_block<T, 64>(p, stream) : dispatch_block<T, 128>(p, stream);
  });
  return e;
}

}  // namespace flashpage::cuda
