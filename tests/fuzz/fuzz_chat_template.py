"""Fuzzes chat-template rendering (flashpage.chat_template.render): templates are operator input
(--chat-template, a model directory's tokenizer_config.json / chat_template.jinja) and messages
are request input.

Contract: render returns a str or raises ChatTemplateError (TemplateBudgetError, its subclass,
when a bound is hit); never any other exception, and within its budget (small here, so that
each input stays cheap: libFuzzer's -timeout catches a render that ignores it).

Inputs, chosen by the first byte: a template (raw text) rendered on fixed messages, or a seed
template (the real ones in ../shared and built-in snippets) rendered on messages, tools and
arguments built from the rest of the input.

    python tests/fuzz/fuzz_chat_template.py -max_total_time=600 [CORPUS_DIR]"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import atheris  # noqa: E402

with atheris.instrument_imports(include=["flashpage", "jinja2"]):
    from flashpage import chat_template as ct

LIMITS = getattr(ct, "TemplateLimits", None)
RENDER_KW = {"limits": LIMITS(max_operations=20_000, max_seconds=2.0, max_output_chars=1 << 16)} if LIMITS else {}
ALLOWED = tuple(e for e in (ct.ChatTemplateError, getattr(ct, "TemplateBudgetError", None)) if e is not None)

SNIPPETS = [
    "{% for m in messages %}<|{{ m.role }}|>{{ m['content'] | trim }}{% if not loop.last %}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}",
    "{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.sys = m.content %}"
    "{% endif %}{% endfor %}{{ bos_token }}{{ ns.sys }}{{ messages | length }}{{ eos_token }}",
    "{% macro r(n) %}{% if n > 0 %}{{ n }}{{ r(n - 1) }}{% endif %}{% endmacro %}{{ r(5) }}",
    "{{ tools | tojson(indent=2) }}{% for d in documents or [] %}{{ d.title }}{% endfor %}",
    "{% if messages[0].role != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}ok",
    "{% generation %}{{ messages[-1].content }}{% endgeneration %}{{ strftime_now('%Y') | length }}",
    "{% for i in range(3) %}{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ i }}{{ m.role }}"
    "{% endfor %}{% endfor %}{{ '%5d' % 3 }}{{ 'ab' * 3 }}{{ [1, 2] + [3] }}{{ 'x'.upper() }}",
    "{{ messages | map(attribute='content') | join(', ') }}{{ messages | selectattr('role', 'eq', 'user') | list | length }}",
]


def template_seeds() -> list[str]:
    out = list(SNIPPETS)
    for p in _harness.shared_files("*/*/chat_template.jinja"):
        out.append(p.read_text())
    for p in _harness.shared_files("*/*/tokenizer_config.json"):
        t = json.loads(p.read_text()).get("chat_template")
        if isinstance(t, str):
            out.append(t)
    return out


TEMPLATES = template_seeds()
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}]
ROLES = ["system", "user", "assistant", "tool", "", "ipython", "developer", 7, None]
CONTENTS = ["hi", "", "{{ 1 }}", "<|im_end|>", "\ud800", "é" * 10, None, 3, ["a"], [{"type": "text", "text": "t"}],
            {"x": 1}]


@atheris.instrument_func
def structured(fdp: atheris.FuzzedDataProvider) -> tuple[str, list, dict]:
    template = TEMPLATES[fdp.ConsumeIntInRange(0, len(TEMPLATES) - 1)]
    messages = []
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        m = {"role": fdp.PickValueInList(ROLES)}
        if fdp.ConsumeBool():
            m["content"] = copy.deepcopy(fdp.PickValueInList(CONTENTS))
        if fdp.ConsumeIntInRange(0, 5) == 0:
            m["tool_calls"] = [{"function": {"name": "f", "arguments": copy.deepcopy(
                fdp.PickValueInList(_harness.EDGE_VALUES))}}]
        messages.append(m)
    kwargs: dict = {"add_generation_prompt": fdp.ConsumeBool()}
    if fdp.ConsumeBool():
        kwargs["tools"] = [{"type": "function", "function": {"name": "f", "parameters": copy.deepcopy(
            fdp.PickValueInList(_harness.EDGE_VALUES))}}]
    if fdp.ConsumeBool():
        kwargs["documents"] = [{"title": copy.deepcopy(fdp.PickValueInList(_harness.EDGE_VALUES)), "text": "d"}]
    if fdp.ConsumeBool():
        kwargs[fdp.PickValueInList(["bos_token", "eos_token", "enable_thinking", "date_string", "x"])] = copy.deepcopy(
            fdp.PickValueInList(_harness.EDGE_VALUES))
    if fdp.ConsumeBool():  # a few characters of the template replaced
        pos = fdp.ConsumeIntInRange(0, max(0, len(template) - 1))
        template = template[:pos] + fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 8)) + template[pos + 1:]
    return template, messages, kwargs


@atheris.instrument_func
def check(template: str, messages: list, kwargs: dict) -> None:
    try:
        out = ct.render(template, messages, **kwargs, **RENDER_KW)
    except ALLOWED as e:
        _harness.feedback(type(e).__name__ + " " + str(e)[:50])
        return
    assert isinstance(out, str), type(out)
    _harness.feedback(f"ok {min(len(out), 64) // 8}")


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] < 0x80:
        check(*structured(atheris.FuzzedDataProvider(data[1:])))
    else:
        check(data[1:].decode("utf-8", "replace"), copy.deepcopy(MESSAGES), {"add_generation_prompt": True})


def corpus() -> dict[str, bytes]:
    out = {f"template-{i}": b"\x80" + t.encode() for i, t in enumerate(TEMPLATES)}
    out.update({f"structured-{i}": bytes([0, i, 3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]) for i in range(len(TEMPLATES))})
    return out


if __name__ == "__main__":
    words = ["{%", "%}", "{{", "}}", "{#", "#}", "for", "endfor", "if", "endif", "else", "elif", "set", "macro",
             "endmacro", "call", "namespace", "loop", "range(", "messages", "content", "role", "|", "~", "*", "**",
             "%", "//", "tojson", "format", "join", "map", "raise_exception(", "strftime_now(", "generation",
             "endgeneration", "break", "continue", "recursive", "loop(", "self", "caller", "super()", "include",
             "import", "extends", "block", "filter", "with", "__class__", "mro", "9999999", "-1", "[::-1]"]
    _harness.main(test_one_input, corpus(), [w.encode() for w in words])
