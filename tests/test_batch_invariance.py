"""Batch invariance (always on): a sequence's logits are bitwise identical whatever shares its batch, however
its prompt is chunked, whether its prefix came from the cache, and whether it was preempted and
recomputed. On random-weight checkpoints (transformers writes them) and on stories260K; in fp32,
and in bf16 (bf16 arithmetic where the CPU has it: AMX tiles for the Linears and, at head_dim 32,
for attention)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from flashpage import LLM, SamplingParams, _core
from model_fixtures import STORIES, make_checkpoint, run_greedy

STEPS = 12


# (variant, dtype): each has 512 bytes of KV cache per token (the preemption test's sizing).
@pytest.fixture(scope="module", params=[("llama_gqa", "float32"), ("qwen2_bias", "float32"),
                                        ("qwen3_qk_norm", "bfloat16")], ids=lambda p: "-".join(p))
def ckpt(request, tmp_path_factory):
    variant, dtype = request.param
    return make_checkpoint(variant, str(tmp_path_factory.mktemp(variant))), dtype


def engine(ckpt: tuple[str, str], **kw) -> _core.Engine:
    path, dtype = ckpt
    return _core.Engine(path, dtype=dtype, **{"kv_cache_bytes": 16 << 20, "max_num_seqs": 32, **kw})


def prompts(n: int, seed: int = 0, lo: int = 3, hi: int = 70) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 320, size=int(rng.integers(lo, hi))).tolist() for _ in range(n)]


def assert_bitwise(a, b, what: str) -> None:
    (ta, la), (tb, lb) = a, b
    assert ta == tb, what
    assert len(la) == len(lb), what
    for i, (x, y) in enumerate(zip(la, lb)):
        assert np.array_equal(x, y), f"{what}: logits differ at sampled position {i}"


def test_batch_composition_does_not_change_logits(ckpt):
    ps = prompts(16)
    together = run_greedy(engine(ckpt), ps, STEPS)
    alone = engine(ckpt, enable_prefix_caching=False)
    for i, p in enumerate(ps):
        assert_bitwise(run_greedy(alone, [p], STEPS, first_id=1000 + i)[0], together[i], f"prompt {i}")


def test_chunked_prefill_equals_unchunked(ckpt):
    ps = prompts(4, seed=1, lo=40, hi=70)
    whole = run_greedy(engine(ckpt), ps, STEPS)
    chunked_engine = engine(ckpt, max_num_batched_tokens=8, max_num_seqs=4)
    chunked = run_greedy(chunked_engine, ps, STEPS)
    assert chunked_engine.scheduler.stats()["num_steps"] > len(ps) * 40 // 8  # it did chunk
    for i in range(len(ps)):
        assert_bitwise(chunked[i], whole[i], f"prompt {i}")


def test_prefix_cache_hit_equals_miss(ckpt):
    [p] = prompts(1, seed=2, lo=50, hi=51)
    eng = engine(ckpt)
    miss = run_greedy(eng, [p], STEPS, first_id=1)[0]
    hits_before = eng.scheduler.stats()["prefix_hits"]
    hit = run_greedy(eng, [p], STEPS, first_id=2)[0]
    assert eng.scheduler.stats()["prefix_hits"] - hits_before >= 48  # three full blocks reused
    assert_bitwise(hit, miss, "prefix hit")


def test_preempted_and_recomputed_equals_never_preempted(ckpt):
    ps = prompts(4, seed=3, lo=30, hi=40)
    roomy = run_greedy(engine(ckpt, max_model_len=128), ps, 60)
    # Room for 10 blocks of 16 tokens: four sequences growing to ~95 tokens cannot all fit.
    tight = engine(ckpt, max_model_len=128, kv_cache_bytes=10 * 16 * 512)
    preempted = run_greedy(tight, ps, 60)
    assert tight.scheduler.stats()["num_preemptions"] > 0
    for i in range(len(ps)):
        assert_bitwise(preempted[i], roomy[i], f"prompt {i}")
    assert tight.scheduler.stats()["used_blocks"] == 0  # nothing leaked


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
def test_sixteen_prompts_together_equal_each_alone():
    texts = ["Once upon a time", "The dog", "Lily had a red ball", "One day, Tom", "The sun was",
             "A little bird", "Mom said", "In the park", "There was a big tree", "Ben and Mia",
             "The cat was sad", "She found a box", "It was raining", "The boy ran", "A fish", "Sam"]
    sp = SamplingParams(temperature=0.0, max_tokens=48)
    llm = LLM(STORIES, kv_cache_memory_bytes=64 << 20)
    together = [o.outputs[0].token_ids for o in llm.generate(texts, sp)]
    alone = [llm.generate(t, sp)[0].outputs[0].token_ids for t in texts]
    assert together == alone
