"""Sampler benchmark: milliseconds per step of flashpage.sampler.sample on this machine's CPU.

    python -m flashpage.bench.sampler [--vocab 128256] [--batch 32,256] [--repeats 15]

Each step samples a batch of random logits rows (a fresh copy each step, as the engine hands
over) with the request histories of a chat turn (a 512-token prompt, 128 tokens out) under
several parameter sets; the issue's case is "top-k+top-p+penalties". Prints the median and the
fastest step of each, and the bytes of logits per step for scale.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from flashpage.sampler import sample
from flashpage.sampling_params import SamplingParams

CASES = {
    "greedy": SamplingParams(temperature=0.0),
    "temperature": SamplingParams(temperature=0.8),
    "top-p": SamplingParams(temperature=0.8, top_p=0.95),
    "top-k+top-p+penalties": SamplingParams(temperature=0.8, top_p=0.95, top_k=50, presence_penalty=0.5,
                                            frequency_penalty=0.5, repetition_penalty=1.1),
    "top-k+top-p+penalties+seed": SamplingParams(temperature=0.8, top_p=0.95, top_k=50, presence_penalty=0.5,
                                                 frequency_penalty=0.5, repetition_penalty=1.1, seed=7),
    "logprobs=5": SamplingParams(temperature=0.8, top_p=0.95, top_k=50, logprobs=5),
}


def time_case(params: SamplingParams, batch: int, vocab: int, repeats: int, prompt_len: int,
              output_len: int) -> list[float]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(batch, vocab, generator=g) * 3
    # Token histories as the engine keeps them: int64 tensors (a prompt's, and a view of the
    # output so far).
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g) for _ in range(batch)]
    outputs = [torch.randint(0, vocab, (output_len,), generator=g) for _ in range(batch)]
    gens = [torch.Generator().manual_seed(i) if params.seed is not None else None for i in range(batch)]
    times = []
    for r in range(repeats + 2):
        logits = base.clone()
        t0 = time.perf_counter()
        sample(logits, [params] * batch, gens, prompts, outputs)
        if r >= 2:  # two warm-up steps
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", default="128256", help="comma-separated vocabulary sizes")
    ap.add_argument("--batch", default="32,256", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated: " + ", ".join(CASES))
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=128)
    a = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; history {a.prompt_len} prompt + "
          f"{a.output_len} output tokens per request")
    print(f"{'vocab':>7} {'batch':>5} {'logits MB':>9}  {'case':<28} {'median ms':>9} {'min ms':>7}")
    for vocab in (int(v) for v in a.vocab.split(",")):
        for batch in (int(b) for b in a.batch.split(",")):
            for name in a.cases.split(","):
                t = time_case(CASES[name], batch, vocab, a.repeats, a.prompt_len, a.output_len)
                print(f"{vocab:>7} {batch:>5} {batch * vocab * 4 / 1e6:>9.1f}  {name:<28} "
                      f"{statistics.median(t):>9.2f} {min(t):>7.2f}", flush=True)


if __name__ == "__main__":
    main()
