"""What `flashpage bench serve` measures, from the per-request records the client keeps.

Definitions (the same as vLLM's benchmark_serving, so that numbers read alike):

  TTFT   time to first token: from sending the request to the first chunk that carried tokens.
  TPOT   time per output token after the first: (E2E - TTFT) / (output tokens - 1), one value
         per request with at least two output tokens (its mean over the stream).
  ITL    inter-token latency: every gap between two consecutive token-carrying chunks of a
         request, pooled over all requests. A chunk may carry several tokens (a server that
         batches its stream, or speculative decoding); such a gap then counts once, not once
         per token, so ITL is the latency between deliveries the user sees. TPOT divides by
         tokens and is the one to compare for generation speed.
  E2E    end-to-end latency: from sending to the end of the stream.

Throughputs divide by the run's duration (first send to last response). Goodput is the number
of requests per second that completed and met every given SLO (`--goodput ttft:500 tpot:100`,
milliseconds; keys ttft, tpot, e2e (vLLM's spelling e2el accepted)), and its fraction of all
requests sent. Output tokens come from the stream's usage chunk; a server that sends none is
counted one token per token-carrying chunk.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from flashpage.bench.stats import summarize

SLO_KEYS = {"ttft": "ttft", "tpot": "tpot", "e2e": "e2e", "e2el": "e2e"}
LATENCIES = ("ttft", "tpot", "itl", "e2e")


class BenchError(Exception):
    """Bad input or an unreachable server: reported as one line, exit status 2."""


@dataclass
class RequestRecord:
    """One request as the client saw it; times in seconds."""
    index: int
    prompt_len: int  # tokens sent (random prompts) or the tokenizer's count (chat)
    max_tokens: int
    send_time: float = 0.0  # since the start of the run
    chunk_times: list[float] = field(default_factory=list)  # since send_time, token-carrying chunks
    e2e: float = 0.0
    output_tokens: int = 0
    prompt_tokens: int | None = None  # from the usage chunk
    usage_reported: bool = False
    success: bool = False
    status: int | None = None  # HTTP status
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] if self.chunk_times else math.nan

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itl(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    def to_json(self) -> dict:
        out = asdict(self)
        out["ttft"] = None if not self.chunk_times else self.ttft
        out["tpot"] = self.tpot
        return out

    @classmethod
    def from_json(cls, d: dict) -> "RequestRecord":
        names = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in names})


def parse_slos(items: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:100"]` -> {"ttft": 500.0, "tpot": 100.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep:
            raise BenchError(f"--goodput: expected KEY:MILLISECONDS, got {item!r}")
        name = SLO_KEYS.get(key.strip().lower())
        if name is None:
            raise BenchError(f"--goodput: unknown SLO {key!r} (use ttft, tpot or e2e)")
        try:
            ms = float(value)
        except ValueError:
            raise BenchError(f"--goodput: {key} must be a number of milliseconds, got {value!r}") from None
        if not ms > 0 or math.isinf(ms):
            raise BenchError(f"--goodput: {key} must be a positive number of milliseconds, got {value!r}")
        slos[name] = ms
    return slos


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    if not r.success:
        return False
    got = {"ttft": r.ttft, "tpot": r.tpot or 0.0, "e2e": r.e2e}  # one output token: no TPOT to miss
    return all(got[k] * 1e3 <= limit for k, limit in slos.items())


def compute_metrics(records: list[RequestRecord], duration: float, slos: dict[str, float] | None = None) -> dict:
    """The metrics of one run (one request rate) from its records; latencies in ms."""
    ok = [r for r in records if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens if r.prompt_tokens is not None else r.prompt_len for r in ok)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    m: dict = {
        "completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
        "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": per_s(len(ok)), "output_throughput": per_s(out_tokens),
        "total_token_throughput": per_s(in_tokens + out_tokens),
        "ttft_ms": summarize([r.ttft for r in ok], 1e3),
        "tpot_ms": summarize([t for r in ok if (t := r.tpot) is not None], 1e3),
        "itl_ms": summarize([g for r in ok for g in r.itl], 1e3),
        "e2e_ms": summarize([r.e2e for r in ok], 1e3),
        "errors": dict(Counter(r.error for r in records if not r.success)),
        "goodput": None,
    }
    if slos:
        good = sum(meets_slos(r, slos) for r in records)
        m["goodput"] = {"slo_ms": dict(slos), "good": good, "requests_per_s": per_s(good),
                        "fraction": good / len(records) if records else math.nan}
    return m


# ---- rates ----------------------------------------------------------------------------------

def parse_rates(text: str) -> list[float]:
    """`"0.5,1,inf"` -> [0.5, 1.0, inf]; each rate > 0."""
    rates = []
    for item in text.split(","):
        item = item.strip()
        try:
            rate = float(item)
        except ValueError:
            raise BenchError(f"--request-rate: {item!r} is not a number (or inf)") from None
        if not rate > 0:
            raise BenchError(f"--request-rate must be > 0 (or inf), got {item!r}")
        rates.append(rate)
    return rates


def rate_to_json(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def rate_from_json(rate: float | str) -> float:
    return float(rate)


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


# ---- tables ---------------------------------------------------------------------------------

def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def sweep_table(runs: list[dict]) -> str:
    """A throughput table (one row per rate) and one latency table per metric."""
    has_goodput = any(r["metrics"]["goodput"] for r in runs)
    head = ["rate (req/s)", "ok", "failed", "duration s", "req/s", "out tok/s", "total tok/s"]
    head += ["goodput req/s", "good %"] if has_goodput else []
    rows = []
    for run in runs:
        m = run["metrics"]
        row = [rate_label(rate_from_json(run["request_rate"])), str(m["completed"]), str(m["failed"]),
               _fmt(m["duration_s"], 2), _fmt(m["request_throughput"], 2), _fmt(m["output_throughput"]),
               _fmt(m["total_token_throughput"])]
        if has_goodput:
            g = m["goodput"]
            row += [_fmt(g["requests_per_s"], 2), _fmt(100 * g["fraction"])] if g else ["-", "-"]
        rows.append(row)
    parts = [_table(head, rows)]
    names = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2e": "E2E latency"}
    for key in LATENCIES:
        stats = ["mean", "p50", "p90", "p95", "p99"]
        rows = [[rate_label(rate_from_json(run["request_rate"]))] + [_fmt(run["metrics"][f"{key}_ms"][s]) for s in stats]
                for run in runs]
        parts.append(f"{names[key]} (ms)\n" + _table(["rate (req/s)", *stats], rows))
    errors = Counter()
    for run in runs:
        errors.update(run["metrics"]["errors"])
    if errors:
        parts.append("errors:\n" + "\n".join(f"  {n} x {msg}" for msg, n in errors.most_common(5)))
    return "\n\n".join(parts)


COMPARE_ROWS = [  # (label, path into metrics, higher is better)
    ("req/s", ("request_throughput",), True),
    ("output tok/s", ("output_throughput",), True),
    ("TTFT p50 ms", ("ttft_ms", "p50"), False), ("TTFT p99 ms", ("ttft_ms", "p99"), False),
    ("TPOT p50 ms", ("tpot_ms", "p50"), False), ("TPOT p99 ms", ("tpot_ms", "p99"), False),
    ("ITL p50 ms", ("itl_ms", "p50"), False), ("ITL p99 ms", ("itl_ms", "p99"), False),
    ("E2E p50 ms", ("e2e_ms", "p50"), False), ("E2E p99 ms", ("e2e_ms", "p99"), False),
    ("goodput req/s", ("goodput", "requests_per_s"), True),
    ("failed", ("failed",), False),
]


def _get(metrics: dict, path: tuple[str, ...]) -> float | None:
    x = metrics
    for k in path:
        if not isinstance(x, dict) or x.get(k) is None:
            return None
        x = x[k]
    return float(x)


def compare_table(results: list[dict], labels: list[str]) -> str:
    """Side by side, per request rate the results share: each metric and its ratio to the first
    result's (e.g. vllm / flashpage)."""
    by_rate = [{rate_from_json(r["request_rate"]): r["metrics"] for r in res["runs"]} for res in results]
    rates = [r for r in by_rate[0] if all(r in b for b in by_rate[1:])]
    if not rates:
        raise BenchError("--compare: the result files share no request rate")
    base = labels[0]
    head = ["metric", *labels, *(f"{lb}/{base}" for lb in labels[1:])]
    parts = []
    for rate in rates:
        rows = []
        for name, path, _ in COMPARE_ROWS:
            vals = [_get(b[rate], path) for b in by_rate]
            if all(v is None for v in vals):
                continue
            digits = 0 if name == "failed" else 2 if "req/s" in name else 1
            ratios = ["-" if v is None or not vals[0] else f"{v / vals[0]:.2f}x" for v in vals[1:]]
            rows.append([name, *(_fmt(v, digits) for v in vals), *ratios])
        parts.append(f"request rate {rate_label(rate)} req/s\n" + _table(head, rows))
    return "\n\n".join(parts)
