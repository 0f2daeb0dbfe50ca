#include "runtime/kv_cache_plan.h"

#include <fstream>
#include <sstream>
#include <stdexcept>

namespace flashpage::runtime {
namespace {

std::string mib(int64_t bytes) {
  std::ostringstream os;
  os.precision(1);
  os << std::fixed << double(bytes) / (1 << 20) << " MiB";
  return os.str();
}

}  // namespace

std::string KvCachePlan::report() const {
  std::ostringstream os;
  os << "KV cache: " << mib(budget_bytes) << " budget, " << bytes_per_token << " bytes per token, "
     << num_blocks << " blocks of " << (bytes_per_token ? bytes_per_block / bytes_per_token : 0)
     << " tokens (" << num_blocks * (bytes_per_token ? bytes_per_block / bytes_per_token : 0)
     << " tokens), " << seqs_at_max_len << " sequences of max_model_len=" << max_model_len
     << " at once";
  return os.str();
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

int64_t memory_budget_from_fraction(double fraction) {
  if (!(fraction > 0.0 && fraction <= 1.0))
    throw std::invalid_argument("memory fraction must be in (0, 1], got " + std::to_string(fraction));
  std::ifstream f("/proc/meminfo");
  std::string key;
  int64_t kb = 0;
  std::string unit;
  while (f >> key >> kb >> unit)
    if (key == "MemAvailable:") return static_cast<int64_t>(double(kb) * 1024 * fraction);
  throw std::runtime_error("/proc/meminfo: no MemAvailable line; give the KV cache a size in bytes");
}

}  // namespace flashpage::runtime
