"""A bounded soak of `flashpage serve` (the full one is `python -m flashpage.bench.soak`):
3,000 random requests from 48 concurrent clients, ~20 % abandoned, ~5 % invalid; afterwards no
running or waiting request, no live KV block, every finished request with a correct finish
reason, and resident memory within 32 MB over the second half (the first is the warm-up)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("httpx")

from flashpage.bench import soak  # noqa: E402
from model_fixtures import STORIES  # noqa: E402
from test_openai_server import _free_port  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")


def test_a_bounded_soak_leaves_nothing_behind():
    port = _free_port()
    proc = soak.start_server(STORIES, port, ["--kv-cache-memory-bytes", str(64 << 20), "--max-n", "8"])
    try:
        report = soak.run(f"http://127.0.0.1:{port}", proc.pid, requests=3000, concurrency=48, seed=1)
    finally:
        proc.terminate()
        proc.wait(60)
    assert not report.wrong, report.wrong[:10]
    assert report.end_state == {"running": 0, "waiting": 0, "kv_usage": 0}
    assert report.completed > 2000 and report.abandoned > 300 and report.refused_as_expected > 50
    assert report.rss_growth_mb < 32, f"RSS grew {report.rss_growth_mb:.1f} MB: {report.rss_samples}"
    assert proc.returncode == 0
