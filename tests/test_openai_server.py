"""The OpenAI-compatible HTTP server with real clients (the `openai` package, httpx) on real
checkpoints: completions, chat, streaming with usage, 64 concurrent streams equal to the
offline API, a client that goes away, bad requests, overload, the API key, metrics. Servers
bind loopback on a free port and stop themselves."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from flashpage import LLM, SamplingParams  # noqa: E402
from flashpage.serving.server import start  # noqa: E402
from model_fixtures import STORIES  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
KEY = "test-key"
PROMPTS = ["Once upon a time", "The cat", "Lily and Ben", "One day", "Tom had a big", "The sun was"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(model: str, **kw) -> argparse.Namespace:
    base = dict(model=model, host="127.0.0.1", port=_free_port(), grpc_port=0, served_model_name="stories",
                api_key=KEY, max_waiting_requests=1024, max_tokens_limit=None, max_body_bytes=64 << 10)
    base.update(kw)
    return argparse.Namespace(**base)


@pytest.fixture(scope="module")
def server():
    llm = LLM(STORIES, kv_cache_memory_bytes=64 << 20, max_model_len=256, verbose=False)
    args = _args(STORIES)
    servers = start(args, llm)
    yield servers, f"http://127.0.0.1:{args.port}", llm
    servers.stop(drain_seconds=2)


@pytest.fixture(scope="module")
def offline():
    """Greedy outputs of the offline API (a separate LLM: the server's engine is busy)."""
    llm = LLM(STORIES, kv_cache_memory_bytes=64 << 20, max_model_len=256, verbose=False)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
    return {o.prompt: o.outputs[0] for o in outs}


def wait_healthy(url: str, timeout: float = 60.0) -> None:
    """Until GET /health answers 200 (a server starting, or recovering)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}/health did not answer 200 within {timeout} s")


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)


def _idle_and_empty(servers, timeout: float = 20.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if servers.engine.num_unfinished() == 0:
            time.sleep(0.2)  # let the loop finish its step
            if servers.engine.engine.scheduler.stats()["used_blocks"] == 0:
                return True
        time.sleep(0.05)
    return False


def test_models_health_and_completion(server, offline):
    servers, url, _ = server
    client = _client(url)
    assert [m.id for m in client.models.list().data] == ["stories"]
    assert httpx.get(f"{url}/health").status_code == 200
    r = client.completions.create(model="stories", prompt="Once upon a time", max_tokens=32, temperature=0)
    assert r.choices[0].text == offline["Once upon a time"].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 32 and r.usage.prompt_tokens == 5 and r.usage.total_tokens == 37
    many = client.completions.create(model="stories", prompt=PROMPTS[:3], max_tokens=32, temperature=0, n=2)
    assert len(many.choices) == 6
    assert [c.text for c in many.choices] == [offline[p].text for p in PROMPTS[:3] for _ in range(2)]


def test_streaming_with_usage(server, offline):
    _, url, _ = server
    client = _client(url)
    chunks = list(client.completions.create(model="stories", prompt="The cat", max_tokens=32, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == offline["The cat"].text
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 32
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_64_concurrent_streams_equal_the_offline_api(server, offline):
    _, url, _ = server

    async def one(client, prompt):
        stream = await client.completions.create(model="stories", prompt=prompt, max_tokens=32, temperature=0,
                                                 stream=True)
        return prompt, "".join([c.choices[0].text async for c in stream if c.choices])

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120) as client:
            return await asyncio.gather(*(one(client, PROMPTS[i % len(PROMPTS)]) for i in range(64)))
    results = asyncio.run(main())
    assert len(results) == 64
    for prompt, text in results:
        assert text == offline[prompt].text, prompt


def test_a_client_that_goes_away_leaves_no_blocks(server):
    servers, url, _ = server
    body = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=30) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen == 3:
                break  # leave mid-stream
    assert _idle_and_empty(servers)
    assert servers.engine.metrics.render().count(b"flashpage:request_success_total") > 0


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "x", "max_tokens": -5}, 400, "max_tokens"),
    ({"prompt": "x", "max_tokens": 10**9}, 400, "maximum context length is 256"),
    ({"prompt": "x", "model": "nope"}, 404, "`nope` does not exist"),
    ({"prompt": [5] * 300}, 400, "maximum context length"),
    ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": 17}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": [999999]}, 400, "outside the vocabulary"),
])
def test_bad_completion_requests(server, body, status, needle):
    _, url, _ = server
    r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"]


def test_malformed_bodies_and_auth(server):
    servers, url, _ = server
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "x", ', headers=auth)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "\xff\xfe"}', headers=auth)
    assert r.status_code == 400
    r = httpx.post(f"{url}/v1/completions", content=b'{"prompt": "' + b"a" * (80 << 10) + b'"}', headers=auth)
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200  # no key needed
    # Overload: with no room for waiting requests, new ones get 429 at once.
    servers.engine.max_waiting_requests, servers.engine._waiting = 1, 1
    try:
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers=auth)
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
    finally:
        servers.engine.max_waiting_requests, servers.engine._waiting = 1024, 0
    # Everyone else is still served.
    ok = _client(url).completions.create(model="stories", prompt="One day", max_tokens=4, temperature=0)
    assert len(ok.choices[0].text) > 0
    assert _idle_and_empty(servers)


def test_metrics(server):
    _, url, _ = server
    _client(url).completions.create(model="stories", prompt="One day", max_tokens=4, temperature=0)
    assert httpx.get(f"{url}/metrics").status_code == 401  # behind the key, like /openapi.json
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("flashpage:num_requests_running", "flashpage:num_requests_waiting", "flashpage:kv_cache_usage_perc",
                 "flashpage:prefix_cache_hit_rate", "flashpage:num_preemptions_total",
                 "flashpage:prompt_tokens_total", "flashpage:generation_tokens_total",
                 "flashpage:time_to_first_token_seconds_bucket", "flashpage:time_per_output_token_seconds_bucket",
                 "flashpage:e2e_request_latency_seconds_bucket"):
        assert name in text, name


def test_chat_and_its_errors(server, smollm_dir):
    _, url, _ = server
    r = httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "stories", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"]  # stories has none
    llm = LLM(smollm_dir, kv_cache_memory_bytes=64 << 20, max_model_len=512, verbose=False)
    args = _args(smollm_dir, served_model_name="smollm2", api_key=None)
    servers = start(args, llm)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{args.port}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        r = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=30, temperature=0)
        assert r.choices[0].message.content == "The capital of France is Paris."
        assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens > 0
        chunks = list(client.chat.completions.create(model="smollm2", messages=messages, max_tokens=30,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
            "The capital of France is Paris."
        assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
        lp = client.chat.completions.create(model="smollm2", messages=messages, max_tokens=3, temperature=0,
                                            logprobs=True, top_logprobs=2)
        content = lp.choices[0].logprobs.content
        assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    finally:
        servers.stop(drain_seconds=2)


def test_draining_refuses_new_requests(server):
    """The last test of the module: after stop() begins, /health is 503 and requests 503."""
    servers, url, _ = server
    servers.engine._draining = True
    try:
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 503 and json.loads(r.text)["error"]["code"] == "unavailable"
    finally:
        servers.engine._draining = False


def test_a_signal_once_clients_can_be_served_shuts_down_cleanly(monkeypatch, capsys):
    """SIGINT after the HTTP server listens but before start() returns (a client may already
    have been answered) is a clean shutdown, not the exit of a signal during loading."""
    import signal
    import types

    from flashpage.serving import server as server_mod

    stopped: list[float] = []
    fake = types.SimpleNamespace(grpc=types.SimpleNamespace(port=4321),
                                 http_thread=types.SimpleNamespace(is_alive=lambda: True),
                                 stop=lambda drain_seconds, force: stopped.append(drain_seconds))

    def fake_start(args, on_listen=None):
        on_listen()
        os.kill(os.getpid(), signal.SIGINT)  # handled before the next bytecode: still inside start()
        return fake

    monkeypatch.setattr(server_mod, "start", fake_start)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        args = argparse.Namespace(served_model_name="m", model="m", host="127.0.0.1", port=1234, shutdown_timeout=3.0)
        assert server_mod.serve(args) == 0
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    out = capsys.readouterr()
    assert "http://127.0.0.1:1234 and grpc 127.0.0.1:4321" in out.out and "stopped" in out.err
    assert stopped == [3.0]


def test_flashpage_serve_command(tmp_path):
    """`flashpage serve` as users run it: up, answers, and stops cleanly on SIGINT."""
    import signal
    import subprocess
    import sys
    port, grpc_port = _free_port(), _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flashpage.cli", "serve", STORIES, "--port", str(port),
                             "--grpc-port", str(grpc_port), "--kv-cache-memory-bytes", str(16 << 20),
                             "--served-model-name", "stories"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        wait_healthy(f"http://127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions",
                       json={"model": "stories", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200 and r.json()["choices"][0]["text"].startswith(", there was")
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"http://127.0.0.1:{port}" in out and f"grpc 127.0.0.1:{grpc_port}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
