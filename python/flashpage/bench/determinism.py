"""What deterministic (batch-invariant) mode costs: the same dummy model built twice in one
process, deterministic=True and False, timed alternately on a 512-token prefill and on 32
sequences decoding 64 tokens; medians.

    python -m flashpage.bench.determinism MODEL_DIR_WITH_CONFIG_JSON [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from flashpage import LLM, SamplingParams


def timed(llm: LLM, n: int, length: int, new: int) -> float:
    # Fresh random prompts every time: a repeated one would hit the prefix cache.
    prompts = [{"prompt_token_ids": [random.randrange(3, 32000) for _ in range(length)]} for _ in range(n)]
    start = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=new, temperature=0, ignore_eos=True))
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    llms = {d: LLM(args.model, load_format="dummy", max_model_len=2048, kv_cache_memory_bytes=2 << 30,
                   max_num_seqs=64, deterministic=d, verbose=False) for d in (True, False)}
    for llm in llms.values():  # warm-up
        timed(llm, 1, 512, 1)
        timed(llm, 32, 16, 8)
    res: dict[tuple[bool, str], list[float]] = {(d, w): [] for d in llms for w in ("prefill", "batch32")}
    for _ in range(args.repeats):
        for d, llm in llms.items():
            res[(d, "prefill")].append(512 / timed(llm, 1, 512, 1))
            res[(d, "batch32")].append(32 * 64 / timed(llm, 32, 16, 64))
    for w in ("prefill", "batch32"):
        on, off = statistics.median(res[(True, w)]), statistics.median(res[(False, w)])
        print(f"{w}: deterministic {on:.1f} tok/s, default {off:.1f} tok/s, cost {100 * (1 - on / off):.1f} %")


if __name__ == "__main__":
    main()
