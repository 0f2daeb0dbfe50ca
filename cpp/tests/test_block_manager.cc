#include <numeric>

#include "flashpage/block_manager.h"
#include "test_util.h"

using namespace flashpage;

namespace {
std::vector<int32_t> iota_tokens(int n, int start = 0) {
  std::vector<int32_t> v(n);
  std::iota(v.begin(), v.end(), start);
  return v;
}
}  // namespace

TEST(block_manager_allocates_and_frees) {
  BlockManager bm({8, 4, true});
  BlockTable t;
  CHECK(bm.allocate_slots(t, 0, 10));  // 3 blocks
  CHECK_EQ(t.num_blocks(), 3);
  CHECK_EQ(bm.num_free_blocks(), 5);
  CHECK(bm.allocate_slots(t, 10, 2));  // fits in block 3
  CHECK_EQ(t.num_blocks(), 3);
  CHECK(bm.allocate_slots(t, 12, 1));
  CHECK_EQ(t.num_blocks(), 4);
  CHECK(!bm.allocate_slots(t, 13, 100));  // all or nothing
  CHECK_EQ(t.num_blocks(), 4);
  bm.free(t);
  CHECK_EQ(bm.num_free_blocks(), 8);
  CHECK(t.empty());
}

TEST(block_manager_rejects_bad_config) {
  CHECK_THROWS(std::invalid_argument, BlockManager({0, 16, true}), "num_blocks");
  CHECK_THROWS(std::invalid_argument, BlockManager({4, 0, true}), "block_size");
}

TEST(block_manager_prefix_cache_hits_and_lru_eviction) {
  BlockManager bm({6, 4, true});
  const auto tokens = iota_tokens(13);  // 3 full blocks + 1 token
  BlockTable a;
  CHECK_EQ(bm.allocate_prefix(a, tokens), 0);
  REQUIRE(bm.allocate_slots(a, 0, 13));
  bm.cache_blocks(a, tokens, 13);
  CHECK(bm.is_cached(a.blocks()[0]) && bm.is_cached(a.blocks()[2]));
  CHECK(!bm.is_cached(a.blocks()[3]));
  const std::vector<int32_t> a_blocks(a.blocks().begin(), a.blocks().end());

  BlockTable b;  // same prompt: reuses the three full blocks, computes the last token
  CHECK_EQ(bm.allocate_prefix(b, tokens), 12);
  CHECK_EQ(bm.ref_count(a_blocks[0]), 2);
  CHECK(b.blocks()[0] == a_blocks[0] && b.blocks()[2] == a_blocks[2]);

  // A prompt of exactly two full blocks hits only the first: one token must be computed.
  BlockTable c;
  CHECK_EQ(bm.allocate_prefix(c, std::span(tokens).first(8)), 4);
  bm.free(c);
  bm.free(b);
  bm.free(a);
  auto st = bm.stats();
  CHECK_EQ(st.free_blocks, 6);
  CHECK_EQ(st.cached_free_blocks, 3);
  CHECK_EQ(st.prefix_queries, 13 + 13 + 8);
  CHECK_EQ(st.prefix_hits, 12 + 4);

  // Cached-free blocks survive until the pool needs them: uncached blocks go first, then the
  // chain's tail (freed in reverse order), so the chain's head is evicted last.
  BlockTable d;
  REQUIRE(bm.allocate_slots(d, 0, 20));  // 5 blocks: 3 uncached, then blocks 2 and 1 of the chain
  CHECK_EQ(bm.stats().cached_blocks, 1);
  CHECK(bm.is_cached(a_blocks[0]));
  bm.free(d);
  BlockTable e;
  CHECK_EQ(bm.allocate_prefix(e, tokens), 4);
  CHECK_EQ(e.blocks()[0], a_blocks[0]);
  bm.free(e);
}

TEST(block_manager_extra_key_separates_caches) {
  BlockManager bm({8, 4, true});
  const auto tokens = iota_tokens(9);
  BlockTable a, b;
  bm.allocate_prefix(a, tokens, 1);
  REQUIRE(bm.allocate_slots(a, 0, 9));
  bm.cache_blocks(a, tokens, 9);
  CHECK_EQ(bm.allocate_prefix(b, tokens, 2), 0);
  bm.free(b);
  BlockTable c;
  CHECK_EQ(bm.allocate_prefix(c, tokens, 1), 8);
  bm.free(c);
  bm.free(a);
}

TEST(block_manager_fork_copy_on_write) {
  BlockManager bm({8, 4, true});
  const auto tokens = iota_tokens(6);
  BlockTable parent, child;
  REQUIRE(bm.allocate_slots(parent, 0, 6));
  bm.cache_blocks(parent, tokens, 6);
  bm.fork(parent, child);
  CHECK_EQ(bm.ref_count(parent.blocks()[1]), 2);
  // The child writes position 6, inside the shared partial block: it gets a copy.
  CHECK_EQ(bm.blocks_needed(child, 6, 1), 1);
  REQUIRE(bm.allocate_slots(child, 6, 1));
  CHECK(child.blocks()[1] != parent.blocks()[1]);
  CHECK(child.blocks()[0] == parent.blocks()[0]);  // the full block stays shared
  REQUIRE(bm.pending_copies().size() == 1);
  CHECK_EQ(bm.pending_copies()[0].src, parent.blocks()[1]);
  CHECK_EQ(bm.pending_copies()[0].dst, child.blocks()[1]);
  bm.clear_copies();
  // The parent is now the only owner of its partial block: no copy.
  CHECK_EQ(bm.blocks_needed(parent, 6, 1), 0);
  REQUIRE(bm.allocate_slots(parent, 6, 1));
  CHECK(bm.pending_copies().empty());
  bm.free(child);
  bm.free(parent);
  CHECK_EQ(bm.num_free_blocks(), 8);
}

TEST(block_manager_kv_events_off_by_default) {
  BlockManager bm({4, 4, true});
  const auto tokens = iota_tokens(9);
  BlockTable a;
  REQUIRE(bm.allocate_slots(a, 0, 9));
  bm.cache_blocks(a, tokens, 9);
  bm.free(a);
  BlockTable b;
  REQUIRE(bm.allocate_slots(b, 0, 16));  // evicts both cached blocks
  bm.free(b);
  CHECK(!bm.kv_events_enabled());
  CHECK(bm.kv_events().empty());
}

TEST(block_manager_kv_events_stored_as_runs) {
  BlockManager bm({8, 4, true});
  bm.set_kv_events_enabled(true);
  const auto tokens = iota_tokens(13);  // 3 full blocks + 1 token
  BlockTable a;
  bm.allocate_prefix(a, tokens);
  REQUIRE(bm.allocate_slots(a, 0, 13));
  bm.cache_blocks(a, tokens, 4);   // block 0 ...
  bm.cache_blocks(a, tokens, 13);  // ... then blocks 1 and 2 extend the same run
  const KvEventLog& log = bm.kv_events();
  REQUIRE(log.events.size() == 1);
  const KvEvent& e = log.events[0];
  CHECK(e.type == KvEventType::kBlockStored);
  CHECK_EQ(e.parent_hash, uint64_t{0});
  CHECK_EQ(e.extra_key, uint64_t{0});
  REQUIRE(e.num_hashes == 3);
  for (int i = 0; i < 3; ++i) CHECK_EQ(log.hashes_of(e)[i], bm.block_hash(a.blocks()[i]));
  const auto toks = log.tokens_of(e, 4);
  CHECK(std::vector<int32_t>(toks.begin(), toks.end()) == std::vector<int32_t>(tokens.begin(), tokens.begin() + 12));
  const uint64_t h0 = bm.block_hash(a.blocks()[0]);
  bm.clear_kv_events();

  // A prompt sharing block 0: only its own blocks are announced, as a run whose parent is h0;
  // a hit and the partial block announce nothing.
  auto other = tokens;
  other[5] = 99;
  BlockTable b;
  CHECK_EQ(bm.allocate_prefix(b, other), 4);
  REQUIRE(bm.allocate_slots(b, 4, 9));
  bm.cache_blocks(b, other, 13);
  REQUIRE(bm.kv_events().events.size() == 1);
  const KvEvent& f = bm.kv_events().events[0];
  CHECK(f.type == KvEventType::kBlockStored);
  CHECK_EQ(f.parent_hash, h0);
  CHECK_EQ(f.num_hashes, 2);
  CHECK_EQ(bm.kv_events().hashes_of(f)[0], bm.block_hash(b.blocks()[1]));
  CHECK_EQ(bm.kv_events().tokens_of(f, 4)[1], 99);
  bm.free(b);
  bm.free(a);
  CHECK(bm.kv_events().events.size() == 1);  // freeing keeps blocks cached: no event

  // Keyed blocks carry their key.
  bm.clear_kv_events();
  BlockTable c;
  bm.allocate_prefix(c, tokens, 7);
  REQUIRE(bm.allocate_slots(c, 0, 5));
  bm.cache_blocks(c, tokens, 5);
  REQUIRE(bm.kv_events().events.size() == 1);
  CHECK_EQ(bm.kv_events().events[0].extra_key, uint64_t{7});
  bm.free(c);
}

TEST(block_manager_kv_events_removed_on_eviction) {
  BlockManager bm({4, 4, true});
  bm.set_kv_events_enabled(true);
  const auto tokens = iota_tokens(9);
  BlockTable a;
  REQUIRE(bm.allocate_slots(a, 0, 9));
  bm.cache_blocks(a, tokens, 9);
  const uint64_t h0 = bm.block_hash(a.blocks()[0]), h1 = bm.block_hash(a.blocks()[1]);
  bm.free(a);
  bm.clear_kv_events();
  // Three blocks: two uncached ones first, then the chain's tail (h1); h0 stays cached.
  BlockTable b;
  REQUIRE(bm.allocate_slots(b, 0, 12));
  REQUIRE(bm.kv_events().events.size() == 1);
  CHECK(bm.kv_events().events[0].type == KvEventType::kBlockRemoved);
  CHECK(bm.kv_events().hashes_of(bm.kv_events().events[0]).size() == 1);
  CHECK_EQ(bm.kv_events().hashes[0], h1);
  REQUIRE(bm.allocate_slots(b, 12, 4));  // the last block: h0 goes too, in the same event
  REQUIRE(bm.kv_events().events.size() == 1);
  CHECK_EQ(bm.kv_events().events[0].num_hashes, 2);
  CHECK_EQ(bm.kv_events().hashes[1], h0);
  CHECK(bm.kv_events().tokens.empty());
  bm.free(b);
  bm.set_kv_events_enabled(false);  // drops the log
  CHECK(bm.kv_events().empty());
}

TEST(block_manager_reset_prefix_cache) {
  BlockManager bm({4, 4, true});
  bm.set_kv_events_enabled(true);
  const auto tokens = iota_tokens(9);
  BlockTable a;
  REQUIRE(bm.allocate_slots(a, 0, 9));
  bm.cache_blocks(a, tokens, 9);
  CHECK(!bm.reset_prefix_cache());  // a still holds its blocks
  CHECK(bm.is_cached(a.blocks()[0]));
  bm.free(a);
  bm.clear_kv_events();
  CHECK(bm.reset_prefix_cache());
  REQUIRE(bm.kv_events().events.size() == 1);
  CHECK(bm.kv_events().events[0].type == KvEventType::kAllBlocksCleared);
  CHECK_EQ(bm.stats().cached_blocks, 0);
  BlockTable b;
  CHECK_EQ(bm.allocate_prefix(b, tokens), 0);
  REQUIRE(bm.allocate_slots(b, 0, 16));  // evicting forgotten blocks announces nothing
  CHECK_EQ(bm.kv_events().events.size(), size_t{1});
  bm.free(b);
  CHECK_EQ(bm.num_free_blocks(), 4);
}
