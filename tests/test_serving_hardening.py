"""The adversarial probe of issue 15, one test per defect it found: hostile chat templates,
unbounded multipliers, request ids shared across clients, idle and slow connections, work after
the client left, a blocked event loop, repeated finish reasons, errors outside OpenAI's shape,
silently accepted values, stale metrics, exposure; and fault injection (a KV cache too small for
the load, a step that raises, a wedged engine). Shutdown by signal is in test_serve_shutdown.py."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
grpc = pytest.importorskip("grpc")

from flashpage import LLM, SamplingParams  # noqa: E402
from flashpage.chat_template import TemplateBudgetError, render  # noqa: E402
from flashpage.serving.async_engine import AsyncLLMEngine, EngineOverloaded  # noqa: E402
from flashpage.serving.server import start  # noqa: E402
from flashpage.serving.v1 import flashpage_pb2 as pb  # noqa: E402
from flashpage.serving.v1 import flashpage_pb2_grpc as pb_grpc  # noqa: E402
from model_fixtures import STORIES  # noqa: E402
from test_openai_server import KEY, _args, _free_port, _idle_and_empty, wait_healthy  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
AUTH = {"Authorization": f"Bearer {KEY}"}
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
SIMPLE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"


@pytest.fixture(scope="module")
def server():
    llm = LLM(STORIES, kv_cache_memory_bytes=64 << 20, max_model_len=256, verbose=False)
    args = _args(STORIES, grpc_port=_free_port(), header_timeout=0.5, body_timeout=1.0, max_connections=40,
                 chat_template=SIMPLE, max_n=8, max_waiting_requests=64)
    servers = start(args, llm)
    yield servers, f"http://127.0.0.1:{args.port}", llm
    servers.stop(drain_seconds=2)


def _post(url: str, path: str, body, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=30, **kw)


def _error(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def _health_seconds_during(url: str, started: threading.Event, path: str, body: dict) -> tuple[float, int]:
    """Sends body to path in a thread; once `started` is set (its slow work began), times a
    GET /health; returns (those seconds, the request's status)."""
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", _post(url, path, body)))
    t.start()
    assert started.wait(10)
    t0 = time.monotonic()
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    seconds = time.monotonic() - t0
    t.join(30)
    return seconds, result["r"].status_code


class _Slowed:
    """Every engine step sleeps `delay` first: long requests for tests that act mid-request."""

    def __init__(self, servers, delay: float) -> None:
        self.engine, self.delay = servers.engine.engine, delay

    def __enter__(self):
        step = type(self.engine).step

        def slow(*a, **kw):
            time.sleep(self.delay)
            return step(self.engine, *a, **kw)
        self.engine.step = slow
        return self

    def __exit__(self, *exc):
        del self.engine.step


# ---- 1. chat templates ---------------------------------------------------------------------

def test_requests_cannot_bring_their_own_template_or_reserved_arguments(server):
    _, url, _ = server
    msgs = [{"role": "user", "content": "hi"}]
    for extra, needle in [({"chat_template_kwargs": {"chat_template": LOOP}}, "chat_template"),
                          ({"chat_template": LOOP}, "chat_template"),
                          ({"chat_template_kwargs": {"add_generation_prompt": False}}, "add_generation_prompt"),
                          ({"chat_template_kwargs": {"messages": []}}, "messages")]:
        r = _post(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2, **extra})
        assert r.status_code == 400, r.text
        assert needle in _error(r)["message"]
    ok = _post(url, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2,
                                             "chat_template_kwargs": {"enable_thinking": False}})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("template", [
    LOOP, "{{ 'x' * 500000000 }}", "{{ 'x'|center(500000000) }}", "{{ '{:>500000000}'.format(1) }}",
    "{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro f() %}{{ f() ~ f() }}{% endmacro %}{{ f() }}", "{{ 10 ** (10 ** 9) }}",
])
def test_hostile_templates_stop_within_their_budget(template):
    t0 = time.monotonic()
    with pytest.raises(TemplateBudgetError):
        render(template, [{"role": "user", "content": "hi"}])
    assert time.monotonic() - t0 < 30  # bounded (the budget is ~1 s of work); not a speed claim


def test_a_looping_template_in_a_model_ends_llm_chat_with_an_error(server):
    _, _, llm = server
    from flashpage.chat_template import ChatTemplateError
    llm2 = LLM(STORIES, kv_cache_memory_bytes=16 << 20, max_model_len=256, verbose=False)
    llm2.tokenizer.chat_template = LOOP
    with pytest.raises(ChatTemplateError, match="operations"):
        llm2.chat([{"role": "user", "content": "hi"}])


def test_an_operator_template_that_loops_is_a_400_and_the_loop_stays_free(server):
    servers, url, _ = server
    tok = servers.engine.engine.tokenizer
    original = tok.apply_chat_template
    entered = threading.Event()

    def slow_template(*a, **kw):  # rendering that takes 2 s: must not hold the event loop
        entered.set()
        time.sleep(2.0)
        return original(*a, **kw)
    tok.apply_chat_template = slow_template
    try:
        health_s, status = _health_seconds_during(url, entered, "/v1/chat/completions",
                                                  {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 200
        assert health_s < 1.5, f"/health waited {health_s:.2f} s behind a template render"
    finally:
        tok.apply_chat_template = original


# ---- 2. unbounded multipliers ----------------------------------------------------------------

@pytest.mark.parametrize("body,needle", [
    ({"prompt": "x", "n": 1000000000}, "n: 1000000000"),
    ({"prompt": ["x"] * 2500}, "prompt: 2500 prompts"),
    ({"prompt": ["x"] * 40, "n": 8}, "sequences"),
    ({"prompt": "x", "stop": ["s"] * 100}, "stop strings"),
    ({"prompt": "x", "stop": ["s" * 5000]}, "characters in a stop string"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "prompt_logprobs": 100}, "prompt_logprobs"),
    ({"prompt": "x" * 20000}, "cannot fit"),
])
def test_every_multiplier_is_bounded_over_http(server, body, needle):
    _, url, _ = server
    r = _post(url, "/v1/completions", {"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert needle in _error(r)["message"]


def test_grpc_has_the_same_limits(server):
    servers, _, _ = server
    with grpc.insecure_channel(f"127.0.0.1:{servers.grpc.port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        md = (("authorization", f"Bearer {KEY}"),)
        for params, needle in [(pb.SamplingParams(logprobs=49152, n=8), "logprobs"),
                               (pb.SamplingParams(n=1000000000), "n: 1000000000"),
                               (pb.SamplingParams(stop=["s"] * 100), "stop strings")]:
            with pytest.raises(grpc.RpcError) as e:
                list(stub.Generate(pb.GenerateRequest(text="x", params=params), metadata=md, timeout=30))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="x" * 20000), metadata=md, timeout=30))
        assert "cannot fit" in e.value.details()


def test_admission_counts_sequences_not_requests():
    llm = LLM(STORIES, kv_cache_memory_bytes=16 << 20, max_model_len=256, verbose=False)
    engine = AsyncLLMEngine(llm.llm_engine, max_waiting_requests=8)
    try:
        engine.reserve(6)
        with pytest.raises(EngineOverloaded):
            engine.reserve(3)  # 6 + 3 > 8: a request of n = 3 counts 3
        with pytest.raises(ValueError, match="9 sequences"):
            engine.reserve(9)  # could never be admitted: refused, not "retry later"

        async def one():  # generate() with n = 3 charges 3 as well
            return [o async for o in engine.generate("x", SamplingParams(n=3, max_tokens=2))]
        with pytest.raises(EngineOverloaded):
            asyncio.run(one())
    finally:
        engine.shutdown(timeout=5, drain=False)


# ---- 4. request ids ------------------------------------------------------------------------

def test_client_request_ids_are_labels_not_keys(server):
    servers, url, _ = server
    with grpc.insecure_channel(f"127.0.0.1:{servers.grpc.port}") as channel:
        stub = pb_grpc.GenerationStub(channel)
        md = (("authorization", f"Bearer {KEY}"),)
        params = pb.SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
        with _Slowed(servers, 0.01):
            calls = [stub.Generate(pb.GenerateRequest(request_id=f"req-{i % 3}", text="Once upon a time",
                                                      params=params), metadata=md, timeout=60) for i in range(6)]
            first = next(calls[0])
            assert first.request_id == "req-0"
            calls[0].cancel()  # cancelling "req-0" must not touch anyone else's request
            r = _post(url, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
            assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"
            for call in calls[1:]:
                msgs = list(call)
                assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH
                assert {m.request_id for m in msgs} in ({"req-1"}, {"req-2"}, {"req-0"})
    assert _idle_and_empty(servers)


# ---- 5. connections ------------------------------------------------------------------------

def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (TimeoutError, socket.timeout):
        return False
    except OSError:
        return True


def test_idle_and_slow_header_connections_are_closed(server):
    _, url, _ = server
    idle = _connect(url)
    assert _closed_within(idle, 10)  # header_timeout 0.5 s
    slow = _connect(url)
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    time.sleep(0.3)
    slow.sendall(b"X-a: b\r\n")  # still no end of headers
    assert _closed_within(slow, 10)


def test_a_slow_body_gets_408(server):
    _, url, _ = server
    s = _connect(url)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
              + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
    s.settimeout(10)
    for _ in range(3):  # a byte now and then, never the whole body
        time.sleep(0.4)
        try:
            s.sendall(b" ")
        except OSError:
            break
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    s.close()
    assert data.startswith(b"HTTP/1.1 408"), data


def test_connections_beyond_the_limit_get_503_and_the_server_goes_on(server):
    _, url, _ = server
    held = []
    try:
        for _ in range(60):  # the limit is 40
            held.append(_connect(url))
        s = _connect(url)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 503")
        s.close()
    finally:
        for s in held:
            s.close()
    wait_healthy(url, timeout=10)


# ---- 6. work after the client left -----------------------------------------------------------

def test_a_non_streamed_request_is_aborted_when_its_client_leaves(server, caplog):
    servers, url, _ = server
    before = servers.engine.metrics.render().decode()
    body = json.dumps({"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}).encode()
    with _Slowed(servers, 0.02):  # 200 tokens would take 4 s
        s = _connect(url)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)
        deadline = time.time() + 10
        while servers.engine.num_unfinished() == 0 and time.time() < deadline:
            time.sleep(0.01)
        s.close()
        t0 = time.monotonic()
        assert _idle_and_empty(servers, timeout=10)
        assert time.monotonic() - t0 < 3.5  # ended, not run to its 200 tokens
    after = servers.engine.metrics.render().decode()
    key = 'flashpage:request_success_total{finished_reason="abort",model_name="stories"}'

    def count(text: str) -> float:
        line = next((x for x in text.splitlines() if x.startswith(key)), None)
        return float(line.split()[-1]) if line else 0.0
    assert count(after) == count(before) + 1
    time.sleep(0.2)
    assert "unhandled error" not in caplog.text


# ---- 7. the event loop -----------------------------------------------------------------------

def test_tokenizing_runs_off_the_event_loop_and_big_prompts_are_refused_first(server):
    servers, url, _ = server
    tok = servers.engine.engine.tokenizer
    original = tok.encode
    calls = []
    entered = threading.Event()

    def slow_encode(text, *a, **kw):
        calls.append(len(text))
        entered.set()
        time.sleep(2.0)
        return original(text, *a, **kw)
    tok.encode = slow_encode
    try:
        r = _post(url, "/v1/completions", {"prompt": "y" * 20000, "max_tokens": 2})
        assert r.status_code == 400 and not calls  # refused before any tokenizing
        health_s, status = _health_seconds_during(url, entered, "/v1/completions", {"prompt": "Once", "max_tokens": 2})
        assert status == 200
        assert health_s < 1.5, f"/health waited {health_s:.2f} s behind tokenizing"
    finally:
        tok.encode = original


# ---- 8. the stream ---------------------------------------------------------------------------

def test_n2_streams_send_each_finish_reason_once(server):
    _, url, _ = server
    for _ in range(5):
        finishes = {0: 0, 1: 0}
        with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=30,
                          json={"prompt": "Once upon a time", "max_tokens": 30, "n": 2, "stream": True,
                                "temperature": 1.0, "stop": ["."]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    for c in json.loads(line[6:])["choices"]:
                        if c["finish_reason"] is not None:
                            finishes[c["index"]] += 1
        assert finishes == {0: 1, 1: 1}


# ---- 9. errors in OpenAI's shape -----------------------------------------------------------------

@pytest.mark.parametrize("content,status", [
    (b'{"prompt": "x", "stop_token_ids": [1099511627776]}', 400),
    (b'{"prompt": "\\ud800", "max_tokens": 2}', 400),
    (b'{"prompt": "\xff\xfe"}', 400),
    (b"[" * 30000 + b"]" * 30000, 400),
    (b'{"prompt": "x", "stop_token_ids": [-5]}', 400),
    (b'{"prompt": "x", "temperature": 1e999}', 400),
    (b'{"prompt": "x", "repetition_penalty": 1e999}', 400),
    (b'{"prompt": "x", "top_k": 1099511627776}', 400),
    (b'{"prompt": "x", "logit_bias": {"abc": 1}}', 400),
    (b'{"prompt": "x", "logit_bias": {"5": 1000}}', 400),
    (b'{"prompt": "x", "seed": 100000000000000000000000}', 400),
], ids=["huge-stop-id", "lone-surrogate", "invalid-utf8", "deep-json", "negative-stop-id", "inf-temperature",
        "inf-repetition-penalty", "huge-top-k", "bias-key", "bias-value", "huge-seed"])
def test_bad_values_get_openai_errors(server, content, status):
    _, url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=content, timeout=30,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    _error(r)


def test_chunked_oversized_bodies_unknown_routes_and_methods(server):
    _, url, _ = server

    def chunks():
        for _ in range(64):
            yield b"a" * (64 << 10)
    r = httpx.post(f"{url}/v1/completions", content=chunks(), headers=AUTH, timeout=30)
    assert r.status_code == 413 and _error(r)["code"] == "body_too_large"
    r = httpx.get(f"{url}/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "no route" in _error(r)["message"]
    r = httpx.get(f"{url}/v1/completions", headers=AUTH)
    assert r.status_code == 405
    _error(r)


def test_logit_bias_steers_the_tokens(server):
    _, url, llm = server
    r = _post(url, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0,
                                       "logit_bias": {"400": 100}})
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"].split() == llm.tokenizer.decode([400]).split() * 5


def test_vocabulary_checks_in_the_engine(server):
    _, _, llm = server
    for params, needle in [(SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
                           (SamplingParams(logit_bias={10**6: 1.0}), "logit_bias"),
                           (SamplingParams(top_k=10**6), "top_k")]:
        with pytest.raises(ValueError, match=needle):
            llm.generate("x", params, use_tqdm=False)
    for kw in (dict(temperature=float("inf")), dict(repetition_penalty=float("inf")), dict(top_k=2**40),
               dict(presence_penalty=float("nan")), dict(logit_bias={1: float("inf")})):
        with pytest.raises(ValueError):
            SamplingParams(**kw)


# ---- 11. metrics ---------------------------------------------------------------------------------

def test_metrics_settle_after_a_cancel_while_idle(server):
    servers, url, _ = server
    with _Slowed(servers, 0.02):
        with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=30,
                          json={"prompt": "Once upon a time", "max_tokens": 200, "stream": True,
                                "ignore_eos": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break
    deadline = time.time() + 5
    text = ""
    while time.time() < deadline:
        text = httpx.get(f"{url}/metrics", headers=AUTH).text
        if 'flashpage:num_requests_running{model_name="stories"} 0.0' in text:
            break
        time.sleep(0.1)
    assert 'flashpage:num_requests_running{model_name="stories"} 0.0' in text


# ---- 12. exposure ----------------------------------------------------------------------------------

def test_served_name_key_file_and_an_exclusive_grpc_port(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("from-a-file\n")
    llm = LLM(STORIES, kv_cache_memory_bytes=16 << 20, max_model_len=256, verbose=False)
    args = _args(STORIES, served_model_name=None, api_key=None, api_key_file=str(key_file), grpc_port=_free_port())
    servers = start(args, llm)
    try:
        url = f"http://127.0.0.1:{args.port}"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer from-a-file"}).json()
        assert [m["id"] for m in models["data"]] == ["stories260K"]  # the directory's name, not its path
        metrics = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer from-a-file"}).text
        assert os.path.dirname(os.path.abspath(STORIES)) not in metrics
        again = _args(STORIES, api_key=None, grpc_port=servers.grpc.port)
        with pytest.raises(RuntimeError, match="gRPC server did not start"):
            start(again, llm)
    finally:
        servers.stop(drain_seconds=1)


# ---- fault injection -----------------------------------------------------------------------------

def test_kv_exhaustion_under_load_gives_the_unconstrained_greedy_tokens():
    prompts = [f"Once upon a time {i}" for i in range(12)]
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    roomy = LLM(STORIES, kv_cache_memory_bytes=32 << 20, max_model_len=256, verbose=False)
    want = {o.prompt: o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)}
    # 12 sequences of up to ~130 tokens need ~100 blocks of 16: give the cache a third of that.
    per_block = (32 << 20) // int(roomy.model_info["num_kv_blocks"])
    tiny = LLM(STORIES, kv_cache_memory_bytes=32 * per_block, max_model_len=256, verbose=False)
    assert int(tiny.model_info["num_kv_blocks"]) == 32
    engine = AsyncLLMEngine(tiny.llm_engine)
    try:
        async def one(p):
            return p, [t async for out in engine.generate(p, params) for t in out.outputs[0].token_ids]

        async def main():
            return await asyncio.gather(*(one(p) for p in prompts))
        got = dict(asyncio.run(main()))
        stats = tiny.llm_engine.scheduler.stats()
        assert stats["num_preemptions"] > 0, "the cache was not small enough to preempt"
        assert got == want
    finally:
        engine.shutdown(timeout=5, drain=False)


def test_a_step_that_raises_ends_only_its_requests(server):
    servers, url, _ = server
    eng = servers.engine.engine
    victim = threading.Event()
    original = type(eng)._forward_and_sample

    def faulty(self, st, seqs, forked):
        if any(s.params.max_tokens == 77 for s in seqs) and not victim.is_set():
            victim.set()
            raise RuntimeError("injected fault")
        return original(self, st, seqs, forked)
    eng._forward_and_sample = faulty.__get__(eng)
    try:
        with httpx.stream("POST", f"{url}/v1/completions", headers=AUTH, timeout=30,
                          json={"prompt": "Once upon a time", "max_tokens": 77, "stream": True}) as r:
            lines = [x for x in r.iter_lines() if x.startswith("data: ")]
        assert r.status_code in (200, 500)
        if r.status_code == 200:
            assert "injected fault" in lines[-2] and lines[-1] == "data: [DONE]"
        ok = _post(url, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
        assert ok.status_code == 200 and ok.json()["choices"][0]["finish_reason"] == "length"
    finally:
        del eng._forward_and_sample
    assert victim.is_set() and _idle_and_empty(servers)


def test_health_turns_503_while_the_engine_is_wedged(server):
    servers, url, _ = server
    servers.engine.watchdog_seconds = 0.3
    try:
        with _Slowed(servers, 1.5):
            t = threading.Thread(target=lambda: _post(url, "/v1/completions", {"prompt": "x", "max_tokens": 1}))
            t.start()
            deadline = time.time() + 5
            codes = set()
            while time.time() < deadline and 503 not in codes:
                codes.add(httpx.get(f"{url}/health", timeout=5).status_code)
                time.sleep(0.05)
            t.join(30)
        assert 503 in codes
        assert httpx.get(f"{url}/health", timeout=5).status_code == 200
    finally:
        servers.engine.watchdog_seconds = 60.0


# ---- memory ----------------------------------------------------------------------------------------

def test_unique_prompts_do_not_fill_the_tokenizers_word_cache():
    """stories260K's sentencepiece-style tokenizer treats a whole prompt as one "word": its BPE
    cache kept ~4 KB per unique prompt, up to 10,000 of them (found by the soak's RSS curve)."""
    import ctypes
    import random

    from flashpage.tokenizer import Tokenizer

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")
    tok = Tokenizer(STORIES)
    rng = random.Random(0)
    words = ["Once", "upon", "a", "time", "the", "cat", "sat", "Lily", "and", "Ben"]
    for _ in range(200):
        tok.encode(" ".join(rng.choice(words) for _ in range(30)))
    before = libc.mallinfo2().uordblks
    for _ in range(3000):
        tok.encode(" ".join(rng.choice(words) for _ in range(rng.randint(1, 40))))
    grown = (libc.mallinfo2().uordblks - before) / 2**20
    assert grown < 4, f"{grown:.1f} MB kept after 3,000 unique prompts"
