"""Fuzzes the request validation of the OpenAI-compatible HTTP API: a body parsed as FastAPI
parses it (json.loads, then the pydantic model: CompletionRequest for /v1/completions,
ChatCompletionRequest for /v1/chat/completions), then what the handlers do before any model
work: the prompt shapes, RequestLimits (prompt count, text size, the per-request multipliers),
`.sampling_params(...)`, the chat messages as the template sees them.

Contract: a body is refused with pydantic's ValidationError or a ValueError (LimitExceeded is
one) and nothing else; an accepted one yields SamplingParams the engine and the C++ core can
take (finite floats, token ids and counts within int32, non-empty stop strings, a seed torch
accepts for each of the n sequences).

Inputs, chosen by the first byte (its low bit picks the endpoint): a raw JSON body, or a seed
body whose fields are replaced with edge values (type confusion, int32/int64 edges, NaN).

    python tests/fuzz/fuzz_http_request.py -max_total_time=600 [CORPUS_DIR]"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import atheris  # noqa: E402

with atheris.instrument_imports(include=["flashpage"]):
    import pydantic
    from flashpage.serving import protocol
    from flashpage.serving.limits import RequestLimits

LIMITS = RequestLimits(max_model_len=2048)
COMPLETION_SEEDS = [
    {"model": "m", "prompt": "Once upon a time", "max_tokens": 16, "temperature": 0.7, "top_p": 0.9, "n": 2,
     "stop": ["\n", "."], "seed": 1, "logprobs": 3, "echo": True, "stream": True,
     "stream_options": {"include_usage": True}},
    {"prompt": [1, 2, 3], "max_tokens": 1, "top_k": 5, "min_p": 0.1, "stop_token_ids": [2], "ignore_eos": True,
     "min_tokens": 1, "repetition_penalty": 1.1, "presence_penalty": 0.5, "frequency_penalty": -0.5,
     "logit_bias": {"5": -100, "7": 3.5}, "prompt_logprobs": 2},
    {"prompt": [[1, 2], [3, 4]], "n": 1, "include_stop_str_in_output": True, "skip_special_tokens": False},
    {"prompt": ["a", "b"], "user": "u", "stop": "x"},
]
CHAT_SEEDS = [
    {"model": "m", "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
     "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 2, "stream": True},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}],
     "max_completion_tokens": 5, "add_generation_prompt": False, "chat_template_kwargs": {"enable_thinking": False},
     "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto"},
    {"messages": [{"role": "assistant", "content": None, "tool_calls": []}], "n": 3, "seed": -5,
     "logit_bias": {"1": 1}, "stop_token_ids": [1, 2]},
]
FIELDS = sorted(_harness.json_keys(COMPLETION_SEEDS + CHAT_SEEDS) | {"chat_template", "top_k", "max_tokens"})


@atheris.instrument_func
def completion(obj) -> None:
    body = protocol.CompletionRequest.model_validate(obj)
    p = body.prompt
    prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
    if not prompts or any(len(x) == 0 for x in prompts):
        return  # refused by the handler ("prompt must not be empty")
    LIMITS.check_prompt_count(len(prompts), body.n)
    for x in prompts:
        if isinstance(x, str):
            LIMITS.check_text("prompt", x)
    for max_tokens in (None, body.max_tokens):
        params = body.sampling_params(max_tokens, body.logprobs)
        LIMITS.check_params(params)
        _harness.check_sampling_params(params, LIMITS)
    _harness.feedback(f"ok completion {len(prompts)} {params.n} {len(params.stop)} {params.logprobs}")


@atheris.instrument_func
def chat(obj) -> None:
    body = protocol.ChatCompletionRequest.model_validate(obj)
    messages = body.plain_messages()
    assert all(isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)
    LIMITS.check_text("messages", "".join(m["content"] for m in messages if isinstance(m.get("content"), str)))
    k = (body.top_logprobs or 0) if body.logprobs else None
    for max_tokens in (None, body.max_completion_tokens or body.max_tokens):
        params = body.sampling_params(max_tokens, k)
        LIMITS.check_params(params)
        _harness.check_sampling_params(params, LIMITS)
    _harness.feedback(f"ok chat {len(messages)} {params.n} {len(params.stop)} {params.logprobs}")


@atheris.instrument_func
def structured(fdp: atheris.FuzzedDataProvider, seeds: list[dict]) -> dict:
    obj = copy.deepcopy(seeds[fdp.ConsumeIntInRange(0, len(seeds) - 1)])
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        target = obj
        if isinstance(obj.get("messages"), list) and obj["messages"] and fdp.ConsumeIntInRange(0, 3) == 0:
            target = obj["messages"][fdp.ConsumeIntInRange(0, len(obj["messages"]) - 1)]
            if not isinstance(target, dict):
                continue
        field = fdp.PickValueInList(FIELDS + ["role", "content", "text", "type"])
        choice = fdp.ConsumeIntInRange(0, 4)
        if choice == 0:
            target.pop(field, None)
        elif choice == 1:
            target[field] = fdp.ConsumeInt(9)
        elif choice == 2:
            target[field] = fdp.ConsumeFloat()
        else:
            target[field] = copy.deepcopy(fdp.PickValueInList(_harness.EDGE_VALUES))
    return obj


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    if not data:
        return
    is_chat, structured_mode = data[0] & 1, data[0] & 2
    seeds = CHAT_SEEDS if is_chat else COMPLETION_SEEDS
    if structured_mode:
        obj = structured(atheris.FuzzedDataProvider(data[1:]), seeds)
    else:
        try:
            obj = json.loads(data[1:])
        except (ValueError, RecursionError):  # FastAPI answers 400 before any model sees it
            return
    try:
        (chat if is_chat else completion)(obj)
    except pydantic.ValidationError as e:
        _harness.feedback(f"invalid {e.errors()[0].get('type')} {e.errors()[0].get('loc')}")
    except ValueError as e:
        _harness.feedback(str(e))


def corpus() -> dict[str, bytes]:
    out = {f"completion-{i}": b"\x00" + _harness.dumps(s) for i, s in enumerate(COMPLETION_SEEDS)}
    out.update({f"chat-{i}": b"\x01" + _harness.dumps(s) for i, s in enumerate(CHAT_SEEDS)})
    out.update({f"structured-{i}": bytes([2 + i % 2, i, 1, 4, 1, 5, 9, 2, 6]) for i in range(6)})
    return out


if __name__ == "__main__":
    _harness.main(test_one_input, corpus(), [f'"{k}"'.encode() for k in FIELDS])
