"""KV-cache sizing from a memory budget, and the start-up failure when max_model_len cannot fit."""

import pytest

from flashpage import _core

# TinyLlama-1.1B: 22 layers, 4 KV heads, head dim 64, bf16.
TINY = dict(num_layers=22, num_kv_heads=4, head_dim=64, block_size=16, dtype_bytes=2)


def test_plan_from_bytes():
    p = _core.plan_kv_cache(**TINY, max_model_len=2048, budget_bytes=1 << 30)
    assert p["bytes_per_token"] == 2 * 22 * 4 * 64 * 2 == 22528
    assert p["bytes_per_block"] == 16 * 22528
    assert p["num_blocks"] == (1 << 30) // (16 * 22528)
    assert p["seqs_at_max_len"] == p["num_blocks"] // 128
    assert "22528 bytes per token" in p["report"] and "max_model_len=2048" in p["report"]


def test_plan_from_fraction_of_available_memory():
    p = _core.plan_kv_cache(**TINY, max_model_len=256, memory_fraction=0.01)
    assert p["num_blocks"] > 0 and p["budget_bytes"] > 0
    with pytest.raises(ValueError, match="fraction must be in \\(0, 1\\]"):
        _core.plan_kv_cache(**TINY, max_model_len=256, memory_fraction=1.5)


def test_max_model_len_that_cannot_fit_fails_with_the_numbers():
    with pytest.raises(RuntimeError, match=r"holds 2 blocks \(32 tokens at 22528 bytes per token\), "
                                           r"but max_model_len=4096 needs 256 blocks"):
        _core.plan_kv_cache(**TINY, max_model_len=4096, budget_bytes=2 * 16 * 22528 + 5)


def test_impossible_specs_are_refused():
    with pytest.raises(ValueError, match="element size"):
        _core.plan_kv_cache(**{**TINY, "dtype_bytes": 3}, max_model_len=16, budget_bytes=1 << 20)
    with pytest.raises(ValueError, match="budget_bytes or memory_fraction"):
        _core.plan_kv_cache(**TINY, max_model_len=16)
