"""The engine on the GPU: a dummy Llama-3-8B shape (hidden 4096, 32 layers, 32 query / 8 KV
heads, FFN 14336, vocabulary 128256) in bf16 with random weights, through `LLM(device="cuda")`.

    python -m flashpage.bench.gpu [--cases 128/128,1000/1000,2048/2048] [--prompts 1024,1000,200]
                                  [--max-num-seqs 384] [--json out.json] [--deadline SECONDS]

Reports, on the same GPU in the same run: start-up to the first token (weights generated on
the host, uploaded, KV pool sized, first step), offline output throughput (output tokens per
second over the whole run, every prompt submitted at once, EOS ignored) for each input/output
length pair (as vLLM's benchmark_throughput: 1000 prompts by default, more than run at once, so
the batch stays full while the first finish), and batch-1 time per output token against the
bound: weight bytes per token over the device's copy bandwidth (a device-to-device copy measured
here).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np

LLAMA3_8B = dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=4096, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, intermediate_size=14336,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001, torch_dtype="bfloat16")


def weight_bytes(c: dict) -> int:
    H, I, L, V, D = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"], c["head_dim"]
    per_layer = H * (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * D + c["num_attention_heads"] * D * H \
        + 3 * H * I
    return 2 * (L * per_layer + V * H)  # bf16; the embedding table is gathered, the LM head read


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), median of 10."""
    import torch
    x = torch.empty(1 << 29, dtype=torch.int16, device="cuda")
    y = torch.empty_like(x)
    times = []
    for _ in range(12):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * x.numel() * 2 / statistics.median(times[2:])


def run_case(llm, in_len: int, out_len: int, n: int, seed: int = 0) -> dict:
    from flashpage import SamplingParams
    rng = np.random.default_rng(seed)
    prompts = [{"prompt_token_ids": rng.integers(10, 100000, size=in_len).tolist()} for _ in range(n)]
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(input_len=in_len, output_len=out_len, prompts=n, seconds=dt, output_tokens=produced,
                output_tokens_per_s=produced / dt, total_tokens_per_s=(produced + n * in_len) / dt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="128/128,1000/1000,2048/2048")
    # 2048/2048: 200 sequences of 4096 tokens fit an H200's KV pool (884k tokens at 0.9
    # utilization); more at once would be preempted and recomputed.
    ap.add_argument("--prompts", default="1024,1000,200", help="prompts per case")
    # 384 sequences of 2000 tokens fill 87 % of that pool.
    ap.add_argument("--max-num-seqs", type=int, default=384)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--cuda-graph-max-batch", type=int, default=None,
                    help="decode steps of up to this many sequences as CUDA graphs (default: the engine's)")
    ap.add_argument("--json", help="also write the results to this file (rewritten after each case)")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds from the start after which no further case is begun (0: none)")
    a = ap.parse_args()
    started = time.perf_counter()

    def save() -> None:
        if a.json:
            with open(a.json, "w") as f:
                json.dump(result, f, indent=1)

    import torch

    from flashpage import LLM, SamplingParams
    result: dict = {"device": torch.cuda.get_device_name(), "cuda": torch.version.cuda,
                    "shape": "llama-3-8b (dummy bf16)"}
    bw = copy_bandwidth()
    result["copy_bandwidth_GBps"] = bw / 1e9
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA3_8B, f)
        t0 = time.perf_counter()
        llm = LLM(d, device="cuda", load_format="dummy", dtype="bfloat16", max_model_len=4352,
                  max_num_seqs=a.max_num_seqs, gpu_memory_utilization=a.gpu_memory_utilization,
                  cuda_graph_max_batch=a.cuda_graph_max_batch,
                  skip_tokenizer_init=True, verbose=True)
        llm.generate({"prompt_token_ids": list(range(10, 26))}, SamplingParams(temperature=0, max_tokens=1),
                     use_tqdm=False)
        result["startup_to_first_token_s"] = time.perf_counter() - t0
        result["engine"] = {k: llm.model_info[k] for k in ("backend", "num_kv_blocks", "kv_cache_report",
                                                             "load_seconds", "max_num_batched_tokens",
                                                             "cuda_graph_max_batch", "cuda_graphs")}
        print(json.dumps(result, indent=1), flush=True)
        save()
        # Batch 1: time per output token after the first, against weight bytes / bandwidth.
        one = run_case(llm, 128, 257, 1)
        tpot = one["seconds"] / one["output_tokens"]
        bound = weight_bytes(LLAMA3_8B) / bw
        result["batch1"] = dict(tpot_ms=tpot * 1e3, bound_ms=bound * 1e3, ratio_to_bound=tpot / bound)
        print(json.dumps(result["batch1"]), flush=True)
        save()
        result["throughput"] = []
        for case, n in zip(a.cases.split(","), [int(x) for x in a.prompts.split(",")]):
            if a.deadline and time.perf_counter() - started > a.deadline:
                result.setdefault("skipped_past_deadline", []).append(case)
                continue
            i, o = (int(x) for x in case.split("/"))
            row = run_case(llm, i, o, n)
            result["throughput"].append(row)
            print(json.dumps(row), flush=True)
            save()
    save()


if __name__ == "__main__":
    main()
