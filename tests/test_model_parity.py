"""Our logits and greedy tokens against transformers (the reference), on random-weight tiny
checkpoints of every supported variant and on the real checkpoints in ../shared/models.

Tolerance for float32 logits: |ours - theirs| <= 1e-4 * max|theirs| + 1e-5. Both compute in
float32; they differ only in summation order (vectorised dot products, online softmax), whose
rounding error is ~sqrt(K) * 6e-8 relative per matmul (K <= 144 here) and grows by a small
factor over two layers and 33 positions — around 1e-6 relative. A real bug (a wrong rotary
frequency, a missing bias or norm, a head mapped to the wrong KV head) moves logits by 1e-2 or
more, so 1e-4 has two orders of margin on both sides.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from flashpage import LLM, SamplingParams, _core
from model_fixtures import (STORIES, VARIANTS, hf_greedy, hf_model, make_checkpoint,
                            run_greedy, transformers_or_skip)

PROMPT = [1, 17, 233, 5, 99, 42, 7, 180, 64, 3, 250, 11, 12, 13, 301, 8, 77, 78, 79, 2, 150, 151,
          152, 9, 10, 300, 299, 298, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33]
DECODE_STEPS = 32


def assert_logits_close(ours: np.ndarray, theirs: np.ndarray, rel: float, what: str) -> None:
    scale = float(np.abs(theirs).max())
    err = float(np.abs(ours - theirs).max())
    assert err <= rel * scale + 1e-5, f"{what}: max |diff| {err:.3g} vs max |logit| {scale:.3g}"


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant_dir(request, tmp_path_factory):
    return make_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def test_prompt_and_decode_logits_match_transformers(variant_dir):
    ref_tokens, ref_logits = hf_greedy(hf_model(variant_dir), PROMPT, DECODE_STEPS + 1)
    engine = _core.Engine(variant_dir, dtype="float32", kv_cache_bytes=32 << 20, max_num_seqs=8)
    # Feed transformers' tokens so both sides see the same sequence even at near-ties.
    [(tokens, logits)] = run_greedy(engine, [PROMPT], DECODE_STEPS + 1, feed=[ref_tokens])
    assert len(logits) == DECODE_STEPS + 1
    for i, (a, b) in enumerate(zip(logits, ref_logits)):
        assert_logits_close(a, b, 1e-4, f"{os.path.basename(variant_dir)} position {len(PROMPT) + i}")
    assert tokens == ref_tokens


def test_bf16_checkpoint_in_its_own_dtype_and_widened(tmp_path):
    torch, _ = transformers_or_skip()
    path = make_checkpoint("llama_gqa", str(tmp_path / "bf16"), dtype="bfloat16")
    ref_tokens, ref_logits = hf_greedy(hf_model(path), PROMPT, 9)
    # Widened to float32 at load: as exact as the float32 checkpoints.
    e32 = _core.Engine(path, dtype="float32", kv_cache_bytes=32 << 20, max_num_seqs=8)
    assert e32.info["dtype"] == "float32" and e32.info["weight_bytes_owned"] > 0
    [(_, logits)] = run_greedy(e32, [PROMPT], 9, feed=[ref_tokens])
    for a, b in zip(logits, ref_logits):
        assert_logits_close(a, b, 1e-4, "bf16 checkpoint widened")
    # Its own dtype: the embedding table read in place (the Linear weights are repacked), K/V
    # stored in bf16 (8 mantissa bits: ~0.4% per
    # value, averaged over the attention sum), so a looser 3e-2.
    e16 = _core.Engine(path, dtype="auto", kv_cache_bytes=32 << 20, max_num_seqs=8)
    assert e16.info["dtype"] == "bfloat16" and e16.info["weight_bytes_mapped"] > 0
    [(_, logits)] = run_greedy(e16, [PROMPT], 9, feed=[ref_tokens])
    for a, b in zip(logits, ref_logits):
        assert_logits_close(a, b, 3e-2, "bf16 checkpoint in bf16")


def _greedy_parity(model_dir: str, prompts: list[str], steps: int = 64) -> None:
    ref = hf_model(model_dir)
    llm = LLM(model_dir, dtype="float32", kv_cache_memory_bytes=256 << 20, max_num_seqs=16, max_model_len=512)
    ids = [llm.get_tokenizer().encode(p) for p in prompts]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                        SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True))
    for p, i, out in zip(prompts, ids, outs):
        want, _ = hf_greedy(ref, i, steps)
        assert out.outputs[0].token_ids == want, f"prompt {p!r}"
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
def test_stories260k_greedy_matches_transformers():
    _greedy_parity(STORIES, ["Once upon a time", "Lily and Ben went to the park", "The cat", "One day"])


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
def test_stories260k_text_matches_the_known_continuation():
    llm = LLM(STORIES, kv_cache_memory_bytes=64 << 20)
    [out] = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=28))
    assert out.outputs[0].text.startswith(", there was a little girl named Lily. She loved to play outside in the park.")
    assert out.prompt == "Once upon a time" and out.prompt_token_ids[0] == 1  # BOS from tokenizer.json


def test_smollm2_greedy_matches_transformers(smollm_dir):
    _greedy_parity(smollm_dir, ["Once upon a time", "The capital of France is", "def fibonacci(n):"])
