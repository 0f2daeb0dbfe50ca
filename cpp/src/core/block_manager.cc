#include "flashpage/block_manager.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>
#include <string>

namespace flashpage {
namespace {

// splitmix64's finalizer: a cheap full-avalanche mix, so chained block hashes do not collide
// in practice; lookups still compare tokens exactly.
inline uint64_t mix64(uint64_t x) {
  x ^= x >> 30;
  x *= 0xbf58476d1ce4e5b9ULL;
  x ^= x >> 27;
  x *= 0x94d049bb133111ebULL;
  x ^= x >> 31;
  return x;
}

}  // namespace

BlockManager::BlockManager(const BlockManagerConfig& config) : config_(config) {
  if (config.num_blocks <= 0)
    throw std::invalid_argument("BlockManager: num_blocks must be positive, got " +
                                std::to_string(config.num_blocks));
  if (config.block_size <= 0 || config.block_size > 1024)
    throw std::invalid_argument("BlockManager: block_size must be in [1, 1024], got " +
                                std::to_string(config.block_size));
  blocks_.resize(config.num_blocks);
  if (config.enable_prefix_caching) {
    block_tokens_.resize(static_cast<size_t>(config.num_blocks) * config.block_size);
    size_t cap = 16;
    while (cap < static_cast<size_t>(config.num_blocks) * 2) cap <<= 1;
    index_.resize(cap);
    index_mask_ = cap - 1;
  }
  for (int32_t b = 0; b < config.num_blocks; ++b) push_free_back(b);
}

uint64_t BlockManager::hash_block(uint64_t parent, uint64_t extra_key,
                                  const int32_t* tokens) const {
  uint64_t h = mix64(parent ^ 0x9e3779b97f4a7c15ULL) ^ mix64(extra_key + 0x632be59bd9b4e019ULL);
  const int32_t bs = config_.block_size;
  int32_t i = 0;
  for (; i + 1 < bs; i += 2) {
    const uint64_t pair = (static_cast<uint64_t>(static_cast<uint32_t>(tokens[i])) << 32) |
                          static_cast<uint32_t>(tokens[i + 1]);
    h = mix64(h ^ pair) + 0x9e3779b97f4a7c15ULL;
  }
  if (i < bs) h = mix64(h ^ static_cast<uint32_t>(tokens[i]));
  return h == 0 ? 1 : h;  // 0 means "no hash"
}

int32_t BlockManager::lookup(uint64_t hash, uint64_t parent, uint64_t extra_key,
                             const int32_t* tokens) const {
  const int32_t b = index_find(hash);
  if (b == kNone) return kNone;
  const Block& blk = blocks_[b];
  const size_t bs = config_.block_size;
  if (blk.parent_hash != parent || blk.extra_key != extra_key ||
      std::memcmp(&block_tokens_[b * bs], tokens, bs * sizeof(int32_t)) != 0)
    return kNone;
  return b;
}

int32_t BlockManager::index_find(uint64_t hash) const {
  for (size_t i = index_home(hash);; i = (i + 1) & index_mask_) {
    const IndexSlot& s = index_[i];
    if (s.hash == hash) return s.block;
    if (s.hash == 0) return kNone;
  }
}

void BlockManager::index_insert(uint64_t hash, int32_t block) {
  size_t i = index_home(hash);
  while (index_[i].hash != 0) i = (i + 1) & index_mask_;
  index_[i] = {hash, block};
}

void BlockManager::index_erase(uint64_t hash) {
  size_t i = index_home(hash);
  while (index_[i].hash != hash) {
    if (index_[i].hash == 0) return;
    i = (i + 1) & index_mask_;
  }
  // Backward-shift deletion keeps every probe chain unbroken without tombstones.
  for (size_t j = (i + 1) & index_mask_; index_[j].hash != 0; j = (j + 1) & index_mask_) {
    const size_t home = index_home(index_[j].hash);
    // Move j into the hole at i unless its home lies cyclically in (i, j].
    const bool stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
    if (stays) continue;
    index_[i] = index_[j];
    i = j;
  }
  index_[i] = IndexSlot{};
}

void BlockManager::push_free_back(int32_t b) {
  Block& blk = blocks_[b];
  blk.prev = free_tail_;
  blk.next = kNone;
  if (free_tail_ != kNone) blocks_[free_tail_].next = b; else free_head_ = b;
  free_tail_ = b;
  ++num_free_;
}

void BlockManager::push_free_front(int32_t b) {
  Block& blk = blocks_[b];
  blk.prev = kNone;
  blk.next = free_head_;
  if (free_head_ != kNone) blocks_[free_head_].prev = b; else free_tail_ = b;
  free_head_ = b;
  ++num_free_;
}

void BlockManager::unlink_free(int32_t b) {
  Block& blk = blocks_[b];
  if (blk.prev != kNone) blocks_[blk.prev].next = blk.next; else free_head_ = blk.next;
  if (blk.next != kNone) blocks_[blk.next].prev = blk.prev; else free_tail_ = blk.prev;
  blk.prev = blk.next = kNone;
  --num_free_;
}

void BlockManager::uncache(int32_t b) {
  Block& blk = blocks_[b];
  if (!blk.hashed) return;
  if (events_on_) record_removed(blk.hash, blk.extra_key);
  if (index_find(blk.hash) == b) index_erase(blk.hash);
  blk.hashed = false;
  blk.hash = 0;
}

int32_t BlockManager::pop_free() {
  const int32_t b = free_head_;  // callers check num_free_ first
  unlink_free(b);
  uncache(b);  // evicting a cached-free block: its KV is about to be overwritten
  blocks_[b].ref = 1;
  return b;
}

void BlockManager::release(int32_t b) {
  Block& blk = blocks_[b];
  if (--blk.ref > 0) return;
  // Cached blocks join the LRU tail; blocks nobody can reuse are handed out first.
  if (blk.hashed) push_free_back(b); else push_free_front(b);
}

void BlockManager::check_block(int32_t b) const {
  if (b < 0 || b >= config_.num_blocks)
    throw std::out_of_range("BlockManager: block id " + std::to_string(b) + " outside [0, " +
                            std::to_string(config_.num_blocks) + ")");
}

int32_t BlockManager::allocate_prefix(BlockTable& table, std::span<const int32_t> tokens,
                                      uint64_t extra_key) {
  if (!table.empty())
    throw std::logic_error("BlockManager::allocate_prefix: the table already holds blocks");
  table.block_size_ = config_.block_size;
  table.extra_key_ = extra_key;
  table.hashes_.clear();
  table.num_hashed_ = 0;
  if (!config_.enable_prefix_caching || tokens.empty()) return 0;
  const int32_t bs = config_.block_size;
  // At least one token is left to compute, so the step yields logits for this sequence.
  const int32_t max_blocks = static_cast<int32_t>((tokens.size() - 1) / bs);
  uint64_t parent = 0;
  for (int32_t i = 0; i < max_blocks; ++i) {
    const int32_t* tok = tokens.data() + static_cast<size_t>(i) * bs;
    const uint64_t h = hash_block(parent, extra_key, tok);
    const int32_t b = lookup(h, parent, extra_key, tok);
    if (b == kNone) break;
    if (blocks_[b].ref == 0) unlink_free(b);
    ++blocks_[b].ref;
    table.blocks_.push_back(b);
    table.hashes_.push_back(h);
    parent = h;
  }
  table.num_hashed_ = table.num_blocks();
  const int32_t hit = table.num_blocks() * bs;
  prefix_queries_ += static_cast<int64_t>(tokens.size());
  prefix_hits_ += hit;
  return hit;
}

void BlockManager::rollback_prefix(BlockTable& table, int32_t num_tokens, int32_t num_hit_tokens) {
  free(table);
  if (config_.enable_prefix_caching && num_tokens > 0) {
    prefix_queries_ -= num_tokens;
    prefix_hits_ -= num_hit_tokens;
  }
}

int32_t BlockManager::blocks_needed(const BlockTable& table, int32_t num_computed,
                                    int32_t num_new) const {
  if (num_new <= 0) return 0;
  const int32_t bs = config_.block_size;
  const int32_t have = table.num_blocks();
  const int32_t want = (num_computed + num_new + bs - 1) / bs;
  int32_t need = std::max(0, want - have);
  if (!table.may_share_tail_) return need;
  for (int32_t i = num_computed / bs; i < std::min(have, want); ++i)
    if (blocks_[table.blocks_[i]].ref > 1) ++need;  // shared and about to be written: copy
  return need;
}

bool BlockManager::allocate_slots(BlockTable& table, int32_t num_computed, int32_t num_new) {
  if (num_computed < 0 || num_new < 0)
    throw std::invalid_argument("BlockManager::allocate_slots: negative token count");
  if (num_new == 0) return true;
  if (blocks_needed(table, num_computed, num_new) > num_free_) return false;
  table.block_size_ = config_.block_size;
  const int32_t bs = config_.block_size;
  const int32_t have = table.num_blocks();
  const int32_t want = (num_computed + num_new + bs - 1) / bs;
  if (table.may_share_tail_) {
    for (int32_t i = num_computed / bs; i < std::min(have, want); ++i) {
      const int32_t old = table.blocks_[i];
      if (blocks_[old].ref <= 1) continue;
      const int32_t fresh = pop_free();
      copies_.push_back({old, fresh});
      --blocks_[old].ref;  // still > 0: the other owners keep it
      table.blocks_[i] = fresh;
    }
    // Every block from here on is private; blocks before num_computed are never written.
    table.may_share_tail_ = false;
  }
  for (int32_t i = have; i < want; ++i) table.blocks_.push_back(pop_free());
  return true;
}

void BlockManager::cache_blocks(BlockTable& table, std::span<const int32_t> tokens,
                                int32_t num_computed) {
  const CacheUpdate one{&table, tokens, num_computed};
  cache_blocks_batch({&one, 1});
}

void BlockManager::cache_blocks_batch(std::span<const CacheUpdate> updates) {
  if (!config_.enable_prefix_caching) return;
  const int32_t bs = config_.block_size;
  // Pass 1: extend each table's hash chain over its newly full blocks, and prefetch where
  // pass 2 will look (the index slot, the block's entry).
  pending_.clear();
  constexpr size_t kAhead = 4;
  for (size_t k = 0; k < updates.size(); ++k) {
    if (k + kAhead < updates.size()) {  // the chain's last hash and the next block's id
      const BlockTable& next = *updates[k + kAhead].table;
      if (next.num_hashed_ > 0) __builtin_prefetch(next.hashes_.data() + next.num_hashed_ - 1);
      __builtin_prefetch(next.blocks_.data() + next.num_hashed_);
    }
    if (k + 2 * kAhead < updates.size()) __builtin_prefetch(updates[k + 2 * kAhead].table);
    const CacheUpdate& u = updates[k];
    BlockTable& table = *u.table;
    const int32_t full = std::min<int32_t>(
        std::min<int32_t>(u.num_computed, static_cast<int32_t>(u.tokens.size())) / bs,
        table.num_blocks());
    for (int32_t i = table.num_hashed_; i < full; ++i) {
      const int32_t* tok = u.tokens.data() + static_cast<size_t>(i) * bs;
      const uint64_t parent = i > 0 ? table.hashes_[i - 1] : 0;
      if (i >= static_cast<int32_t>(table.hashes_.size()))
        table.hashes_.push_back(hash_block(parent, table.extra_key_, tok));
      const uint64_t h = table.hashes_[i];
      const int32_t b = table.blocks_[i];
      __builtin_prefetch(&index_[index_home(h)]);
      __builtin_prefetch(&blocks_[b]);
      pending_.push_back({tok, h, parent, table.extra_key_, b});
    }
    table.num_hashed_ = std::max(table.num_hashed_, full);
  }
  // Pass 2: register. A block already hashed is shared with a fork or was a cache hit; a
  // hash already present is a duplicate of this content (which stays private) or, with
  // astronomically low odds, a 64-bit collision (the first owner keeps the hash).
  for (const PendingBlock& p : pending_) {
    Block& blk = blocks_[p.block];
    if (blk.hashed || index_find(p.hash) != kNone) continue;
    blk.hashed = true;
    blk.hash = p.hash;
    blk.parent_hash = p.parent;
    blk.extra_key = p.extra_key;
    std::memcpy(&block_tokens_[static_cast<size_t>(p.block) * bs], p.tokens, bs * sizeof(int32_t));
    index_insert(p.hash, p.block);  // the probe chain is in cache from index_find
    if (events_on_) record_stored(p.hash, p.parent, p.extra_key, p.tokens);
  }
}

void BlockManager::record_stored(uint64_t hash, uint64_t parent, uint64_t extra_key,
                                 const int32_t* tokens) {
  // A block whose parent is the last block recorded extends that run: one event per run of a
  // sequence's newly cached blocks, as vLLM sends them.
  KvEvent* last = events_.events.empty() ? nullptr : &events_.events.back();
  if (last == nullptr || last->type != KvEventType::kBlockStored || last->extra_key != extra_key ||
      parent == 0 || events_.hashes.back() != parent) {
    events_.events.push_back({KvEventType::kBlockStored, static_cast<int32_t>(events_.hashes.size()), 0,
                              static_cast<int64_t>(events_.tokens.size()), parent, extra_key});
    last = &events_.events.back();
  }
  events_.hashes.push_back(hash);
  events_.tokens.insert(events_.tokens.end(), tokens, tokens + config_.block_size);
  ++last->num_hashes;
}

void BlockManager::record_removed(uint64_t hash, uint64_t extra_key) {
  KvEvent* last = events_.events.empty() ? nullptr : &events_.events.back();
  if (last == nullptr || last->type != KvEventType::kBlockRemoved || last->extra_key != extra_key) {
    events_.events.push_back({KvEventType::kBlockRemoved, static_cast<int32_t>(events_.hashes.size()), 0,
                              0, 0, extra_key});
    last = &events_.events.back();
  }
  events_.hashes.push_back(hash);
  ++last->num_hashes;
}

void BlockManager::set_kv_events_enabled(bool on) {
  events_on_ = on;
  if (!on) events_.clear();
}

bool BlockManager::reset_prefix_cache() {
  if (num_free_ != config_.num_blocks) return false;
  for (Block& blk : blocks_) {
    blk.hashed = false;
    blk.hash = blk.parent_hash = blk.extra_key = 0;
  }
  std::fill(index_.begin(), index_.end(), IndexSlot{});
  if (events_on_)
    events_.events.push_back({KvEventType::kAllBlocksCleared, static_cast<int32_t>(events_.hashes.size()),
                              0, static_cast<int64_t>(events_.tokens.size()), 0, 0});
  return true;
}

void BlockManager::fork(BlockTable& parent, BlockTable& child) {
  if (!child.empty()) throw std::logic_error("BlockManager::fork: the child table is not empty");
  child = parent;
  child.reserve(static_cast<int32_t>(parent.blocks_.capacity()));
  for (int32_t b : child.blocks_) ++blocks_[b].ref;
  parent.may_share_tail_ = child.may_share_tail_ = true;
}

void BlockManager::free(BlockTable& table) {
  // Reverse order: a sequence's tail blocks are the least likely to be shared, so they are
  // evicted before its head blocks.
  for (auto it = table.blocks_.rbegin(); it != table.blocks_.rend(); ++it) release(*it);
  table.blocks_.clear();
  table.hashes_.clear();
  table.num_hashed_ = 0;
  table.may_share_tail_ = false;
}

int32_t BlockManager::ref_count(int32_t block) const {
  check_block(block);
  return blocks_[block].ref;
}

bool BlockManager::is_cached(int32_t block) const {
  check_block(block);
  return blocks_[block].hashed;
}

uint64_t BlockManager::block_hash(int32_t block) const {
  check_block(block);
  return blocks_[block].hashed ? blocks_[block].hash : 0;
}

BlockManagerStats BlockManager::stats() const {
  BlockManagerStats s;
  s.num_blocks = config_.num_blocks;
  s.free_blocks = num_free_;
  s.used_blocks = config_.num_blocks - num_free_;
  for (const Block& blk : blocks_) {
    if (!blk.hashed) continue;
    ++s.cached_blocks;
    if (blk.ref == 0) ++s.cached_free_blocks;
  }
  s.prefix_queries = prefix_queries_;
  s.prefix_hits = prefix_hits_;
  return s;
}

}  // namespace flashpage
