// flashpage — the paged KV-cache block manager.
//
// A pool of fixed-size KV blocks shared by all sequences. Full blocks are content-hashed
// (chained from the parent block's hash, the block's token ids and an extra key), so a new
// sequence whose prompt starts like an earlier one reuses that KV instead of recomputing it.
// Freed blocks that carry a hash stay reusable until evicted, least recently used first.
// Forked sequences share blocks; a shared, partially filled block is copied before either
// sequence writes into it (copy-on-write). Optionally, every change to the prefix cache is
// recorded as an event (blocks stored, blocks removed, all cleared) for routers that track
// which replica caches which prefix.
#pragma once

#include <cstdint>
#include <span>
#include <utility>
#include <vector>

namespace flashpage {

struct BlockManagerConfig {
  int32_t num_blocks = 0;
  int32_t block_size = 16;  // tokens per block
  bool enable_prefix_caching = true;
};

struct BlockManagerStats {
  int64_t num_blocks = 0;
  int64_t used_blocks = 0;         // ref count > 0
  int64_t free_blocks = 0;         // ref count == 0 (includes cached_free_blocks)
  int64_t cached_blocks = 0;       // registered in the prefix cache, used or free
  int64_t cached_free_blocks = 0;  // reusable prefix blocks that nobody holds right now
  int64_t prefix_queries = 0;      // tokens looked up in the prefix cache
  int64_t prefix_hits = 0;         // of those, tokens found cached
  int64_t waste_tokens = 0;        // unused slots in the last, partially filled blocks
};

// A copy of one block's KV into another, for copy-on-write; the executor performs it before
// the step's attention runs.
struct BlockCopy {
  int32_t src;
  int32_t dst;
};

enum class KvEventType : int8_t { kBlockStored = 0, kBlockRemoved = 1, kAllBlocksCleared = 2 };

// One change to the prefix cache (vLLM's BlockStored / BlockRemoved / AllBlocksCleared). A
// stored event is a run of blocks of one sequence, each the parent of the next: its hashes in
// order, the hash of the block before the first (0: the run starts the sequence) and the
// run's token ids, block_size per hash. Hashes are BlockManager::block_hash values.
struct KvEvent {
  KvEventType type;
  int32_t hash_begin = 0;   // into KvEventLog::hashes
  int32_t num_hashes = 0;
  int64_t token_begin = 0;  // stored: into KvEventLog::tokens
  uint64_t parent_hash = 0;
  uint64_t extra_key = 0;   // the key the blocks were hashed under (allocate_prefix)
};

// The events since the last clear, oldest first. Flat arrays that keep their capacity, so
// recording does not allocate once the log has grown to a step's worth of events.
struct KvEventLog {
  std::vector<KvEvent> events;
  std::vector<uint64_t> hashes;
  std::vector<int32_t> tokens;

  bool empty() const { return events.empty(); }
  void clear() {
    events.clear();
    hashes.clear();
    tokens.clear();
  }
  std::span<const uint64_t> hashes_of(const KvEvent& e) const {
    return {hashes.data() + e.hash_begin, static_cast<size_t>(e.num_hashes)};
  }
  std::span<const int32_t> tokens_of(const KvEvent& e, int32_t block_size) const {
    if (e.type != KvEventType::kBlockStored) return {};
    return {tokens.data() + e.token_begin, static_cast<size_t>(e.num_hashes) * block_size};
  }
};

// The blocks one sequence holds, in position order. Owned by the caller (one per sequence);
// only the BlockManager changes it.
class BlockTable {
 public:
  std::span<const int32_t> blocks() const { return blocks_; }
  int32_t num_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  // Tokens whose blocks are registered in the prefix cache (a multiple of the block size).
  int32_t num_cached_tokens() const { return num_hashed_ * block_size_; }
  bool empty() const { return blocks_.empty(); }
  // True after a fork until the next write: that write may need a copy-on-write block.
  bool may_share_tail() const { return may_share_tail_; }
  // Room for max_blocks without reallocating (so allocation in the step loop never mallocs).
  void reserve(int32_t max_blocks) {
    blocks_.reserve(max_blocks);
    hashes_.reserve(max_blocks);
  }

 private:
  friend class BlockManager;
  // Fields read at every step first, so a scheduler touching thousands of tables per step
  // reads one cache line of each.
  std::vector<int32_t> blocks_;
  int32_t num_hashed_ = 0;  // how many of blocks_ have been offered to the prefix cache
  int32_t block_size_ = 0;
  // Set by fork: a block this table writes into next may be shared and need a copy. Only
  // forks share partially filled blocks (prefix hits are full), so without this flag
  // allocation never looks at reference counts.
  bool may_share_tail_ = false;
  std::vector<uint64_t> hashes_;  // hashes of the first full blocks, in order
  uint64_t extra_key_ = 0;
};

class BlockManager {
 public:
  explicit BlockManager(const BlockManagerConfig& config);
  BlockManager(const BlockManager&) = delete;
  BlockManager& operator=(const BlockManager&) = delete;

  int32_t block_size() const { return config_.block_size; }
  int32_t num_blocks() const { return config_.num_blocks; }
  int32_t num_free_blocks() const { return num_free_; }

  // Starts `table` (which must be empty) on the longest cached prefix of `tokens`, always
  // leaving at least one token to compute so the caller gets logits. Returns the number of
  // tokens whose KV is already there (a multiple of the block size). `extra_key` separates
  // caches that must never mix (adapters).
  int32_t allocate_prefix(BlockTable& table, std::span<const int32_t> tokens,
                          uint64_t extra_key = 0);

  // Number of blocks allocate_slots(table, num_computed, num_new) would take from the pool.
  int32_t blocks_needed(const BlockTable& table, int32_t num_computed, int32_t num_new) const;

  // Makes positions [num_computed, num_computed + num_new) writable: appends blocks and
  // copies shared partial blocks (the copies are queued, see take_copies). All or nothing:
  // returns false, changing nothing, when the pool has too few free blocks.
  bool allocate_slots(BlockTable& table, int32_t num_computed, int32_t num_new);

  // Registers in the prefix cache every block that is full within tokens[0, num_computed)
  // (the KV of those tokens has been written).
  void cache_blocks(BlockTable& table, std::span<const int32_t> tokens, int32_t num_computed);

  struct CacheUpdate {
    BlockTable* table;
    std::span<const int32_t> tokens;
    int32_t num_computed;
  };
  // cache_blocks for many tables at once: hashes everything first, then registers, so the
  // cache misses of different tables overlap instead of queueing one behind the other.
  void cache_blocks_batch(std::span<const CacheUpdate> updates);

  // Shares every block of `parent` with `child` (which must be empty).
  void fork(BlockTable& parent, BlockTable& child);

  // Releases the table's blocks; cached ones stay reusable until evicted.
  void free(BlockTable& table);

  // Undoes allocate_prefix when the caller could not go on to allocate_slots: frees the table
  // and takes the lookup back out of the prefix-cache counters.
  void rollback_prefix(BlockTable& table, int32_t num_tokens, int32_t num_hit_tokens);

  // Copy-on-write copies queued since the last clear_copies().
  const std::vector<BlockCopy>& pending_copies() const { return copies_; }
  void clear_copies() { copies_.clear(); }

  // Forgets every cached block (an AllBlocksCleared event). Refused (false, nothing changes)
  // while any block is held: their tables still count on their hashes.
  bool reset_prefix_cache();

  // The event log: off by default, and then each place that would record costs one branch.
  // Turn it on before any block is cached (earlier blocks are never announced); turning it
  // off drops what was recorded. Whoever turns it on drains it (kv_events, clear_kv_events)
  // after every step, or it grows without bound.
  void set_kv_events_enabled(bool on);
  bool kv_events_enabled() const { return events_on_; }
  const KvEventLog& kv_events() const { return events_; }
  void clear_kv_events() { events_.clear(); }

  int32_t ref_count(int32_t block) const;
  bool is_cached(int32_t block) const;
  // The prefix-cache hash of a full block, or 0 if not registered.
  uint64_t block_hash(int32_t block) const;
  // Pool and prefix-cache counters; waste_tokens is filled in by the Scheduler, which knows
  // how many tokens each table holds.
  BlockManagerStats stats() const;

 private:
  static constexpr int32_t kNone = -1;
  struct Block {
    int32_t ref = 0;
    int32_t prev = kNone, next = kNone;  // free list links, valid while ref == 0
    bool hashed = false;
    uint64_t hash = 0;
    uint64_t parent_hash = 0;
    uint64_t extra_key = 0;
  };

  uint64_t hash_block(uint64_t parent, uint64_t extra_key, const int32_t* tokens) const;
  int32_t lookup(uint64_t hash, uint64_t parent, uint64_t extra_key, const int32_t* tokens) const;
  int32_t pop_free();  // evicts the least recently used free block
  void push_free_back(int32_t b);
  void push_free_front(int32_t b);
  void unlink_free(int32_t b);
  void uncache(int32_t b);
  void release(int32_t b);
  void record_stored(uint64_t hash, uint64_t parent, uint64_t extra_key, const int32_t* tokens);
  void record_removed(uint64_t hash, uint64_t extra_key);
  void check_block(int32_t b) const;
  // The prefix-cache index: an open-addressing table (linear probing, at most half full) from
  // block hash to block id. No allocation after construction, one cache miss per probe.
  struct IndexSlot {
    uint64_t hash = 0;  // 0 = empty
    int32_t block = -1;
  };
  size_t index_home(uint64_t hash) const { return static_cast<size_t>(hash) & index_mask_; }
  int32_t index_find(uint64_t hash) const;
  void index_insert(uint64_t hash, int32_t block);
  void index_erase(uint64_t hash);

  BlockManagerConfig config_;
  std::vector<Block> blocks_;
  std::vector<int32_t> block_tokens_;  // token ids of hashed blocks, for exact matching
  std::vector<IndexSlot> index_;
  size_t index_mask_ = 0;
  int32_t free_head_ = kNone, free_tail_ = kNone;
  int32_t num_free_ = 0;
  int64_t prefix_queries_ = 0, prefix_hits_ = 0;
  std::vector<BlockCopy> copies_;
  struct PendingBlock {
    const int32_t* tokens;
    uint64_t hash, parent, extra_key;
    int32_t block;
  };
  std::vector<PendingBlock> pending_;  // scratch for cache_blocks_batch
  bool events_on_ = false;
  KvEventLog events_;
};

}  // namespace flashpage
