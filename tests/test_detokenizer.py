"""Tokenizer files (tokenizer_config.json, generation_config.json, chat templates) and
incremental detokenization on the real tokenizers in ../shared, against the tokenizer's own
decode of the whole; stop strings across token boundaries."""

from __future__ import annotations

import os
import random

import pytest

from flashpage.detokenizer import IncrementalDetokenizer, find_stop
from flashpage.tokenizer import Tokenizer

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
TOKENIZERS = {
    "llama2": "tokenizers/llama2", "llama3": "tokenizers/llama3", "mistral": "tokenizers/mistral-v0.3",
    "qwen2": "tokenizers/qwen2", "smollm2": "models/smollm2-135m-instruct", "stories": "models/stories260K",
}
TEXTS = ["Hello wörld — 日本語のテキスト 🙂🚀 ça va? ﷽ ", "def f(x):\n    return x**2  # ✓\n",
         "  leading spaces and\ttabs\n\nnew lines", "Ünïcödé: Ελληνικά, русский, עברית, 한국어 👩‍👩‍👧"]


def _tokenizer(name: str) -> Tokenizer:
    path = os.path.join(SHARED, TOKENIZERS[name])
    if not os.path.isdir(path):
        pytest.skip(f"{path} is not there")
    return Tokenizer(path)


def _incremental(tok: Tokenizer, prompt: list[int], output: list[int], skip: bool) -> str:
    d = IncrementalDetokenizer.after_prompt(tok, prompt, skip)
    text = "".join(d.add(t) for t in output) + d.flush()
    assert text == d.text
    return text


def _ends_in_byte_run(tok: Tokenizer, ids: list[int], skip: bool) -> bool:
    seen = [i for i in ids if not (skip and i in tok.all_special_id_set)]
    return bool(seen) and seen[-1] in tok.byte_fallback_ids


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_incremental_text_equals_decode_of_the_whole(name):
    tok = _tokenizer(name)
    rnd = random.Random(name)
    special = tok.all_special_ids
    cases = []
    for _ in range(150):  # random ids, special tokens sprinkled in
        ids = [rnd.randrange(tok.vocab_size) for _ in range(rnd.randrange(1, 30))]
        for _ in range(rnd.randrange(3)):
            if special:
                ids.insert(rnd.randrange(len(ids) + 1), rnd.choice(special))
        cases.append(ids)
    cases += [tok.encode(t * 2, add_special_tokens=False) for t in TEXTS]  # multi-byte characters
    for ids in cases:
        for skip in (True, False):
            whole = tok.decode(ids, skip)
            assert _incremental(tok, [], ids, skip) == whole
            # After a prompt: the prompt's text, then the output's, is the text of the whole
            # (for prompts that end on a character: not inside a byte-fallback run or a
            # multi-byte character).
            for cut in (1, len(ids) // 2, len(ids) - 1):
                if not 0 < cut < len(ids) or _ends_in_byte_run(tok, ids[:cut], skip):
                    continue
                prompt_text = tok.decode(ids[:cut], skip)
                if not prompt_text.endswith("\ufffd"):
                    assert prompt_text + _incremental(tok, ids[:cut], ids[cut:], skip) == whole


def test_byte_fallback_runs_are_held_back_until_they_end():
    tok = _tokenizer("llama2")
    ids = tok.encode("a🙂b", add_special_tokens=False)  # the emoji is four byte tokens
    d = IncrementalDetokenizer.after_prompt(tok, [], True)
    deltas = [d.add(t) for t in ids]
    assert "\ufffd" not in "".join(deltas) and "".join(deltas) + d.flush() == "a🙂b"
    assert deltas[1:5] == ["", "", "", ""] or "🙂" in "".join(deltas[:6])


def test_config_files_are_read():
    llama3, qwen, smol, mistral = (_tokenizer(n) for n in ("llama3", "qwen2", "smollm2", "mistral"))
    assert llama3.bos_token == "<|begin_of_text|>" and llama3.bos_token_id == 128000
    assert llama3.eos_token_ids == [128009]
    assert qwen.bos_token is None and qwen.eos_token == "<|im_end|>"
    assert smol.eos_token_ids == [2]  # generation_config.json
    assert mistral.chat_template and smol.chat_template and qwen.chat_template  # config key, .jinja file
    assert 151645 in qwen.all_special_ids


@pytest.mark.parametrize("text,new,stop,include,want", [
    ("Hello world. Bye", 5, ["."], False, (".", 11)),
    ("Hello world. Bye", 5, ["world."], True, ("world.", 12)),  # the stop string straddles old and new text
    ("abc", 1, ["x"], False, None),
    ("say STOP now STOP", 17, ["now", "STOP"], False, ("STOP", 4)),  # the earliest wins
    ("abcdef", 1, ["abc"], False, None),  # entirely in old text: found in an earlier step
])
def test_find_stop(text, new, stop, include, want):
    assert find_stop(text, new, stop, include) == want


def test_stop_string_split_over_tokens():
    tok = _tokenizer("llama3")
    ids = tok.encode("The answer is 42.\n\nQuestion: what next?", add_special_tokens=False)
    d = IncrementalDetokenizer.after_prompt(tok, [], True)
    for n, t in enumerate(ids):
        delta = d.add(t)
        hit = find_stop(d.text, len(delta), ["\n\nQuestion"], False)
        if hit:
            assert d.text[:hit[1]] == "The answer is 42."
            break
    else:
        pytest.fail("stop string not found")
