"""Chat templates rendered by flashpage equal transformers' apply_chat_template on the real
templates in ../shared (a tokenizer_config.json key or a chat_template.jinja file)."""

from __future__ import annotations

import os

import pytest

from flashpage.chat_template import ChatTemplateError
from flashpage.tokenizer import Tokenizer

SHARED = os.path.join(os.path.dirname(__file__), "..", "..", "shared")
WITH_TEMPLATES = ["tokenizers/mistral-v0.3", "tokenizers/qwen2", "models/smollm2-135m-instruct"]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Bonjour ! Comment puis-je vous aider ?"},
     {"role": "user", "content": "Ünïcödé and 日本語 🙂, please."}],
]


def _paths():
    out = [os.path.join(SHARED, p) for p in WITH_TEMPLATES]
    if not all(os.path.isdir(p) for p in out):
        pytest.skip("../shared tokenizers are not present")
    return out


@pytest.mark.parametrize("which", range(len(WITH_TEMPLATES)))
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_rendering_equals_transformers(which, conv, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    path = _paths()[which]
    messages = CONVERSATIONS[conv]
    ours = Tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(path)
    try:
        want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as e:  # the template refuses this conversation: so must we
        with pytest.raises(ChatTemplateError):
            ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        assert "alternate" in str(e) or "role" in str(e) or str(e)
        return
    got = ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert got == want
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True) == \
        theirs(want, add_special_tokens=False)["input_ids"]


def test_template_errors_are_clear():
    tok = Tokenizer(_paths()[0])  # mistral: roles must alternate user/assistant
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ChatTemplateError, match="list of dicts"):
        tok.apply_chat_template("hello")  # type: ignore[arg-type]
    with pytest.raises(ChatTemplateError, match="does not parse"):
        tok.apply_chat_template(CONVERSATIONS[0], chat_template="{% for %}")
    plain = Tokenizer(os.path.join(SHARED, "tokenizers/llama2"))
    assert plain.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        plain.apply_chat_template(CONVERSATIONS[0])
