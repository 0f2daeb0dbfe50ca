"""`flashpage serve` stopped by signals, as Kubernetes and shells stop it: SIGTERM drains (new
requests 503, running ones finish), --shutdown-timeout ends the rest with a final "abort" chunk
and [DONE], a second signal skips the wait, a server started as a shell's background job (SIGINT
ignored) still stops on SIGINT, and the exit status is 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")

from model_fixtures import STORIES  # noqa: E402
from test_openai_server import _free_port, wait_healthy  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
# One sequence at a time, 500 tokens each (~0.5 s a stream here): requests stay in flight.
SERVE = [sys.executable, "-m", "flashpage.cli", "serve", STORIES, "--kv-cache-memory-bytes", str(32 << 20),
         "--max-num-seqs", "1", "--served-model-name", "stories", "--grpc-port", "0"]
BODY = {"model": "stories", "prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True, "stream": True}


class _Stream(threading.Thread):
    """One streamed completion: its last finish reason, whether [DONE] came, its first chunk."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.finish, self.done, self.error = url, None, False, None
        self.first = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=BODY, timeout=60) as r:
                for line in r.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: {"):
                        self.first.set()
                        for c in json.loads(line[6:]).get("choices", []):
                            self.finish = c["finish_reason"] or self.finish
        except httpx.HTTPError as e:
            self.error = e
        finally:
            self.first.set()


def _all_admitted(url: str, n: int, timeout: float = 30.0) -> None:
    """Until the server holds n requests (running + waiting): a signal sent earlier would
    rightly answer the late ones 503."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = httpx.get(f"{url}/metrics", timeout=5).text
        held = sum(float(line.split()[-1]) for line in text.splitlines()
                   if line.startswith(("flashpage:num_requests_running{", "flashpage:num_requests_waiting{")))
        if held >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the server never held {n} requests")


def _serve() -> tuple[subprocess.Popen, str]:
    """`flashpage serve` in a subprocess with a long --shutdown-timeout, once healthy."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([*SERVE, "--port", str(port), "--shutdown-timeout", "60"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait_healthy(url)
    return proc, url


def test_sigterm_drains_new_requests_503_running_ones_finish():
    proc, url = _serve()
    try:
        streams = [_Stream(url) for _ in range(4)]
        _all_admitted(url, 4)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late = httpx.post(f"{url}/v1/completions", json={**BODY, "stream": False, "max_tokens": 2}, timeout=10)
        assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
        assert httpx.get(f"{url}/health", timeout=5).status_code == 503
        for s in streams:
            s.join(60)
        out, _ = proc.communicate(timeout=60)
        assert proc.returncode == 0, out
        assert [(s.finish, s.done, s.error) for s in streams] == [("length", True, None)] * 4
    finally:
        if proc.poll() is None:
            proc.kill()


def test_the_shutdown_timeout_aborts_the_rest_with_a_final_chunk_and_a_second_signal_is_prompt():
    proc, url = _serve()
    try:
        streams = [_Stream(url) for _ in range(6)]  # ~3 s of work
        _all_admitted(url, 6)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # the second: no more waiting
        out, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        for s in streams:
            s.join(30)
        assert proc.returncode == 0, out
        assert "terminate called" not in out, out
        assert all(s.done and s.error is None for s in streams), [(s.finish, s.done, s.error) for s in streams]
        assert "abort" in [s.finish for s in streams]
        assert set(s.finish for s in streams) <= {"length", "abort"}
        assert took < 10, f"the second signal took {took:.1f} s"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_background_job_stops_on_sigint_after_its_timeout(tmp_path):
    """`bash -c 'flashpage serve ... &'`: the shell starts it with SIGINT ignored."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    cmd = " ".join([*SERVE, "--port", str(port), "--shutdown-timeout", "0.5"])
    pid = int(subprocess.run(["bash", "-c", f"{cmd} > {log} 2>&1 & echo $!"], capture_output=True, text=True,
                             check=True).stdout.strip())
    try:
        wait_healthy(url)
        streams = [_Stream(url) for _ in range(6)]
        _all_admitted(url, 6)
        os.kill(pid, signal.SIGINT)
        deadline = time.time() + 30
        while time.time() < deadline and os.path.exists(f"/proc/{pid}") and \
                "zombie" not in open(f"/proc/{pid}/status").read():
            time.sleep(0.1)
        for s in streams:
            s.join(30)
        text = log.read_text()
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read(), text
        assert "flashpage: stopped" in text, text
        assert all(s.done and s.error is None for s in streams), [(s.finish, s.done, s.error) for s in streams]
        assert "abort" in [s.finish for s in streams]
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
