"""A soak of `flashpage serve` over loopback: many concurrent clients send thousands of requests
with random parameters (completions and chat, streamed or not, n, stop strings, logprobs,
penalties, invalid ones), ~20 % of them abandoned midway; afterwards the server must hold zero
running and waiting requests and zero live KV blocks, every finished request must carry a
correct finish reason, and resident memory may grow by at most --max-rss-growth-mb over the
second half of the soak. (The first half is the warm-up: glibc's heaps and the sampler's
buffers grow with the largest batch shapes seen, to a plateau that depends on the load, not on
the number of requests: ~45 MB over the first 10,000 requests offline, flat after.)

    python -m flashpage.bench.soak [MODEL] --requests 20000 --concurrency 64 [--json out.json]

MODEL defaults to ../shared/models/stories260K; the server runs as a subprocess (its own RSS)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

CHAT_TEMPLATE = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
_JSON = {"Content-Type": "application/json"}
WORDS = ["Once", "upon", "a", "time", "the", "cat", "sat", "Lily", "and", "Ben", "went", "to", "park", "happy"]


@dataclass
class SoakReport:
    requests: int = 0
    completed: int = 0
    abandoned: int = 0
    refused_as_expected: int = 0
    wrong: list[str] = field(default_factory=list)  # requests whose outcome was wrong, with why
    seconds: float = 0.0
    rss_after_warmup_mb: float = 0.0  # at the half-way request
    rss_end_mb: float = 0.0
    rss_samples: list[tuple[int, float]] = field(default_factory=list)  # (requests sent, MB) every tenth
    end_state: dict = field(default_factory=dict)  # running, waiting, kv usage after the soak

    @property
    def rss_growth_mb(self) -> float:
        return self.rss_end_mb - self.rss_after_warmup_mb

    def ok(self, max_rss_growth_mb: float) -> bool:
        clean = self.end_state.get("running") == 0 and self.end_state.get("waiting") == 0 \
            and self.end_state.get("kv_usage") == 0
        return not self.wrong and clean and self.rss_growth_mb <= max_rss_growth_mb


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _gauge(text: str, name: str) -> float | None:
    m = re.search(rf"^flashpage:{name}\{{[^}}]*\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _request(rng: random.Random) -> tuple[str, dict, bool]:
    """(path, body, valid): a random request; about 5 % are invalid on purpose."""
    prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 40)))
    body: dict = {"max_tokens": rng.randint(1, 64), "stream": rng.random() < 0.5,
                  "temperature": rng.choice([0, 0, 0.7, 1.0]), "n": rng.choice([1, 1, 1, 2, 3])}
    if rng.random() < 0.3:
        body["stop"] = rng.sample(WORDS, rng.randint(1, 3))
    if rng.random() < 0.2:
        body["top_p"], body["top_k"] = rng.choice([0.5, 0.9]), rng.choice([0, 5, 40])
    if rng.random() < 0.2:
        body["presence_penalty"], body["repetition_penalty"] = rng.uniform(-1, 1), rng.uniform(0.8, 1.3)
    if rng.random() < 0.1:
        body["ignore_eos"] = True
    if rng.random() < 0.5:
        path = "/v1/completions"
        body["prompt"] = prompt if rng.random() < 0.8 else [prompt, prompt[::-1] or "x"]
        if rng.random() < 0.2:
            body["logprobs"] = rng.randint(0, 5)
    else:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": prompt}]
        if rng.random() < 0.2:
            body["logprobs"], body["top_logprobs"] = True, rng.randint(0, 5)
    if rng.random() < 0.05:  # invalid on purpose: the server must refuse it and go on
        body[rng.choice(["top_p", "n", "max_tokens", "top_k"])] = rng.choice([-5, 1e999, 10**9])
        return path, body, False
    return path, body, True


def _check_choice(c: dict, body: dict, tokens: int | None) -> str | None:
    reason = c.get("finish_reason")
    if reason not in ("stop", "length"):
        return f"finish_reason {reason!r}"
    if tokens is not None and reason == "length" and tokens != body["max_tokens"]:
        return f"finish_reason length after {tokens} of max_tokens={body['max_tokens']}"
    if tokens is not None and tokens > body["max_tokens"]:
        return f"{tokens} tokens > max_tokens={body['max_tokens']}"
    return None


async def _one(client, url: str, rng: random.Random, report: SoakReport) -> None:
    import httpx

    path, body, valid = _request(rng)
    abandon = valid and rng.random() < 0.2
    report.requests += 1
    try:
        if not valid:
            r = await client.post(url + path, content=json.dumps(body), headers=_JSON)
            _settle(report, valid, r.status_code, path)
            return
        if body["stream"]:
            choices: dict[int, dict] = {}
            counts: dict[int, int] = {}
            async with client.stream("POST", url + path, content=json.dumps(body), headers=_JSON) as r:
                if r.status_code != 200:
                    await r.aread()
                    _settle(report, valid, r.status_code, path)
                    return
                cut = rng.randint(1, 5) if abandon else None
                seen = done = 0
                async for line in r.aiter_lines():
                    if line == "data: [DONE]":
                        done = 1
                    elif line.startswith("data: {"):
                        seen += 1
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            report.wrong.append(f"{path} error event {chunk['error']}")
                            return
                        for c in chunk.get("choices", []):
                            if c.get("finish_reason") is not None and choices.get(c["index"], {}).get("finish_reason"):
                                report.wrong.append(f"{path} choice {c['index']} finished twice")
                            prev = choices.setdefault(c["index"], {})
                            prev["finish_reason"] = c.get("finish_reason") or prev.get("finish_reason")
                            counts[c["index"]] = counts.get(c["index"], 0) + (1 if c.get("text") or c.get("delta", {}).get("content") else 0)
                    if cut is not None and seen >= cut:
                        report.abandoned += 1
                        return  # leaving mid-stream
            if not done:
                report.wrong.append(f"{path} stream without [DONE]")
            n = body["n"] * (len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1)
            if len(choices) != n:
                report.wrong.append(f"{path} {len(choices)} of {n} choices finished")
            for c in choices.values():
                why = _check_choice(c, body, None)
                if why:
                    report.wrong.append(f"{path} {why}")
            report.completed += 1
            return
        timeout = rng.uniform(0.01, 0.3) if abandon else None
        try:
            r = await asyncio.wait_for(client.post(url + path, content=json.dumps(body), headers=_JSON), timeout)
        except asyncio.TimeoutError:
            report.abandoned += 1
            return
        if r.status_code != 200:
            _settle(report, valid, r.status_code, path)
            return
        out = r.json()
        usage = out["usage"]
        single = len(out["choices"]) == 1
        for c in out["choices"]:
            why = _check_choice(c, body, usage["completion_tokens"] if single else None)
            if why:
                report.wrong.append(f"{path} {why}")
        report.completed += 1
    except httpx.HTTPError as e:
        report.wrong.append(f"{path} {type(e).__name__}: {e}")


def _settle(report: SoakReport, valid: bool, status: int, path: str) -> None:
    if not valid and status == 400:
        report.refused_as_expected += 1
    else:
        report.wrong.append(f"{path} HTTP {status} for a {'valid' if valid else 'invalid'} request")


async def _soak(url: str, pid: int, requests: int, concurrency: int, seed: int, report: SoakReport) -> None:
    import httpx

    rng = random.Random(seed)
    warmup = max(1, requests // 2)
    every = max(1, requests // 10)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker(k: int) -> None:
        wrng = random.Random(rng.random())
        async with httpx.AsyncClient(timeout=120) as client:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await _one(client, url, wrng, report)
                if i == warmup:
                    report.rss_after_warmup_mb = rss_mb(pid)
                if i % every == 0:
                    report.rss_samples.append((i, round(rss_mb(pid), 1)))
    t0 = time.monotonic()
    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    report.seconds = time.monotonic() - t0


def settle(url: str, timeout: float = 30.0) -> dict:
    """The gauges once the server has nothing left to do (aborts land within a step)."""
    import httpx

    deadline = time.time() + timeout
    state: dict = {}
    while time.time() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=10).text
        state = {"running": _gauge(text, "num_requests_running"), "waiting": _gauge(text, "num_requests_waiting"),
                 "kv_usage": _gauge(text, "kv_cache_usage_perc")}
        if state == {"running": 0, "waiting": 0, "kv_usage": 0}:
            break
        time.sleep(0.2)
    return state


def run(url: str, pid: int, *, requests: int, concurrency: int, seed: int = 0) -> SoakReport:
    report = SoakReport()
    asyncio.run(_soak(url, pid, requests, concurrency, seed, report))
    report.end_state = settle(url)
    report.rss_end_mb = rss_mb(pid)
    return report


def start_server(model: str, port: int, extra: list[str] | None = None) -> subprocess.Popen:
    import httpx

    with open(os.devnull, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "flashpage.cli", "serve", model, "--port", str(port),
                                 "--grpc-port", "0", "--served-model-name", "soak", "--chat-template", CHAT_TEMPLATE,
                                 *(extra or [])], stdout=sink, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up")


def main(argv: list[str] | None = None) -> int:
    here = os.path.dirname(os.path.abspath(__file__))
    default_model = os.path.normpath(os.path.join(here, "..", "..", "..", "..", "shared", "models", "stories260K"))
    p = argparse.ArgumentParser(prog="python -m flashpage.bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=default_model)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-rss-growth-mb", type=float, default=32.0, help="over the second half")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    proc = start_server(args.model, args.port, ["--kv-cache-memory-bytes", str(64 << 20), "--max-n", "8"])
    try:
        report = run(f"http://127.0.0.1:{args.port}", proc.pid, requests=args.requests,
                     concurrency=args.concurrency, seed=args.seed)
    finally:
        proc.terminate()
        proc.wait(60)
    summary = {**asdict(report), "wrong": report.wrong[:20], "num_wrong": len(report.wrong),
               "rss_growth_mb": report.rss_growth_mb, "exit_status": proc.returncode,
               "ok": report.ok(args.max_rss_growth_mb) and proc.returncode == 0}
    print(json.dumps(summary, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
