// The KV-cache layout of bf16 pairs that every vector level keeps for bf16 caches of common
// shapes, and paged attention with bf16 dot products over it: on AMX tiles (attention_amx.cc, the
// amx level) or with vdpbf16ps (attention_bf16.cc, the avx512_bf16 level).
// Include only from sources compiled per ISA level.
#pragma once

#include <cstdint>

#include "kernels/cpu/kernels.h"

namespace flashpage::cpu::FLASHPAGE_ISA {

// Whether bf16 caches of this shape are kept in the pair layout: head_dim a multiple of 32 (and
// at most 256) and blocks a multiple of 16 tokens. Within each [block, kv_head] of
// block_size x head_dim values (the standard layout's size and place):
//   K: [head_dim / 2][block_size][2] — 16 consecutive tokens' (d, d + 1) pairs side by side:
//      one vector load is K^T's rows d and d + 1 for 16 keys (the vector kernels' scores need
//      no transposition), and the B tile of Q . K^T is 16 rows of 64 bytes, one per pair of d;
//   V: [block_size / 2][head_dim][2] — (token, token + 1) pairs for each d: one vector load is
//      V's rows of two tokens, and the B tile of P . V.
// Other shapes (and fp32 caches, and the scalar reference) keep the standard
// [block_size][head_dim] layout.
inline bool kv_pair_layout(bool kv_bf16, int64_t head_dim, int64_t block_size) {
  return kv_bf16 && head_dim % 32 == 0 && head_dim <= 256 && block_size % 16 == 0;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FLASHPAGE_ATTENTION_TILES 1
void paged_attention_tiles(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end);
#elif defined(__AVX512BF16__)
// The same arithmetic with vdpbf16ps in vector registers (attention_bf16.cc, avx512_bf16).
#define FLASHPAGE_ATTENTION_PAIRS_BF16 1
void paged_attention_pairs_bf16(const PagedAttentionArgs& a, int64_t seq_begin, int64_t seq_end);
#endif

}  // namespace flashpage::cpu::FLASHPAGE_ISA
