"""The details a vLLM user's client relies on, against a real server on stories260K (a
sentencepiece vocabulary, whose tokens decoded alone lose their leading space): OpenAI's error
body for unknown and unsupported routes, completions logprobs' text_offset (streamed or not),
echo of token-id prompts and of the prompt's logprobs, and the gauges an inference gateway
(llm-d, GKE Inference Gateway) routes by."""

from __future__ import annotations

import asyncio
import os

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from flashpage import LLM, SamplingParams  # noqa: E402
from flashpage.serving.server import start  # noqa: E402
from model_fixtures import STORIES  # noqa: E402
from test_openai_server import KEY, _args, _client, _idle_and_empty, server  # noqa: E402,F401 - server: the fixture

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
AUTH = {"Authorization": f"Bearer {KEY}"}
GREEDY = dict(model="stories", temperature=0)




def _pieces(text: str, offsets: list[int]) -> list[str]:
    """The text each text_offset entry points at: from it to the next."""
    return [text[a:b] for a, b in zip(offsets, offsets[1:] + [len(text)])]


def _assert_offsets_locate_tokens(text: str, lp, start: int = 0) -> None:
    """From token `start` on, each token's text is where its offset says (a sentencepiece
    token decoded alone has no leading space, which the text has: compared without it)."""
    assert len(lp.text_offset) == len(lp.tokens)
    assert lp.text_offset == sorted(lp.text_offset) and 0 <= lp.text_offset[0]
    pieces = _pieces(text, lp.text_offset)[start:]
    assert [p.strip() for p in pieces] == [t.strip() for t in lp.tokens[start:]], (text, lp.tokens, lp.text_offset)


def _stream_choices(client, **kw) -> dict[int, dict]:
    """A streamed completion joined per choice: text, tokens, token_logprobs, text_offset."""
    joined: dict[int, dict] = {}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            j = joined.setdefault(c.index, {"text": "", "tokens": [], "token_logprobs": [], "text_offset": []})
            j["text"] += c.text
            if c.logprobs is not None:
                for key in ("tokens", "token_logprobs", "text_offset"):
                    j[key] += getattr(c.logprobs, key)
    return joined


# ---- errors: unknown and unsupported routes --------------------------------------------------

def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_unknown_routes_and_methods_answer_in_openai_shape(server):
    _, url, _ = server
    err = _assert_openai_error(httpx.get(f"{url}/v1/nope", headers=AUTH), 404)
    assert err["code"] == "not_found" and "/v1/nope" in err["message"]
    # A prefix of an unsupported route is only that: an unknown route.
    assert _assert_openai_error(httpx.post(f"{url}/v1/embeddingsx", headers=AUTH), 404)["code"] == "not_found"
    err = _assert_openai_error(httpx.get(f"{url}/v1/completions", headers=AUTH), 405)
    assert err["code"] == "method_not_allowed" and "GET" in err["message"]
    _assert_openai_error(httpx.delete(f"{url}/v1/models", headers=AUTH), 405)


@pytest.mark.parametrize("path", ["/v1/embeddings", "/v1/audio/transcriptions", "/v1/images/generations",
                                  "/v1/moderations", "/v1/files", "/v1/fine_tuning/jobs", "/v1/responses",
                                  "/v1/rerank", "/rerank", "/v1/score", "/pooling", "/tokenize", "/detokenize"])
def test_unsupported_openai_routes_say_so(server, path):
    _, url, _ = server
    err = _assert_openai_error(httpx.post(f"{url}{path}", json={"model": "stories", "input": "x"}, headers=AUTH),
                               404)
    assert err["code"] == "unsupported_endpoint"
    assert f"POST {path} is not supported" in err["message"] and "generative" in err["message"]


def test_embeddings_through_the_openai_client(server):
    """404, not 501: the openai client does not retry it and raises NotFoundError at once."""
    _, url, _ = server
    with pytest.raises(openai.NotFoundError, match="/v1/embeddings is not supported"):
        _client(url).embeddings.create(model="stories", input="Once upon a time")


# ---- logprobs.text_offset ------------------------------------------------------------------

def test_text_offset_locates_each_token(server):
    _, url, _ = server
    r = _client(url).completions.create(prompt="Once upon a time", max_tokens=24, logprobs=2, **GREEDY)
    c = r.choices[0]
    assert c.logprobs.text_offset[0] == 0 and len(c.logprobs.tokens) == 24
    _assert_offsets_locate_tokens(c.text, c.logprobs)
    # top_logprobs as vLLM: the chosen token and the top 2 (greedy: the chosen is among them).
    for tok, top in zip(c.logprobs.tokens, c.logprobs.top_logprobs):
        assert tok in top and len(top) == 2


def test_text_offset_streamed_continues_across_chunks(server):
    _, url, _ = server
    client = _client(url)
    kw = dict(prompt="The cat", max_tokens=24, logprobs=1, **GREEDY)
    whole = client.completions.create(**kw).choices[0]
    streamed = _stream_choices(client, **kw)[0]
    assert streamed["text"] == whole.text
    assert streamed["tokens"] == whole.logprobs.tokens
    assert streamed["text_offset"] == whole.logprobs.text_offset


# ---- echo ----------------------------------------------------------------------------------

def test_echo_of_token_id_prompts(server):
    """The prompt's ids detokenized (special tokens included, as vLLM), then the completion:
    one prompt or several, streamed or not, n = 2."""
    _, url, llm = server
    tok = llm.tokenizer
    prompts = [tok.encode("Once upon a time"), tok.encode("The cat")]
    client = _client(url)
    plain = client.completions.create(prompt=prompts, max_tokens=8, **GREEDY)
    want = [tok.decode(p, skip_special_tokens=False) + c.text for p, c in zip(prompts, plain.choices)]
    assert want[0].startswith("<s> Once upon a time")

    one = client.completions.create(prompt=prompts[0], max_tokens=8, echo=True, **GREEDY)
    assert one.choices[0].text == want[0]
    both = client.completions.create(prompt=prompts, max_tokens=8, echo=True, n=2, **GREEDY)
    assert [c.text for c in both.choices] == [w for w in want for _ in range(2)]
    streamed = _stream_choices(client, prompt=prompts, max_tokens=8, echo=True, n=2, **GREEDY)
    assert [streamed[i]["text"] for i in range(4)] == [w for w in want for _ in range(2)]


@pytest.mark.parametrize("as_ids", [False, True])
def test_echo_with_logprobs_scores_the_prompt(server, as_ids):
    """As vLLM: the prompt's tokens lead the logprobs (the first, which nothing scores, with
    None), with the engine's prompt logprobs; text_offset counts from the prompt's start."""
    _, url, llm = server
    text = "Once upon a time"
    ids = llm.tokenizer.encode(text)
    prompt = ids if as_ids else text
    client = _client(url)
    kw = dict(prompt=prompt, max_tokens=6, logprobs=1, echo=True, **GREEDY)
    c = client.completions.create(**kw).choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(ids) + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    if as_ids:
        assert c.text.startswith("<s> " + text)
        _assert_offsets_locate_tokens(c.text, lp)
    else:  # the <s> the tokenizer added has no text in the prompt as sent: it is 0 characters long
        assert c.text.startswith(text) and lp.text_offset[:len(ids)] == [0, 0, 4, 9, 11]
        _assert_offsets_locate_tokens(c.text, lp, start=1)

    offline = LLM(STORIES, kv_cache_memory_bytes=16 << 20, max_model_len=256, verbose=False).generate(
        [text], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1), use_tqdm=False)[0]
    want = [entry[t].logprob for t, entry in zip(ids[1:], offline.prompt_logprobs[1:])]
    assert lp.token_logprobs[1:len(ids)] == pytest.approx(want, abs=1e-4)

    streamed = _stream_choices(client, **kw)[0]
    assert streamed["text"] == c.text and streamed["tokens"] == lp.tokens
    assert streamed["text_offset"] == lp.text_offset
    assert streamed["token_logprobs"][0] is None
    assert streamed["token_logprobs"][1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)


# ---- the gauges an inference gateway routes by ---------------------------------------------

def _gauges(url: str) -> dict[str, tuple[str, list]]:
    text = httpx.get(f"{url}/metrics", headers=AUTH, timeout=10).text
    return {f.name: (f.type, f.samples) for f in parser.text_string_to_metric_families(text)}


def test_router_gauges_follow_the_load():
    """The queue length, running count and KV-cache use (0..1) are gauges that move while
    requests run and return to 0 after; the cache geometry is in cache_config_info's labels."""
    llm = LLM(STORIES, kv_cache_memory_bytes=16 << 20, max_model_len=256, max_num_seqs=2, verbose=False)
    args = _args(STORIES)
    servers = start(args, llm)
    url = f"http://127.0.0.1:{args.port}"
    names = ("flashpage:num_requests_waiting", "flashpage:num_requests_running", "flashpage:kv_cache_usage_perc")
    try:
        families = _gauges(url)
        for name in names:
            assert families[name][0] == "gauge", name
        info_type, info = families["flashpage:cache_config_info"]
        assert info_type == "gauge" and info[0].value == 1
        config = llm.llm_engine.scheduler.config
        assert info[0].labels["block_size"] == str(config.block_size)
        assert info[0].labels["num_gpu_blocks"] == str(config.num_blocks)

        async def load_and_watch() -> dict[str, float]:
            peak = dict.fromkeys(names, 0.0)
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
                async def one(i: int) -> None:
                    await client.completions.create(prompt=f"Once upon a time {i}", max_tokens=200,
                                                    extra_body={"ignore_eos": True}, **GREEDY)
                work = asyncio.gather(*(one(i) for i in range(12)))
                async with httpx.AsyncClient(headers=AUTH) as http:
                    while not work.done():
                        text = (await http.get(f"{url}/metrics")).text
                        for f in parser.text_string_to_metric_families(text):
                            if f.name in peak:
                                peak[f.name] = max(peak[f.name], f.samples[0].value)
                        await asyncio.sleep(0.005)
                await work
            return peak
        peak = asyncio.run(load_and_watch())
        assert peak["flashpage:num_requests_waiting"] >= 1  # 12 requests, 2 run at a time
        assert peak["flashpage:num_requests_running"] == 2
        assert 0 < peak["flashpage:kv_cache_usage_perc"] <= 1

        assert _idle_and_empty(servers)
        after = _gauges(url)
        assert [after[name][1][0].value for name in names] == [0, 0, 0]
    finally:
        servers.stop(drain_seconds=2)
