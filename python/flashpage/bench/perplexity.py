"""Perplexity of a GGUF model on a fixed text, flashpage beside llama.cpp on the same file and
the same tokens, as llama.cpp's perplexity tool measures it: windows of --ctx tokens (the text's
tokens, BOS first), each scored on its second half (the first half is context).

    python -m flashpage.bench.perplexity FILE.gguf [--text FILE.txt] [--ctx 512]
                                         [--engines auto,none,llamacpp] [--json out.json]

Engines: flashpage with quantization "auto" (the file's quantized weights, two-level int8
activations) and "none" (dequantized to bf16), and llama.cpp (llama-cpp-python, in a subprocess
of its own). The default text, shipped beside this module (perplexity.txt), is ~3,500 SmolLM2
tokens of this project's own README prose.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys

import numpy as np

DEFAULT_TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "perplexity.txt")
RESULT = "RESULT "


def windows(tokens: list[int], ctx: int) -> list[list[int]]:
    return [tokens[i:i + ctx] for i in range(0, len(tokens) - ctx + 1, ctx)]


def nll_flashpage(path: str, wins: list[list[int]], quantization: str) -> tuple[float, int]:
    from flashpage import LLM, SamplingParams
    llm = LLM(path, quantization=quantization, max_model_len=max(len(w) for w in wins) + 8,
              skip_tokenizer_init=True, verbose=False, enable_prefix_caching=False)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
    outs = llm.generate([{"prompt_token_ids": w} for w in wins], params, use_tqdm=False)
    total, n = 0.0, 0
    for w, o in zip(wins, outs):
        for i in range(len(w) // 2, len(w)):
            total -= o.prompt_logprobs[i][w[i]].logprob
            n += 1
    return total, n


def nll_llamacpp(path: str, wins: list[list[int]]) -> tuple[float, int]:
    from flashpage.bench.gguf import LlamaCppGguf
    # Without its extra (AMX) buffer types: they crash this machine's build on some types.
    e = LlamaCppGguf(path, extra_bufts=False)
    total, n = 0.0, 0
    for w in wins:
        e.L.llama_memory_clear(e.L.llama_get_memory(e.ctx), True)
        e._decode([(t, i, 0, True) for i, t in enumerate(w)])
        logits = np.ctypeslib.as_array(e.L.llama_get_logits(e.ctx), shape=(len(w), e.vocab)).astype(np.float64)
        for i in range(len(w) // 2, len(w)):
            row = logits[i - 1]  # row i - 1 predicts token i
            total -= row[w[i]] - (row.max() + math.log(np.exp(row - row.max()).sum()))
            n += 1
    return total, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file")
    ap.add_argument("--text", default=DEFAULT_TEXT)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--engines", default="auto,none,llamacpp")
    ap.add_argument("--json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    from flashpage.tokenizer import Tokenizer
    tok = Tokenizer(a.file)
    text = open(a.text, encoding="utf-8").read()
    tokens = ([tok.bos_token_id] if tok.bos_token_id is not None else []) + tok.encode(text, add_special_tokens=False)
    wins = windows(tokens, a.ctx)
    if a.worker:  # llama.cpp, in a process without torch
        total, n = nll_llamacpp(a.file, wins)
        print(RESULT + json.dumps({"nll": total, "n": n}), flush=True)
        return
    res = {"file": a.file, "text": a.text, "tokens": len(tokens), "ctx": a.ctx, "scored": None, "ppl": {}}
    for e in a.engines.split(","):
        if e == "llamacpp":
            p = subprocess.run([sys.executable, "-m", "flashpage.bench.perplexity", a.file, "--text", a.text,
                                "--ctx", str(a.ctx), "--worker", "llamacpp"], capture_output=True, text=True)
            line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith(RESULT)), None)
            if line is None:
                res["ppl"][e] = None
                print(f"llama.cpp: unavailable ({(p.stderr.strip().splitlines() or ['?'])[-1][:200]})")
                continue
            r = json.loads(line[len(RESULT):])
            total, n = r["nll"], r["n"]
        else:
            total, n = nll_flashpage(a.file, wins, e)
        res["scored"] = n
        res["ppl"][e] = math.exp(total / n)
        print(f"{e:10s} perplexity {res['ppl'][e]:.4f} over {n} tokens", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
