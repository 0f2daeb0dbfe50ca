// Sizing the paged KV cache from a memory budget: how many blocks, and whether a sequence of
// max_model_len fits at all (start-up fails with the numbers if not).
#pragma once

#include <cstdint>
#include <string>

namespace flashpage::engine {

struct KvCacheSpec {
  int64_t num_layers = 0, num_kv_heads = 0, head_dim = 0, block_size = 16;
  int64_t dtype_bytes = 2;  // 2 for bf16/fp16, 4 for fp32
};

struct KvCachePlan {
  int64_t bytes_per_token = 0;  // K and V of every layer
  int64_t bytes_per_block = 0;
  int64_t num_blocks = 0;
  int64_t budget_bytes = 0;
  int64_t max_model_len = 0;
  int64_t seqs_at_max_len = 0;  // sequences of max_model_len that fit at once
  std::string report() const;   // one line for the start-up log
};

// Throws std::invalid_argument for impossible specs, and std::runtime_error with the numbers
// when not even one sequence of max_model_len fits in the budget.
KvCachePlan plan_kv_cache(const KvCacheSpec& spec, int64_t budget_bytes, int64_t max_model_len);


}  // namespace flashpage::engine
