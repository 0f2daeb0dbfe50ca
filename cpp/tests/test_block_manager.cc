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
