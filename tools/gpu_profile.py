"""Where a decode step's time goes on the GPU: the dummy Llama-3-8B shape through
`LLM(device="cuda")` under torch's profiler (CUPTI records every kernel of the process, ours
included). For batch 1 and a large batch it prints the kernels by GPU time and, per step, wall
time against the sum of kernel time: the difference is the GPU waiting on the host (launches,
scheduling, sampling). Run by tools/gpu_check.sh on the device machine.

    python tools/gpu_profile.py [--batches 1,256] [--context 1000] [--steps 16]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=16)
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile

    from flashpage import LLM, SamplingParams
    from flashpage.bench.gpu import LLAMA3_8B
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        batches = [int(b) for b in a.batches.split(",")]
        llm = LLM(d, device="cuda", load_format="dummy", dtype="bfloat16", max_model_len=a.context + 256,
                  max_num_seqs=max(batches), gpu_memory_utilization=0.9, skip_tokenizer_init=True)
        rng = np.random.default_rng(0)
        for b in batches:
            prompts = [{"prompt_token_ids": rng.integers(10, 100000, size=a.context).tolist()} for _ in range(b)]
            # Prefill plus a token outside the profile; then the profiled decode steps alone
            # (the same prompts again hit the prefix cache, so only their last block is recomputed).
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
            params = SamplingParams(temperature=0, max_tokens=a.steps + 1, ignore_eos=True)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                t0 = time.perf_counter()
                llm.generate(prompts, params, use_tqdm=False)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t0
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            gpu_us = sum(e.self_device_time_total for e in events)
            print(f"\n== batch {b}, context {a.context}: {a.steps + 1} steps (one a prefill of the last block) "
                  f"in {wall * 1e3:.1f} ms wall, {gpu_us / 1e3:.1f} ms of kernels "
                  f"({gpu_us / 1e3 / (wall * 1e3):.0%} busy); per step {wall * 1e3 / (a.steps + 1):.2f} ms wall")
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
                print(f"{e.self_device_time_total / 1e3:9.2f} ms {e.count:6d}x  {e.key[:110]}")
            cpu = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
            print("host (self CPU):", "; ".join(f"{e.key[:40]} {e.self_cpu_time_total / 1e3:.1f} ms" for e in cpu))


if __name__ == "__main__":
    main()
