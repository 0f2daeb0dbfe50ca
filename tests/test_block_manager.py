"""BlockManager through the bindings: allocation, prefix caching, eviction order, CoW."""

import numpy as np
import pytest

from flashpage import BlockManager, BlockTable


def test_allocate_append_free():
    bm = BlockManager(num_blocks=8, block_size=4)
    t = BlockTable()
    assert bm.allocate_slots(t, 0, 10)
    assert len(t) == 3 and bm.num_free_blocks == 5
    assert bm.allocate_slots(t, 10, 2) and len(t) == 3
    assert not bm.allocate_slots(t, 12, 100)  # all or nothing
    assert len(t) == 3
    bm.free(t)
    assert bm.num_free_blocks == 8 and len(t) == 0


def test_bad_config_raises_with_the_field_name():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(num_blocks=0)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(num_blocks=4, block_size=0)


def test_prefix_hit_reuses_blocks_and_keeps_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    tokens = np.arange(12, dtype=np.int32)
    a = BlockTable()
    assert bm.allocate_prefix(a, tokens) == 0
    assert bm.allocate_slots(a, 0, 12)
    bm.cache_blocks(a, tokens, 12)
    assert all(bm.is_cached(b) for b in a.blocks)
    b = BlockTable()
    # 12 tokens = 3 full blocks, but one token must be computed: 2 blocks hit.
    assert bm.allocate_prefix(b, tokens) == 8
    assert b.blocks == a.blocks[:2]
    assert bm.ref_count(a.blocks[0]) == 2
    longer = np.arange(20, dtype=np.int32)
    c = BlockTable()
    assert bm.allocate_prefix(c, longer) == 12
    other = BlockTable()
    assert bm.allocate_prefix(other, longer, extra_key=5) == 0  # a different adapter
    stats = bm.stats()
    assert stats["prefix_queries"] == 12 + 12 + 20 + 20
    assert stats["prefix_hits"] == 8 + 12


def test_cached_blocks_survive_free_and_are_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    p1 = np.array([1, 2, 3, 4, 5], dtype=np.int32)
    t = BlockTable()
    bm.allocate_prefix(t, p1)
    assert bm.allocate_slots(t, 0, 5)
    bm.cache_blocks(t, p1, 5)
    bm.free(t)
    s = bm.stats()
    assert s["free_blocks"] == 4 and s["cached_free_blocks"] == 2
    t2 = BlockTable()
    assert bm.allocate_prefix(t2, p1) == 4  # still cached after free
    bm.free(t2)
    # Fill the pool with other content: cached blocks are evicted, tail of the chain first.
    t3 = BlockTable()
    assert bm.allocate_slots(t3, 0, 6)  # 3 blocks: the uncached one, then the chain's tail
    assert bm.stats()["cached_blocks"] == 1
    bm.free(t3)
    t4 = BlockTable()
    assert bm.allocate_prefix(t4, p1) == 2
    bm.free(t4)


def test_fork_copy_on_write_queues_one_copy():
    bm = BlockManager(num_blocks=8, block_size=4)
    parent, child = BlockTable(), BlockTable()
    assert bm.allocate_slots(parent, 0, 6)
    bm.fork(parent, child)
    assert child.blocks == parent.blocks
    assert bm.blocks_needed(child, 6, 1) == 1
    assert bm.allocate_slots(child, 6, 1)
    copies = bm.take_copies()
    assert copies == [(parent.blocks[1], child.blocks[1])]
    assert child.blocks[0] == parent.blocks[0]
    assert bm.allocate_slots(parent, 6, 1) and bm.take_copies() == []
    bm.free(parent)
    bm.free(child)
    assert bm.num_free_blocks == 8
