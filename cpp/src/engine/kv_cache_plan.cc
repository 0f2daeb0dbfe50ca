#include "engine/kv_cache_plan.h"

#include <cstdio>
#include <stdexcept>

namespace flashpage::engine {
namespace {

// Formatting goes through snprintf, not iostreams: iostream number formatting crashed in the
// extension on the GPU machine's toolchain (a libstdc++ locale problem), snprintf does not.
std::string mib(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MiB", double(bytes) / (1 << 20));
  return buf;
}

}  // namespace

std::string KvCachePlan::report() const {
  const int64_t block_tokens = bytes_per_token ? bytes_per_block / bytes_per_token : 0;
  return "KV cache: " + mib(budget_bytes) + " budget, " + std::to_string(bytes_per_token) +
         " bytes per token, " + std::to_string(num_blocks) + " blocks of " +
         std::to_string(block_tokens) + " tokens (" + std::to_string(num_blocks * block_tokens) +
         " tokens), " + std::to_string(seqs_at_max_len) + " sequences of max_model_len=" +
         std::to_string(max_model_len) + " at once";
}

KvCachePlan plan_kv_cache(const KvCacheSpec& s, int64_t budget_bytes, int64_t max_model_len) {
  if (s.num_layers <= 0 || s.num_kv_heads <= 0 || s.head_dim <= 0 || s.block_size <= 0 ||
      (s.dtype_bytes != 1 && s.dtype_bytes != 2 && s.dtype_bytes != 4))
    throw std::invalid_argument("plan_kv_cache: layers, kv heads, head_dim and block size must be "
                                "positive and the element size 1, 2 or 4 bytes");
  if (max_model_len <= 0) throw std::invalid_argument("plan_kv_cache: max_model_len must be positive");
  if (budget_bytes < 0) throw std::invalid_argument("plan_kv_cache: negative memory budget");
  KvCachePlan p;
  p.bytes_per_token = 2 * s.num_layers * s.num_kv_heads * s.head_dim * s.dtype_bytes;
  p.bytes_per_block = p.bytes_per_token * s.block_size;
  p.num_blocks = budget_bytes / p.bytes_per_block;
  p.budget_bytes = budget_bytes;
  p.max_model_len = max_model_len;
  const int64_t blocks_per_seq = (max_model_len + s.block_size - 1) / s.block_size;
  p.seqs_at_max_len = p.num_blocks / blocks_per_seq;
  if (p.seqs_at_max_len == 0)
    throw std::runtime_error(
        "KV cache too small: " + mib(budget_bytes) + " holds " + std::to_string(p.num_blocks) +
        " blocks (" + std::to_string(p.num_blocks * s.block_size) + " tokens at " +
        std::to_string(p.bytes_per_token) + " bytes per token), but max_model_len=" +
        std::to_string(max_model_len) + " needs " + std::to_string(blocks_per_seq) +
        " blocks (" + mib(blocks_per_seq * p.bytes_per_block) +
        "); lower max_model_len or raise the memory budget");
  return p;
}


}  // namespace flashpage::engine
