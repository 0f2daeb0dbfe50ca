"""`flashpage bench serve`: a serving load generator for any OpenAI-compatible server
(`flashpage serve`, `vllm serve`, ...), in the manner of vLLM's `vllm bench serve`.

    flashpage bench serve [--base-url http://127.0.0.1:8000 | --host H --port P] [--model NAME]
        [--endpoint /v1/completions] [--api-key KEY] [--tokenizer DIR | --vocab-size V]
        [--length-dist random|production] [--input-len 256] [--output-len 128] [--range-ratio 0]
        [--request-rate 0.5,1,2,4,inf] [--burstiness 1] [--max-concurrency N] [--num-prompts 64]
        [--warmup 0] [--seed 0] [--goodput ttft:500 tpot:100] [--result-json out.json] [--plot out.png]
    flashpage bench serve --compare a.json b.json [--labels flashpage,vllm] [--plot cmp.png]
    python -m flashpage.bench.serve ...          (the same)

Each request is a streaming completion of a random token-id prompt (exact lengths; both
flashpage and vLLM accept token ids) with ignore_eos, so it generates exactly max_tokens; each
request rate of the sweep gets fresh prompts (no prefix-cache hits between runs) from --seed,
so two servers benchmarked with the same flags get the same requests at the same moments.
Metrics and their definitions: flashpage.bench.serve_metrics; workload: serve_workload.
Needs httpx (and matplotlib for --plot): pip install "flashpage[bench]".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from flashpage.bench.serve_metrics import (BenchError, RequestRecord, compare_table, compute_metrics, parse_rates,
                                           parse_slos, rate_label, rate_to_json, sweep_table)
from flashpage.bench.serve_workload import (PRODUCTION_MU, PRODUCTION_SIGMA, LengthSpec, Vocab, arrival_times,
                                            lognormal_quantile, load_vocab, make_prompts, rng_for)

SCHEMA = "flashpage-bench-serve/1"
PROG = "flashpage bench serve"


def need(module: str):
    """An optional dependency, imported when first used."""
    try:
        return __import__(module)
    except ImportError:
        raise BenchError(f"this needs {module}: pip install {module} (or pip install 'flashpage[bench]')") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    s = p.add_argument_group("server")
    s.add_argument("--base-url", default=None, help="e.g. http://127.0.0.1:8000 (default: from --host/--port)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--model", default=None, help="the model name to send (default: the first of GET /v1/models)")
    s.add_argument("--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions")
    s.add_argument("--api-key", default=None)
    s.add_argument("--request-timeout", type=float, default=3600.0, help="seconds one request may take")
    w = p.add_argument_group("workload")
    w.add_argument("--tokenizer", default=None,
                   help="tokenizer.json or a directory with one: vocabulary size and special ids (default: the "
                        "model's directory when the model name is a local path)")
    w.add_argument("--vocab-size", type=int, default=None, help="random ids below this (without --tokenizer)")
    w.add_argument("--length-dist", default="random", choices=["random", "production"])
    w.add_argument("--input-len", type=int, default=256)
    w.add_argument("--output-len", type=int, default=128)
    w.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in [len*(1-r), len*(1+r)]")
    w.add_argument("--max-model-len", type=int, default=None,
                   help="the context to fit prompts into (default: max_model_len from GET /v1/models)")
    w.add_argument("--temperature", type=float, default=0.0)
    w.add_argument("--seed", type=int, default=0)
    a = p.add_argument_group("arrivals")
    a.add_argument("--request-rate", default="inf", help="requests/s, a comma list for a sweep: 0.5,1,2,4,inf")
    a.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps (1: Poisson)")
    a.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    a.add_argument("--num-prompts", type=int, default=64, help="requests per request rate")
    a.add_argument("--warmup", type=int, default=0, help="requests sent (all at once) before the sweep, not counted")
    o = p.add_argument_group("output")
    o.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS", help="SLOs, e.g. ttft:500 tpot:100 e2e:20000")
    o.add_argument("--label", default=None, help="this run's name in --compare (default: the file's name)")
    o.add_argument("--result-json", default=None, help="settings, per-rate metrics and per-request records")
    o.add_argument("--plot", default=None, help="a PNG of latency and throughput against request rate")
    o.add_argument("--compare", nargs="+", default=None, metavar="JSON", help="overlay result files instead of running")
    o.add_argument("--labels", default=None, help="with --compare: comma-separated names")
    return p


# ---- the server -----------------------------------------------------------------------------

def base_url(args: argparse.Namespace) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


def headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


def discover(args: argparse.Namespace) -> dict:
    """GET /v1/models: the model to send, and the context length when the server reports it."""
    httpx = need("httpx")
    url = f"{base_url(args)}/v1/models"
    try:
        r = httpx.get(url, headers=headers(args), timeout=30)
    except httpx.HTTPError as e:
        raise BenchError(f"cannot reach the server at {url}: {str(e) or type(e).__name__}") from None
    if r.status_code != 200:
        raise BenchError(f"GET {url} answered HTTP {r.status_code}: {r.text[:200]}")
    try:
        models = [m for m in r.json().get("data") or [] if isinstance(m, dict) and m.get("id")]
    except (ValueError, AttributeError):
        raise BenchError(f"GET {url} did not answer an OpenAI model list: {r.text[:200]}") from None
    if not models and args.model is None:
        raise BenchError(f"GET {url} lists no model; give --model")
    name = args.model or models[0]["id"]
    entry = next((m for m in models if m.get("id") == name), {})
    return {"model": name, "models": [m.get("id") for m in models], "max_model_len": entry.get("max_model_len")}


# ---- one request ----------------------------------------------------------------------------

def carries_tokens(choice: dict, chat: bool) -> bool:
    """Whether a streamed choice delivered tokens. Text does; so does an empty delta that is not
    the end (tokens whose text waits for the rest of a UTF-8 character); the chat stream's opening
    role chunk and a bare finish_reason chunk do not."""
    delta = (choice.get("delta") or {}) if chat else choice
    if delta.get("text") or delta.get("content") or delta.get("reasoning_content"):
        return True
    if choice.get("finish_reason") is not None:
        return False
    return not (chat and "role" in delta)


def _error_text(raw: bytes) -> str:
    try:
        err = json.loads(raw).get("error", {})
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return raw[:300].decode("utf-8", "replace")


async def send(http, url: str, hdrs: dict, body: dict, rec: RequestRecord, t0: float, chat: bool) -> None:
    """Streams one request and fills in its record; errors are recorded, never raised."""
    httpx = need("httpx")
    start = time.perf_counter()
    rec.send_time = start - t0
    try:
        async with http.stream("POST", url, json=body, headers=hdrs) as resp:
            rec.status = resp.status_code
            if resp.status_code != 200:
                rec.error = f"HTTP {resp.status_code}: {_error_text(await resp.aread())}"
                return
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                now = time.perf_counter() - start
                if data == "[DONE]":
                    rec.e2e = now
                    continue
                chunk = json.loads(data)
                if chunk.get("error"):
                    rec.error = f"stream error: {_error_text(data.encode())}"
                    return
                if any(carries_tokens(c, chat) for c in chunk.get("choices") or []):
                    rec.chunk_times.append(now)
                if usage := chunk.get("usage"):
                    rec.output_tokens, rec.usage_reported = int(usage.get("completion_tokens", 0)), True
                    rec.prompt_tokens = usage.get("prompt_tokens")
        rec.e2e = rec.e2e or time.perf_counter() - start  # no [DONE]: the end of the stream
    except httpx.HTTPError as e:
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return
    except ValueError as e:  # a line that is not JSON
        rec.error = f"bad stream: {e}"
        return
    if not rec.usage_reported:
        rec.output_tokens = len(rec.chunk_times)
    rec.success = bool(rec.chunk_times)
    if not rec.success:
        rec.error = "the stream carried no tokens"


# ---- runs -----------------------------------------------------------------------------------

def build_requests(args: argparse.Namespace, spec: LengthSpec, vocab: Vocab, model: str, purpose: str,
                   index: int, n: int) -> list[tuple[dict, RequestRecord]]:
    rng = rng_for(args.seed, purpose, index)
    lengths = spec.sample(n, rng)
    prompts = make_prompts(lengths, vocab, rng)
    chat = is_chat(args)
    decode = _decoder(vocab) if chat else None
    out = []
    for i, (prompt, (_, n_out)) in enumerate(zip(prompts, lengths)):
        body: dict = {"model": model, "max_tokens": n_out, "temperature": args.temperature, "ignore_eos": True,
                      "stream": True, "stream_options": {"include_usage": True}}
        if chat:  # chat takes text: the ids decoded (the server's count comes back in usage)
            body["messages"] = [{"role": "user", "content": decode(prompt)}]
        else:
            body["prompt"] = prompt
        out.append((body, RequestRecord(index=i, prompt_len=len(prompt), max_tokens=n_out)))
    return out


def is_chat(args: argparse.Namespace) -> bool:
    return args.endpoint.rstrip("/").endswith("chat/completions")


def _decoder(vocab: Vocab):
    if vocab.source == "--vocab-size":
        raise BenchError(f"{PROG}: the chat endpoint sends text, so it needs --tokenizer")
    tok = need("tokenizers").Tokenizer.from_file(vocab.source)
    return tok.decode


async def run_requests(http, url: str, hdrs: dict, reqs: list[tuple[dict, RequestRecord]], times: list[float],
                       max_concurrency: int | None, chat: bool) -> float:
    """Sends each request at its arrival time (or when a concurrency slot frees); the duration."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        delay = t0 + times[i] - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body, rec = reqs[i]
        if slots is None:
            await send(http, url, hdrs, body, rec, t0, chat)
        else:
            async with slots:
                await send(http, url, hdrs, body, rec, t0, chat)

    await asyncio.gather(*(one(i) for i in range(len(reqs))))
    return time.perf_counter() - t0


async def sweep(args: argparse.Namespace, spec: LengthSpec, vocab: Vocab, model: str, rates: list[float],
                slos: dict[str, float]) -> list[dict]:
    httpx = need("httpx")
    url, hdrs, chat = base_url(args) + args.endpoint, headers(args), is_chat(args)
    # No pool limit beyond --max-concurrency: a request waiting for a connection would be
    # counted as server latency.
    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=64)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    runs = []
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        if args.warmup:
            reqs = build_requests(args, spec, vocab, model, "warmup", 0, args.warmup)
            await run_requests(http, url, hdrs, reqs, [0.0] * len(reqs), args.max_concurrency, chat)
            failed = [r for _, r in reqs if not r.success]
            if failed:
                raise BenchError(f"{len(failed)} of {len(reqs)} warm-up requests failed: {failed[0].error}")
        for i, rate in enumerate(rates):
            reqs = build_requests(args, spec, vocab, model, "prompts", i, args.num_prompts)
            times = arrival_times(len(reqs), rate, args.burstiness, rng_for(args.seed, "arrivals", i))
            duration = await run_requests(http, url, hdrs, reqs, times, args.max_concurrency, chat)
            records = [r for _, r in reqs]
            metrics = compute_metrics(records, duration, slos)
            print(f"rate {rate_label(rate)} req/s: {metrics['completed']} ok, {metrics['failed']} failed in "
                  f"{duration:.1f} s, {metrics['output_throughput']:.1f} output tok/s", file=sys.stderr, flush=True)
            runs.append({"request_rate": rate_to_json(rate), "burstiness": args.burstiness,
                         "max_concurrency": args.max_concurrency, "num_prompts": len(reqs), "metrics": metrics,
                         "requests": [r.to_json() for r in records]})
    return runs


def check_args(args: argparse.Namespace) -> None:
    if args.num_prompts < 1:
        raise BenchError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be at least 1, got {args.max_concurrency}")
    if not args.burstiness > 0:
        raise BenchError(f"--burstiness must be > 0, got {args.burstiness}")
    if args.warmup < 0:
        raise BenchError(f"--warmup must not be negative, got {args.warmup}")
    if not args.endpoint.startswith("/"):
        raise BenchError(f"--endpoint must be a path such as /v1/completions, got {args.endpoint!r}")


def run(args: argparse.Namespace) -> dict:
    """The whole sweep against the server; the result (what --result-json holds)."""
    check_args(args)
    rates, slos = parse_rates(args.request_rate), parse_slos(args.goodput)
    server = discover(args)
    max_len = args.max_model_len or server["max_model_len"]
    spec = LengthSpec(args.length_dist, args.input_len, args.output_len, args.range_ratio, max_len)
    spec.validate()
    tokenizer = args.tokenizer
    if tokenizer is None and os.path.isfile(os.path.join(server["model"], "tokenizer.json")):
        tokenizer = server["model"]  # flashpage and vLLM name a local model by its path
    vocab = load_vocab(tokenizer, args.vocab_size)
    workload = {"length_dist": spec.dist, "max_model_len": max_len, "vocab_size": vocab.size,
                "vocab_source": vocab.source, "special_ids_excluded": sorted(vocab.special)}
    if spec.dist == "production":
        workload["production_fit"] = {"mu": PRODUCTION_MU, "sigma": PRODUCTION_SIGMA, "scale": spec.production_scale(),
                                      "p99_of_fit": lognormal_quantile(PRODUCTION_MU, PRODUCTION_SIGMA, 0.99)}
    runs = asyncio.run(sweep(args, spec, vocab, server["model"], rates, slos))
    settings = {k: v for k, v in vars(args).items() if k not in ("compare", "labels", "api_key")}
    return {"schema": SCHEMA, "label": args.label, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": settings, "server": {"base_url": base_url(args), "endpoint": args.endpoint, **server},
            "workload": workload, "runs": runs}


def write_json(result: dict, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1, allow_nan=True)
        f.write("\n")


def load_result(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
    except (OSError, ValueError) as e:
        raise BenchError(f"--compare: cannot read {path}: {e}") from None
    if result.get("schema") != SCHEMA:
        raise BenchError(f"--compare: {path} is not a result of {PROG} (schema {result.get('schema')!r})")
    return result


def compare(paths: list[str], labels_arg: str | None, plot: str | None) -> str:
    results = [load_result(p) for p in paths]
    labels = labels_arg.split(",") if labels_arg else [r.get("label") or Path(p).stem for r, p in zip(results, paths)]
    if len(labels) != len(results):
        raise BenchError(f"--labels names {len(labels)} results, --compare has {len(results)}")
    table = compare_table(results, labels)
    if plot:
        from flashpage.bench.serve_plot import plot_results
        plot_results(results, labels, plot)
    return table


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            print(compare(args.compare, args.labels, args.plot))
            return 0
        result = run(args)
        print(sweep_table(result["runs"]))
        if args.result_json:
            write_json(result, args.result_json)
        if args.plot:
            from flashpage.bench.serve_plot import plot_results
            plot_results([result], [args.label or base_url(args).split("//")[-1]], args.plot)
    except BenchError as e:
        print(f"{PROG}: " + " ".join(str(e).splitlines()), file=sys.stderr)  # one line, whatever a server said
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
