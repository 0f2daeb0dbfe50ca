"""Structured outputs in the offline API and the engine: JSON schemas on a real model (SmolLM2)
parse and validate, regex and choice hold exactly, grammars (Lark and GBNF) are honoured, a
constraint that does not compile ends its request alone, and a compiling grammar never holds up
other requests' steps."""

from __future__ import annotations

import json
import os
import re
import threading

import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

from flashpage import LLM, SamplingParams  # noqa: E402
from flashpage.structured_outputs import GrammarError, GuidedDecodingParams, StructuredOutputs  # noqa: E402
from flashpage.structured_outputs import StructuredOutputsParams as S  # noqa: E402
from model_fixtures import SMOLLM_DIR, STORIES  # noqa: E402

SMOLLM_GGUF = os.path.join(SMOLLM_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")

SCHEMAS = {
    "person: strings, bounded integer, array": (
        "Describe a person as JSON.",
        {"type": "object", "additionalProperties": False, "required": ["name", "age", "hobbies"],
         "properties": {"name": {"type": "string", "maxLength": 40},
                        "age": {"type": "integer", "minimum": 0, "maximum": 120},
                        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30},
                                    "minItems": 1, "maxItems": 3}}}),
    "nested object with an enum and a bounded number": (
        "Give the capital of France as JSON.",
        {"type": "object", "additionalProperties": False, "required": ["city", "population"],
         "properties": {"city": {"type": "object", "additionalProperties": False, "required": ["name", "country"],
                                 "properties": {"name": {"type": "string", "maxLength": 30},
                                                "country": {"type": "string", "enum": ["France", "Germany", "Italy"]}}},
                        "population": {"type": "number", "minimum": 0, "maximum": 1e8}}}),
    "array of objects with booleans": (
        "List two animals as JSON.",
        {"type": "array", "minItems": 2, "maxItems": 2,
         "items": {"type": "object", "additionalProperties": False, "required": ["animal", "can_fly"],
                   "properties": {"animal": {"type": "string", "maxLength": 20}, "can_fly": {"type": "boolean"}}}}),
}


@pytest.fixture(scope="module")
def smollm():
    if not os.path.isfile(SMOLLM_GGUF):
        pytest.skip("../shared/models/smollm2-135m-instruct is not present")
    return LLM(SMOLLM_GGUF, verbose=False)


@pytest.fixture(scope="module")
def stories():
    return LLM(STORIES, verbose=False)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_json_schema_output_parses_and_validates_on_smollm2(smollm, name):
    question, schema = SCHEMAS[name]
    params = [SamplingParams(temperature=t, seed=s, max_tokens=160, structured_outputs=S(json=schema))
              for t, s in ((0.0, None), (0.8, 1), (0.8, 2))]
    outs = smollm.chat([[{"role": "user", "content": question}]] * len(params), params, use_tqdm=False)
    for out in outs:
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_is_any_object(smollm):
    out = smollm.chat([{"role": "user", "content": "Describe Paris as JSON."}],
                      SamplingParams(temperature=0, max_tokens=120, structured_outputs=S(json_object=True)),
                      use_tqdm=False)[0]
    assert isinstance(json.loads(out.outputs[0].text), dict)


def test_regex_and_choice_hold_exactly(stories):
    regex = r"[A-Z][a-z]{1,8} (is|was) [0-9]{1,2} years old\."
    choices = ["happy", "sad", "a big red ball"]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured_outputs=S(regex=regex))
              for s in range(6)]
    params += [SamplingParams(temperature=1.0, seed=s, max_tokens=20, structured_outputs=S(choice=choices))
               for s in range(6)]
    outs = stories.generate(["Once upon a time"] * len(params), params, use_tqdm=False)
    for out, p in zip(outs, params):
        text = out.outputs[0].text
        assert out.outputs[0].finish_reason == "stop"
        if p.structured_outputs.regex:
            assert re.fullmatch(regex, text), text
        else:
            assert text in choices


def test_grammars_lark_and_gbnf(stories):
    lark = 'start: "The " animal " is " color "."\nanimal: "cat" | "dog"\ncolor: "red" | "blue"'
    gbnf = 'root ::= "The " animal " is " color "."\nanimal ::= "cat" | "dog"\ncolor ::= "red" | "blue"'
    want = re.compile(r"The (cat|dog) is (red|blue)\.")
    for g in (lark, gbnf):
        outs = stories.generate(["Once upon a time"] * 3, [
            SamplingParams(temperature=1.0, seed=s, max_tokens=20, structured_outputs=S(grammar=g)) for s in range(3)],
            use_tqdm=False)
        assert all(want.fullmatch(o.outputs[0].text) for o in outs), [o.outputs[0].text for o in outs]


def test_n_forks_each_follow_the_grammar_and_vllm_old_name_works(stories):
    p = SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=20, guided_decoding=GuidedDecodingParams(
        choice=["yes", "no", "maybe"]))
    out = stories.generate("Once upon a time", p, use_tqdm=False)[0]
    assert len(out.outputs) == 4 and all(c.text in ("yes", "no", "maybe") for c in out.outputs)


def test_ignore_eos_still_ends_when_the_grammar_is_complete(stories):
    out = stories.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                              structured_outputs=S(choice=["done"])),
                           use_tqdm=False)[0]
    assert out.outputs[0].text == "done" and out.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("params, message", [
    (S(json={"type": "nonsense"}), "structured_outputs.json: .*nonsense"),
    (S(json="{not json"), "structured_outputs.json: not valid JSON"),
    (S(regex="a(b"), "(?s)structured_outputs.regex: .*unclosed group"),
    (S(grammar="start: undefined_rule"), "structured_outputs.grammar"),
])
def test_a_bad_constraint_ends_its_request_alone(stories, params, message):
    engine = stories.llm_engine
    engine.add_request("bad", "Once upon a time", SamplingParams(max_tokens=5, structured_outputs=params))
    engine.add_request("good", "Once upon a time", SamplingParams(temperature=0, max_tokens=5))
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    assert isinstance(done["bad"].error, GrammarError) and re.search(message, str(done["bad"].error), re.S)
    assert done["bad"].outputs[0].finish_reason == "abort"
    assert done["good"].error is None and len(done["good"].outputs[0].token_ids) == 5
    with pytest.raises(GrammarError, match=message):  # the offline API raises it
        stories.generate("Once upon a time", SamplingParams(structured_outputs=params), use_tqdm=False)


def test_structured_outputs_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one of"):
        S()
    with pytest.raises(ValueError, match="exactly one of .* got json, regex"):
        S(json={}, regex="a")
    with pytest.raises(ValueError, match="choice must be a non-empty list"):
        S(choice=[])


def test_a_compiling_grammar_does_not_hold_up_other_requests(stories, monkeypatch):
    release = threading.Event()
    real = StructuredOutputs._compile

    def slow(self, grammar, what):
        release.wait(30)
        return real(self, grammar, what)
    monkeypatch.setattr(StructuredOutputs, "_compile", slow)
    engine = stories.llm_engine
    engine.add_request("slow", "Once upon a time", SamplingParams(
        temperature=0, max_tokens=5, structured_outputs=S(regex="[a-z]{3} unique slow grammar")))
    engine.add_request("plain", "Once upon a time", SamplingParams(temperature=0, max_tokens=8))
    finished = []
    for _ in range(50):
        finished += [o.request_id for o in engine.step() if o.finished]
        if "plain" in finished:
            break
    assert finished == ["plain"]  # done while the grammar still compiles
    release.set()
    while engine.has_unfinished_requests():
        finished += [o.request_id for o in engine.step() if o.finished]
    assert finished == ["plain", "slow"]


def test_compiled_grammars_are_cached(stories):
    so = stories.llm_engine.structured_outputs
    a = so.compile(S(json={"type": "object", "properties": {"x": {"type": "integer"}}}))
    b = so.compile(S(json='{"type": "object", "properties": {"x": {"type": "integer"}}}'))
    assert a is b and a.result(10) is not None
