"""Serving benchmark: what the HTTP server and the async engine cost beside the offline API.

    python -m flashpage.bench.serving [--shape 110m] [--clients 32] [--max-tokens 64] [--repeats 3]

The dummy-weight model of --shape (as flashpage.bench.cpu_model writes it) is served on a free
loopback port; --clients concurrent streaming /v1/completions requests (16-token prompts of
random token ids, greedy, EOS ignored) run through the OpenAI client's wire format (httpx, SSE),
and the same batch runs through LLM.generate in the same process. Prints output tokens per
second of both, their ratio, and the median and 99th-percentile time to first token and time
between tokens that clients saw.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from types import SimpleNamespace

from flashpage.bench.cpu_model import DEFAULT_CACHE, MAX_MODEL_LEN, SHAPES, write_hf_config
from flashpage.bench.stats import percentile


async def _client(http, url: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
    """Time to first token and the gaps between the later ones, as the client sees them."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}
    t0 = time.perf_counter()
    stamps = []
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                if json.loads(line[6:])["choices"]:  # one chunk per step that gave this request a token
                    stamps.append(time.perf_counter())
    return stamps[0] - t0, [b - a for a, b in zip(stamps, stamps[1:])]


def main() -> None:
    import httpx

    from flashpage.llm import LLM
    from flashpage.sampling_params import SamplingParams
    from flashpage.serving.server import start

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="110m", choices=sorted(SHAPES))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    model = str(write_hf_config(SHAPES[a.shape], DEFAULT_CACHE))
    llm = LLM(model, load_format="dummy", dtype="bfloat16", max_model_len=MAX_MODEL_LEN, max_num_seqs=64,
              max_num_batched_tokens=MAX_MODEL_LEN, verbose=False)
    rnd = random.Random(0)
    V = int(llm.model_info["vocab_size"])

    def batch() -> list[list[int]]:  # fresh prompts: no prefix-cache hits
        return [[rnd.randrange(1, V) for _ in range(16)] for _ in range(a.clients)]

    n_tokens = a.clients * a.max_tokens
    params = SamplingParams(temperature=0, max_tokens=a.max_tokens, ignore_eos=True)
    offline = []
    for _ in range(a.repeats + 1):
        t0 = time.perf_counter()
        llm.generate([{"prompt_token_ids": p} for p in batch()], params, use_tqdm=False)
        offline.append(n_tokens / (time.perf_counter() - t0))
    offline = offline[1:]

    args = SimpleNamespace(model=model, host="127.0.0.1", port=0, grpc_port=0, served_model_name="bench",
                           api_key=None, max_waiting_requests=4096, max_tokens_limit=None, max_body_bytes=1 << 20)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        args.port = s.getsockname()[1]
    servers = start(args, llm)
    url = f"http://127.0.0.1:{args.port}"

    async def run_once():
        limits = httpx.Limits(max_connections=a.clients + 8)
        async with httpx.AsyncClient(timeout=600, limits=limits) as http:
            t0 = time.perf_counter()
            results = await asyncio.gather(*(_client(http, url, p, a.max_tokens) for p in batch()))
            return n_tokens / (time.perf_counter() - t0), results
    served, ttft, gaps = [], [], []
    try:
        for r in range(a.repeats + 1):
            rate, results = asyncio.run(run_once())
            if r == 0:
                continue  # warm-up
            served.append(rate)
            ttft += [t for t, _ in results]
            gaps += [g for _, gs in results for g in gs]
    finally:
        servers.stop(drain_seconds=2)
    off, srv = statistics.median(offline), statistics.median(served)
    print(f"{a.shape}, {a.clients} clients x {a.max_tokens} tokens, medians of {a.repeats}:")
    print(f"  offline LLM.generate     {off:8.1f} tok/s")
    print(f"  HTTP streaming clients   {srv:8.1f} tok/s  ({srv / off:.2f}x offline)")
    print(f"  time to first token      p50 {statistics.median(ttft) * 1e3:7.1f} ms   p99 {percentile(ttft, 99) * 1e3:7.1f} ms")
    print(f"  time between tokens      p50 {statistics.median(gaps) * 1e3:7.1f} ms   p99 {percentile(gaps, 99) * 1e3:7.1f} ms")


if __name__ == "__main__":
    main()
