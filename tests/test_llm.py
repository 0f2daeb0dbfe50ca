"""The offline API end to end on real checkpoints: the vLLM quick start, n > 1 forks that share
the prompt's KV blocks, stop strings and stop ids, logprobs and prompt logprobs (against
transformers), chat, aborts, and bad requests."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest

from flashpage import LLM, SamplingParams
from model_fixtures import STORIES

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")

GREEDY_TEXT = ", there was a little girl named Lily. She loved to play outside in the park."


@pytest.fixture(scope="module")
def llm():
    return LLM(STORIES, kv_cache_memory_bytes=64 << 20, block_size=16, verbose=False)


def test_vllm_quickstart_runs_with_only_the_import_and_model_changed(tmp_path):
    # vLLM's quick start (docs.vllm.ai, "Offline Batched Inference"), verbatim but for the two lines.
    script = f'''
from flashpage import LLM, SamplingParams

prompts = [
    "Hello, my name is",
    "The president of the United States is",
    "The capital of France is",
    "The future of AI is",
]
sampling_params = SamplingParams(temperature=0.8, top_p=0.95)

llm = LLM(model={STORIES!r})

outputs = llm.generate(prompts, sampling_params)

for output in outputs:
    prompt = output.prompt
    generated_text = output.outputs[0].text
    print(f"Prompt: {{prompt!r}}, Generated text: {{generated_text!r}}")
'''
    path = tmp_path / "quickstart.py"
    path.write_text(script)
    run = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [line for line in run.stdout.splitlines() if line.startswith("Prompt: ")]
    assert len(lines) == 4 and all("Generated text: '" in line or 'Generated text: "' in line for line in lines)
    assert "Processed prompts" in run.stderr  # the progress bar


def test_greedy_text_and_finish(llm):
    [out] = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    comp = out.outputs[0]
    assert GREEDY_TEXT.startswith(comp.text) and len(comp.token_ids) == 20
    assert comp.finish_reason == "length" and comp.stop_reason is None and out.finished
    assert comp.cumulative_logprob is None and comp.logprobs is None  # not asked for


def test_n_forks_share_the_prompt_blocks_and_equal_separate_seeded_requests(llm):
    engine = llm.llm_engine
    prompt = llm.get_tokenizer().encode("Once upon a time there was a big dog who liked to run and jump in "
                                        "the park with his friends every day")
    assert len(prompt) > 32  # two full blocks of 16 and part of a third
    params = SamplingParams(n=4, temperature=1.0, seed=11, max_tokens=12)
    engine.add_request("forks", {"prompt_token_ids": prompt}, params)
    sched = engine.scheduler
    while len(engine._requests["forks"].seqs[0].output.token_ids) == 0:
        engine.step()
    tables = [sched.block_table(s.core_id) for s in engine._requests["forks"].seqs]
    for t in tables[1:]:
        assert t[:2] == tables[0][:2]  # the prompt's full blocks: shared, not copied
    assert all(sched.block_manager.ref_count(b) == 4 for b in tables[0][:2])
    outs = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            outs = o
    assert outs is not None and outs.finished and len(outs.outputs) == 4
    assert sched.stats()["used_blocks"] == 0
    # Fork i samples with seed + i (as vLLM): equal to a request of its own with that seed,
    # so the forks' copy-on-write KV cache gives exactly the logits of an unshared one.
    for i, comp in enumerate(outs.outputs):
        alone = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=1.0, seed=11 + i, max_tokens=12),
                             use_tqdm=False)[0].outputs[0]
        assert comp.token_ids == alone.token_ids and comp.text == alone.text and comp.index == i
    assert len({tuple(c.token_ids) for c in outs.outputs}) > 1


@pytest.mark.parametrize("stop,include,want_text", [
    (["Lily"], False, ", there was a little girl named "),
    (["Lily"], True, ", there was a little girl named Lily"),
    (["girl na"], False, ", there was a little "),  # straddles " girl" and " named"
    (["park", "little"], False, ", there was a "),  # the earliest in the text wins
])
def test_stop_strings(llm, stop, include, want_text):
    sp = SamplingParams(temperature=0, max_tokens=40, stop=stop, include_stop_str_in_output=include)
    comp = llm.generate("Once upon a time", sp, use_tqdm=False)[0].outputs[0]
    assert comp.text == want_text
    assert comp.finish_reason == "stop" and comp.stop_reason in stop
    assert len(comp.token_ids) < 40
    assert llm.llm_engine.scheduler.stats()["used_blocks"] == 0


def test_stop_strings_wait_for_min_tokens_and_streamed_text_never_shows_them(llm):
    comp = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop=[","], min_tokens=3),
                        use_tqdm=False)[0].outputs[0]
    assert comp.text == ", there was a little girl named Lily. She loved to play outside in the park. One day"
    engine = llm.llm_engine
    engine.add_request("s", "Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop=["little girl"]))
    seen = []
    while engine.has_unfinished_requests():
        seen += [o.outputs[0].text for o in engine.step()]
    final = seen[-1]
    assert final == ", there was a "
    assert all(final.startswith(t) or t.startswith(final) for t in seen)
    assert all("little girl" not in t and not t.endswith("little") for t in seen)


def test_stop_token_ids_and_eos(llm):
    tok = llm.get_tokenizer()
    lily = tok.encode(" Lily", add_special_tokens=False)[-1]
    comp = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[lily]),
                        use_tqdm=False)[0].outputs[0]
    assert comp.finish_reason == "stop" and comp.stop_reason == lily and comp.token_ids[-1] == lily
    assert comp.text == ", there was a little girl named"  # a stop id's text is left out (as vLLM)
    # This tiny model never ends a story by itself: a logits processor makes it emit eos.
    def eos_after_5(output_ids, row):
        if len(output_ids) == 5:
            row[tok.eos_token_id] = 1e4
        return row
    for include in (False, True):
        comp = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=40, logits_processors=[eos_after_5],
                                                               include_stop_str_in_output=include),
                            use_tqdm=False)[0].outputs[0]
        assert comp.finish_reason == "stop" and comp.stop_reason is None
        assert comp.token_ids[-1] == tok.eos_token_id and len(comp.token_ids) == 6
        assert comp.text == ", there was a little"  # eos is special: skipped either way


def test_logprobs_and_prompt_logprobs_match_transformers(llm):
    from model_fixtures import hf_model, transformers_or_skip
    torch, _ = transformers_or_skip()
    sp = SamplingParams(temperature=0.7, seed=3, max_tokens=10, logprobs=3, prompt_logprobs=2)
    out = llm.generate("Lily and Ben went to the park", sp, use_tqdm=False)[0]
    comp = out.outputs[0]
    ids = out.prompt_token_ids + comp.token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(STORIES)(torch.tensor([ids])).logits[0].double(), -1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    for p in range(1, len(out.prompt_token_ids)):
        entry = out.prompt_logprobs[p]
        tok = out.prompt_token_ids[p]
        assert math.isclose(entry[tok].logprob, float(ref[p - 1, tok]), abs_tol=1e-3)
        assert entry[tok].rank == int((ref[p - 1] > ref[p - 1, tok]).sum()) + 1
        assert len(entry) <= 3  # the prompt token and the top 2
    total = 0.0
    for i, (tok, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(out.prompt_token_ids) - 1 + i]
        assert math.isclose(entry[tok].logprob, float(row[tok]), abs_tol=1e-3)
        top = torch.topk(row, 3).indices.tolist()
        assert all(t in entry for t in top) and entry[top[0]].rank == 1
        assert entry[tok].decoded_token == llm.get_tokenizer().decode([tok], skip_special_tokens=False)
        total += entry[tok].logprob
    assert math.isclose(comp.cumulative_logprob, total, rel_tol=1e-9)


def test_prompt_logprobs_survive_a_shared_prefix(llm):
    """A prompt already in the prefix cache is still scored in full (no cache hits for it)."""
    sp = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0)
    prompt = "Once upon a time there was a little girl named Lily who loved her red ball very much"
    first = llm.generate(prompt, sp, use_tqdm=False)[0].prompt_logprobs
    again = llm.generate(prompt, sp, use_tqdm=False)[0].prompt_logprobs
    assert len(first) == len(again) and all(a is None or a.keys() == b.keys() for a, b in zip(first, again))


def test_abort_frees_everything(llm):
    engine = llm.llm_engine
    engine.add_request("a", "Once upon a time", SamplingParams(n=3, temperature=1.0, max_tokens=100, ignore_eos=True))
    engine.add_request("b", "The cat", SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))
    for _ in range(4):
        engine.step()
    assert engine.abort_request("a") and not engine.abort_request("a")
    assert engine.abort_request("b")
    assert not engine.has_unfinished_requests()
    engine.step()
    assert engine.scheduler.stats()["used_blocks"] == 0


def test_bad_requests_are_refused_and_leave_nothing_behind(llm):
    engine = llm.llm_engine
    V = engine.vocab_size
    with pytest.raises(ValueError, match=f"token id {V} at position 1 is outside the vocabulary"):
        llm.generate({"prompt_token_ids": [1, V]}, use_tqdm=False)
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []}, use_tqdm=False)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate({"prompt_token_ids": [5] * (engine.max_model_len + 1)}, use_tqdm=False)
    with pytest.raises(ValueError, match="2 SamplingParams for 1 prompts"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()], use_tqdm=False)
    engine.add_request("dup", "x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", "y")
    engine.abort_request("dup")
    # A logits processor that raises fails its generate() call, and the engine is clean after.
    def broken(output_ids, row):
        raise RuntimeError("processor failed")
    with pytest.raises(RuntimeError, match="processor failed"):
        llm.generate(["a", "b"], [SamplingParams(), SamplingParams(logits_processors=[broken])], use_tqdm=False)
    assert not engine.has_unfinished_requests() and engine.scheduler.stats()["used_blocks"] == 0
    ok = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert GREEDY_TEXT.startswith(ok[0].outputs[0].text)


def test_token_prompts_without_a_tokenizer():
    raw = LLM(STORIES, kv_cache_memory_bytes=16 << 20, skip_tokenizer_init=True, verbose=False)
    out = raw.generate({"prompt_token_ids": [1, 403, 407, 261, 378]}, SamplingParams(temperature=0, max_tokens=5),
                       use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 5 and out.outputs[0].text == ""
    with pytest.raises(ValueError, match="need a tokenizer"):
        raw.generate("Once upon a time", use_tqdm=False)
    with pytest.raises(ValueError, match="stop strings need detokenization"):
        raw.generate({"prompt_token_ids": [1, 2]}, SamplingParams(stop=["x"]), use_tqdm=False)


def test_chat_on_an_instruct_model(smollm_dir):
    llm = LLM(smollm_dir, kv_cache_memory_bytes=64 << 20, max_model_len=512, verbose=False)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    [out] = llm.chat(messages, SamplingParams(temperature=0, max_tokens=30), use_tqdm=False)
    assert out.outputs[0].text == "The capital of France is Paris."
    assert out.outputs[0].finish_reason == "stop"  # <|im_end|>, an eos id of the model
    assert out.prompt.startswith("<|im_start|>system") and out.prompt.endswith("<|im_start|>assistant\n")
    outs = llm.chat([messages, [{"role": "user", "content": "Say hi."}]], SamplingParams(temperature=0, max_tokens=8),
                    use_tqdm=False)
    assert len(outs) == 2 and outs[0].outputs[0].text.startswith("The capital of France")
    assert np.all([o.finished for o in outs])


def test_a_failing_logits_processor_ends_only_its_own_request(llm):
    engine = llm.llm_engine
    calls = []

    def flaky(output_ids, row):
        calls.append(len(output_ids))
        if len(output_ids) == 3:
            raise ValueError("bad processor")
        return row
    engine.add_request("bad", "The cat", SamplingParams(temperature=0, max_tokens=20, logits_processors=[flaky]))
    engine.add_request("good", "Once upon a time", SamplingParams(temperature=0, max_tokens=20))
    final = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    bad, good = final["bad"], final["good"]
    assert bad.outputs[0].finish_reason == "abort" and isinstance(bad.error, ValueError)
    assert len(bad.outputs[0].token_ids) == 3 and max(calls) == 3
    assert good.error is None and good.outputs[0].finish_reason == "length"
    assert GREEDY_TEXT.startswith(good.outputs[0].text)
    assert engine.scheduler.stats()["used_blocks"] == 0


def test_a_detokenization_error_ends_only_its_own_request(llm):
    engine = llm.llm_engine
    engine.add_request("bad-text", "The cat", SamplingParams(temperature=0, max_tokens=20))
    engine.add_request("fine", "Once upon a time", SamplingParams(temperature=0, max_tokens=20))
    detok = engine._requests["bad-text"].seqs[0].detok

    def broken(token):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer that fails")
    detok.add = broken
    final = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                final[o.request_id] = o
    assert isinstance(final["bad-text"].error, UnicodeDecodeError)
    assert final["bad-text"].outputs[0].finish_reason == "abort"
    assert GREEDY_TEXT.startswith(final["fine"].outputs[0].text) and final["fine"].error is None
    assert engine.scheduler.stats()["used_blocks"] == 0
