"""Structured outputs and tool calling through `flashpage serve` with the real `openai` client, on
SmolLM2 (its GGUF): response_format json_schema / json_object, vLLM's structured_outputs and
guided_* extra fields, a bad schema's 400, tool_choice required / named / auto, streamed tool
calls equal to non-streamed ones; and the tool-call parsers' streaming property over recorded
outputs split at random chunk boundaries."""

from __future__ import annotations

import json
import os
import random
import re

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
from pydantic import BaseModel, Field  # noqa: E402

from flashpage import LLM  # noqa: E402
from flashpage.chat_template import render  # noqa: E402
from flashpage.serving.server import start  # noqa: E402
from flashpage.serving.tool_parsers import ToolParser, parser_for_template  # noqa: E402
from model_fixtures import SHARED, SMOLLM_DIR  # noqa: E402
from test_openai_server import KEY, _args  # noqa: E402

SMOLLM_GGUF = os.path.join(SMOLLM_DIR, "SmolLM2-135M-Instruct.Q4_1.gguf")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "maxLength": 30},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["tz"],
                   "properties": {"tz": {"type": "string", "maxLength": 30}}}}}


@pytest.fixture(scope="module")
def smollm_server():
    if not os.path.isfile(SMOLLM_GGUF):
        pytest.skip("../shared/models/smollm2-135m-instruct is not present")
    llm = LLM(SMOLLM_GGUF, kv_cache_memory_bytes=128 << 20, max_model_len=1024, verbose=False)
    args = _args(SMOLLM_GGUF, served_model_name="smollm2", tool_call_parser="hermes")
    servers = start(args, llm)
    yield f"http://127.0.0.1:{args.port}"
    servers.stop(drain_seconds=2)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population: int = Field(ge=0, le=100_000_000)  # unbounded, a 135M model writes digits forever


def test_response_format_json_schema_with_the_clients_parse_helper(smollm_server):
    client = _client(smollm_server)
    r = client.beta.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "Describe Paris as JSON."}], response_format=City,
        max_tokens=100, temperature=0)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def test_json_object_and_vllm_extra_fields(smollm_server):
    client = _client(smollm_server)
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
                                       response_format={"type": "json_object"}, max_tokens=120, temperature=0)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    r = client.completions.create(model="smollm2", prompt="The answer is", max_tokens=10, temperature=0.7, seed=1,
                                  extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert r.choices[0].text in ("yes", "no")
    r = client.completions.create(model="smollm2", prompt="Call me at", max_tokens=20, temperature=0.7, seed=2,
                                  extra_body={"guided_regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", r.choices[0].text)
    stream = client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Is Paris in France?"}], stream=True,
        max_tokens=10, extra_body={"guided_choice": ["yes", "no"]})
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) in ("yes", "no")


@pytest.mark.parametrize("body, field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"extra_body": {"structured_outputs": {"regex": "a(b"}}}, "structured_outputs"),
    ({"extra_body": {"structured_outputs": {"regex": "a", "choice": ["b"]}}}, "structured_outputs"),
    ({"extra_body": {"guided_json": {"type": "object"}, "guided_regex": "a"}}, "guided_json"),
    ({"response_format": {"type": "xml"}}, "response_format"),
])
def test_a_bad_constraint_is_a_400_naming_it(smollm_server, body, field):
    client = _client(smollm_server)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       **body)
    assert field in e.value.message
    # the server goes on serving
    assert client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=3).choices[0].finish_reason == "length"


def _streamed_calls(stream) -> tuple[str, dict[int, list[str]], str | None]:
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        content += d.content or ""
        for t in d.tool_calls or []:
            entry = calls.setdefault(t.index, ["", ""])
            if t.function and t.function.name:
                entry[0] = t.function.name
            entry[1] += (t.function.arguments or "") if t.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_required_and_named_tool_choice_stream_and_not(smollm_server, choice):
    client = _client(smollm_server)
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
              tools=[WEATHER, TIME], tool_choice=choice, max_tokens=120, temperature=0)
    r = client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert msg.tool_calls, msg
    for call in msg.tool_calls:
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    if isinstance(choice, dict):
        assert [c.function.name for c in msg.tool_calls] == ["get_weather"] and r.choices[0].finish_reason == "stop"
    else:
        assert r.choices[0].finish_reason == "tool_calls"
    _, streamed, finish = _streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert [tuple(streamed[i]) for i in sorted(streamed)] == [(c.function.name, c.function.arguments)
                                                              for c in msg.tool_calls]
    assert finish == r.choices[0].finish_reason


def test_tool_choice_errors(smollm_server):
    client = _client(smollm_server)
    base = dict(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="not among the request's tools"):
        client.chat.completions.create(**base, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="tools\\[0\\]"):
        client.chat.completions.create(**base, tools=[{"type": "function", "function": {"parameters": {}}}])
    r = client.chat.completions.create(**base, tools=[WEATHER], tool_choice="none")
    assert r.choices[0].message.tool_calls in (None, [])


def test_auto_tool_choice_returns_text_when_the_model_calls_nothing(smollm_server):
    client = _client(smollm_server)
    r = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Say hello."}],
                                       tools=[WEATHER], tool_choice="auto", max_tokens=20, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


# ---- the parsers, over recorded outputs ---------------------------------------------------------

RECORDED = {
    "hermes": [
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}\n</tool_call>',
        '<tool_call>\n{"arguments": {"q": "a \\"quoted\\" } brace, [1, {\\"x\\": 2}]"}, "name": "search"}\n</tool_call>'
        ' and some words after',
        "No tools: 2 < 3, and <tool is not a tag.",
        '<tool_call>\n{"name": "broken", "arguments": {"a": 1}\n</tool_call>',  # not well-formed: content
    ],
    "llama3_json": [
        '{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}; '
        '{"name": "get_time", "parameters": {"tz": "UTC"}}',
        '<|python_tag|>{"name": "calc", "parameters": {"x": -1.5e3, "ok": true, "n": null}}',
        "The weather is nice.",
    ],
    "mistral": [
        '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, '
        '{"name": "get_time", "arguments": {"tz": "Europe/Paris"}}]',
        'Sure [TOOL_CALLS] [{"name": "f", "arguments": "{\\"a\\": 1}"}]',
        "Just text, [no calls] here.",
    ],
}
WANT = {  # (content, [(name, arguments)]) of each recorded output
    ("hermes", 0): ("Let me check.\n", [("get_weather", '{"city": "Paris", "unit": "celsius"}'),
                                        ("get_time", '{"tz": "Europe/Paris"}')]),
    ("hermes", 1): (None, [("search", '{"q": "a \\"quoted\\" } brace, [1, {\\"x\\": 2}]"}')]),
    ("hermes", 2): ("No tools: 2 < 3, and <tool is not a tag.", []),
    ("hermes", 3): ('<tool_call>\n{"name": "broken", "arguments": {"a": 1}\n</tool_call>', []),
    ("llama3_json", 0): (None, [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", '{"tz": "UTC"}')]),
    ("llama3_json", 1): (None, [("calc", '{"x": -1.5e3, "ok": true, "n": null}')]),
    ("llama3_json", 2): ("The weather is nice.", []),
    ("mistral", 0): (None, [("get_weather", '{"city": "Paris", "unit": "celsius"}'),
                            ("get_time", '{"tz": "Europe/Paris"}')]),
    ("mistral", 1): ("Sure ", [("f", '{"a": 1}')]),
    ("mistral", 2): ("Just text, [no calls] here.", []),
}


@pytest.mark.parametrize("fmt, i", list(WANT))
def test_parsers_extract_recorded_outputs(fmt, i):
    content, calls = ToolParser(fmt).extract(RECORDED[fmt][i])
    assert (content, [(c.name, c.arguments) for c in calls]) == WANT[(fmt, i)]
    for c in calls:
        json.loads(c.arguments)
        assert c.id


@pytest.mark.parametrize("fmt, i", [k for k in WANT if k != ("hermes", 3)])
def test_streamed_deltas_concatenate_to_the_non_streamed_result_for_every_split(fmt, i):
    """Random chunk boundaries (including inside markers, keys, escapes and multi-byte text) and
    every single-split point."""
    text = RECORDED[fmt][i]
    rng = random.Random(f"{fmt}{i}")
    splits = [[k] for k in range(1, len(text))]
    splits += [sorted(rng.sample(range(1, len(text)), rng.randint(2, min(12, len(text) - 1)))) for _ in range(300)]
    splits += [list(range(1, len(text)))]  # one character a chunk
    for cuts in splits:
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
        stream = ToolParser(fmt).stream()
        content, calls = "", {}
        for k, piece in enumerate(pieces):
            c, deltas = stream.feed(piece, final=k == len(pieces) - 1)
            content += c
            for d in deltas:
                entry = calls.setdefault(d["index"], ["", ""])
                entry[0] = d["function"].get("name") or entry[0]
                entry[1] += d["function"]["arguments"]
                if "id" in d:
                    assert d["type"] == "function" and d["id"]
        assert (content or None, [tuple(calls[j]) for j in sorted(calls)]) == WANT[(fmt, i)], cuts


def test_the_parser_comes_from_the_template_when_not_given():
    mistral = json.load(open(os.path.join(SHARED, "tokenizers", "mistral-v0.3", "tokenizer_config.json")))
    assert parser_for_template(mistral["chat_template"]) == "mistral"
    assert parser_for_template("{{ '<tool_call>' }}") == "hermes"
    assert parser_for_template(None) is None


def test_tools_reach_a_template_that_supports_them():
    mistral = json.load(open(os.path.join(SHARED, "tokenizers", "mistral-v0.3", "tokenizer_config.json")))
    text = render(mistral["chat_template"], [{"role": "user", "content": "Weather in Paris?"}],
                                tools=[WEATHER], bos_token="<s>", eos_token="</s>", add_generation_prompt=True)
    assert "[AVAILABLE_TOOLS]" in text and "get_weather" in text


class GetWeather(BaseModel):
    city: str = Field(max_length=30)
    unit: str = Field(pattern="^(celsius|fahrenheit)$")


def test_the_clients_pydantic_tool_helper(smollm_server):
    """openai.pydantic_function_tool + parse: the call's arguments come back as the model."""
    client = _client(smollm_server)
    r = client.beta.chat.completions.parse(
        model="smollm2", messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[openai.pydantic_function_tool(GetWeather)], tool_choice="required", max_tokens=80, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather)


def test_parallel_tool_calls_false_keeps_one_call(smollm_server):
    client = _client(smollm_server)
    kw = dict(model="smollm2", messages=[{"role": "user", "content": "Weather and time in Paris?"}],
              tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False, max_tokens=120, temperature=0)
    r = client.chat.completions.create(**kw)
    assert len(r.choices[0].message.tool_calls) == 1
    _, streamed, _ = _streamed_calls(client.chat.completions.create(**kw, stream=True))
    assert list(streamed) == [0]
    text = RECORDED["hermes"][0]  # two calls: auto with parallel_tool_calls=False reads the first
    from flashpage.serving.tool_parsers import ToolCalling
    tc = ToolCalling.for_request([WEATHER, TIME], "auto", None, "hermes", parallel=False)
    assert [c.name for c in tc.extract(text)[1]] == ["get_weather"]
    stream, names = tc.stream(), []
    for ch in text:
        names += [d["function"]["name"] for d in stream.feed(ch)[1] if "id" in d]
    assert names == ["get_weather"]


# ---- the parsers on arbitrary text: never raise; well-formed calls stream exactly -------------

from hypothesis import given, settings, strategies as st  # noqa: E402

_FRAGMENTS = ["<tool_call>", "</tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "{", "}", "[", "]", ",", ";", ":",
              '"', '\\"', "\\", '"name"', '"arguments"', '"parameters"', '"f"', " ", "\n", "a", "1", "null", "é", "🙂"]
_JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                            lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                                       max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["hermes", "llama3_json", "mistral"]), st.lists(st.sampled_from(_FRAGMENTS), max_size=40),
       st.lists(st.integers(1, 60), max_size=6))
def test_parsers_never_raise_on_arbitrary_text(fmt, fragments, cuts):
    text = "".join(fragments)
    ToolParser(fmt).extract(text)
    stream, at = ToolParser(fmt).stream(), 0
    for k in sorted(set(c for c in cuts if c < len(text))) + [len(text)]:
        stream.feed(text[at:k], final=k == len(text))
        at = k


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["hermes", "llama3_json", "mistral"]), st.text(max_size=10).filter(lambda t: "<" not in t and "[" not in t and "{" not in t),
       st.lists(st.tuples(st.text(min_size=1, max_size=8), st.dictionaries(st.text(max_size=6), _JSON_VALUES, max_size=4)),
                min_size=1, max_size=3), st.randoms(use_true_random=False))
def test_well_formed_calls_stream_exactly_for_random_splits(fmt, content, calls, rnd):
    bodies = [json.dumps({"name": n, ("parameters" if fmt == "llama3_json" else "arguments"): a},
                         ensure_ascii=rnd.random() < 0.5) for n, a in calls]
    if fmt == "hermes":
        text = content + "".join(f"<tool_call>\n{b}\n</tool_call>\n" for b in bodies)
    elif fmt == "mistral":
        text = content + "[TOOL_CALLS] [" + ", ".join(bodies) + "]"
    else:
        content, text = "", "; ".join(bodies)
    want_content, want_calls = ToolParser(fmt).extract(text)
    assert [(c.name, json.loads(c.arguments)) for c in want_calls] == [(n, a) for n, a in calls]
    cuts = sorted(rnd.sample(range(1, len(text)), min(len(text) - 1, rnd.randint(0, 12))))
    stream, got_content, got = ToolParser(fmt).stream(), "", {}
    for a, b in zip([0, *cuts], [*cuts, len(text)]):
        c, deltas = stream.feed(text[a:b], final=b == len(text))
        got_content += c
        for d in deltas:
            entry = got.setdefault(d["index"], ["", ""])
            entry[0] = d["function"].get("name") or entry[0]
            entry[1] += d["function"]["arguments"]
    assert (got_content or None) == want_content
    assert [tuple(got[i]) for i in sorted(got)] == [(c.name, c.arguments) for c in want_calls]
