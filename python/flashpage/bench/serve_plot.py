"""The PNG of `flashpage bench serve --plot`: TTFT, TPOT and ITL (p50 solid, p99 dashed) and
output throughput against request rate, one line per result file (e.g. flashpage beside vLLM).
The rate axis is logarithmic; `inf` (every request at once) sits one doubling past the largest
finite rate."""

from __future__ import annotations

import math
from pathlib import Path

from flashpage.bench.serve_metrics import BenchError, rate_from_json, rate_label

PANELS = [("ttft_ms", "time to first token (ms)"), ("tpot_ms", "time per output token (ms)"),
          ("itl_ms", "inter-token latency (ms)"), ("output_throughput", "output throughput (tok/s)")]


def rate_positions(rates: set[float]) -> dict[float, float]:
    """Where each rate sits on the x axis: itself, inf one doubling past the largest finite one."""
    finite = [r for r in rates if not math.isinf(r)]
    pos = {r: r for r in finite}
    if len(finite) < len(rates):
        pos[math.inf] = 2 * max(finite) if finite else 1.0
    return pos


def _subtitle(result: dict) -> str:
    s, w = result["settings"], result["workload"]
    lengths = (f"production lengths, output {s['output_len']}" if w["length_dist"] == "production"
               else f"input {s['input_len']} / output {s['output_len']} tokens")
    if s.get("range_ratio"):
        lengths += f" (±{100 * s['range_ratio']:g} %)"
    conc = f", at most {s['max_concurrency']} in flight" if s.get("max_concurrency") else ""
    return f"{lengths}, {s['num_prompts']} requests per rate{conc}"


def plot_results(results: list[dict], labels: list[str], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install matplotlib (or pip install 'flashpage[bench]')") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    runs = [{rate_from_json(r["request_rate"]): r["metrics"] for r in res["runs"]} for res in results]
    pos = rate_positions({rate for by_rate in runs for rate in by_rate})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, title) in zip(axes.flat, PANELS):
        for k, (by_rate, label) in enumerate(zip(runs, labels)):
            rates = sorted(by_rate)
            xs = [pos[r] for r in rates]
            color = colors[k % len(colors)]
            if key == "output_throughput":
                ax.plot(xs, [by_rate[r][key] for r in rates], "o-", color=color, label=label)
            else:
                ax.plot(xs, [by_rate[r][key]["p50"] for r in rates], "o-", color=color, label=f"{label} p50")
                ax.plot(xs, [by_rate[r][key]["p99"] for r in rates], "^--", color=color, label=f"{label} p99")
        ax.set_title(title)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(pos.values()), [rate_label(r) for r in sorted(pos, key=pos.get)])
        ax.minorticks_off()
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    model = results[0]["server"].get("model", "")
    title = Path(str(model)).name + (f": {' vs '.join(labels)}" if len(labels) > 1 else "")
    fig.suptitle(f"{title}\n{_subtitle(results[0])}")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
