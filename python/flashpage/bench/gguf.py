"""GGUF files on the CPU, flashpage beside llama.cpp (llama-cpp-python): the same files, the same
run, the same two threads, the workloads of `flashpage.bench.cpu_model` (prefill of a 512-token
prompt, batch-1 decode of 128 tokens, 16 and 32 prompts of 16 tokens generating 64 each, greedy,
EOS ignored; medians of --repeats), and the batch-1 ceiling of each file: the bytes of weights a
token reads (every Linear and the LM head as the engine stores them) over the memory read
bandwidth measured in the same run.

    python -m flashpage.bench.gguf FILE.gguf [FILE.gguf ...] [--engines flashpage,llamacpp]
                                   [--repeats 3] [--json out.json]

Each engine runs in a subprocess of its own. llama.cpp loads the file with its default buffer
types and, where that process fails (this machine's llama.cpp build crashes in its AMX buffers
on some types), again without the extra ones (use_extra_bufts=False), which the table notes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from types import SimpleNamespace

from flashpage.bench import cpu_model as cm

RESULT = "RESULT "


class FlashpageGguf:
    def __init__(self, path: str, quantization: str) -> None:
        from flashpage import LLM, SamplingParams
        self.llm = LLM(path, quantization=quantization, max_model_len=cm.MAX_MODEL_LEN, max_num_seqs=64,
                       max_num_batched_tokens=cm.MAX_MODEL_LEN, skip_tokenizer_init=True, verbose=False)
        self.params = SamplingParams
        # What a token reads: every weight but the embedding table (a row of it is gathered).
        info = self.llm.model_info
        table = info["vocab_size"] * info["hidden_size"] * (2 if info["dtype"] == "bfloat16" else 4)
        self.weight_bytes = info["weight_bytes_owned"] + info["weight_bytes_mapped"] - table

    def generate(self, prompts: list[list[int]], max_tokens: int) -> None:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts],
                                 self.params(max_tokens=max_tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [max_tokens] * len(prompts)


class LlamaCppGguf(cm.LlamaCppEngine):
    """cpu_model's llama.cpp engine (one llama_batch for every sequence) on a given file."""

    def __init__(self, path: str, extra_bufts: bool) -> None:
        self._open(path, extra_bufts)


def worker(path: str, engine: str, repeats: int) -> dict:
    if engine == "membw":
        return {"gbs": cm.memory_read_bandwidth()}
    name, _, variant = engine.partition(":")
    if name == "flashpage":
        e = FlashpageGguf(path, variant or "auto")
        vocab = e.llm.model_info["vocab_size"]
    else:
        e = LlamaCppGguf(path, variant != "no-extra-bufts")
        vocab = e.vocab
    result = cm.measure(e, SimpleNamespace(vocab=vocab), repeats, [512])
    if name == "flashpage":
        result["weight_bytes"] = e.weight_bytes
    return result


def run(path: str, engine: str, repeats: int, timeout: float) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(cm.THREADS)}
    cmd = [sys.executable, "-m", "flashpage.bench.gguf", path, "--worker", engine, "--repeats", str(repeats)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"unavailable": f"timed out after {timeout}s"}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    return {"unavailable": f"exit {p.returncode}: {(p.stderr.strip().splitlines() or ['no output'])[-1][:200]}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--engines", default="flashpage,llamacpp")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        try:
            res = worker(a.files[0], a.worker, a.repeats)
        except Exception as e:  # noqa: BLE001 -- reported, not raised
            res = {"unavailable": f"{type(e).__name__}: {e}"}
        print(RESULT + json.dumps(res), flush=True)
        return
    membw = run(a.files[0], "membw", 1, a.timeout).get("gbs")
    out = {"membw_gbs": membw, "files": {}}
    cols = ["prefill512", "decode", "batch16", "batch32"]
    print(f"memory read bandwidth {membw:.1f} GB/s" if membw else "memory bandwidth: unavailable")
    for f in a.files:
        rows = {}
        for engine in a.engines.split(","):
            r = run(f, engine, a.repeats, a.timeout)
            if engine == "llamacpp" and "unavailable" in r:  # its AMX buffers, see the docstring
                engine += ":no-extra-bufts"
                r = run(f, engine, a.repeats, a.timeout)
            rows[engine] = r
        out["files"][f] = rows
        print(f"\n{os.path.basename(f)}")
        print(f"  {'engine':28s}" + "".join(f"{c:>12s}" for c in cols) + f"{'ceiling':>10s}")
        for engine, r in rows.items():
            if "unavailable" in r:
                print(f"  {engine:28s} unavailable: {r['unavailable']}")
                continue
            ceiling = membw * 1e9 / r["weight_bytes"] if membw and "weight_bytes" in r else None
            print(f"  {engine:28s}" + "".join(f"{r[c]:12.1f}" for c in cols) +
                  (f"{ceiling:10.1f}" if ceiling else f"{'':>10s}"))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
