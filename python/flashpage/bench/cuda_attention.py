"""Paged attention on the GPU. Decode: achieved bandwidth against the device's measured copy
bandwidth. Prefill (--prefill): TFLOP/s of causal attention over whole prompts. Both beside
torch's scaled_dot_product_attention on contiguous (non-paged) K/V.

    python -m flashpage.bench.cuda_attention [--batches 1,32,128] [--contexts 512,2048,8192,32768]
    python -m flashpage.bench.cuda_attention --prefill [--batches 1,4] [--contexts 1024,4096,8192]
"""

from __future__ import annotations

import argparse
import json
import math


def median_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def copy_bandwidth_gbs() -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6  # bytes read + written


def prefill(args) -> None:
    import torch

    from flashpage import cuda_ops

    dtype = torch.bfloat16
    print(f"{'batch':>6} {'seq':>6} {'ms':>9} {'TFLOP/s':>8} {'sdpa ms':>9} {'sdpa TFLOP/s':>13} {'vs sdpa':>8}")
    for batch in map(int, args.batches.split(",")):
        for n in map(int, args.contexts.split(",")):
            nb = math.ceil(n / args.block_size)
            shape = (batch * nb, args.kv_heads, args.block_size, args.head_dim)
            k_cache = torch.randn(shape, device="cuda", dtype=dtype)
            v_cache = torch.randn(shape, device="cuda", dtype=dtype)
            tables = torch.randperm(batch * nb, device="cuda").to(torch.int32).view(batch, nb)
            qsl = torch.arange(0, (batch + 1) * n, n, dtype=torch.int32, device="cuda")
            lens = torch.full((batch,), n, dtype=torch.int32, device="cuda")
            q = torch.randn(batch * n, args.q_heads, args.head_dim, device="cuda", dtype=dtype)
            out = torch.empty_like(q)
            ours = median_ms(lambda: cuda_ops.paged_prefill(q, k_cache, v_cache, tables, qsl, lens,
                                                            n, out=out), iters=10)
            qc = torch.randn(batch, args.q_heads, n, args.head_dim, device="cuda", dtype=dtype)
            kc = torch.randn(batch, args.kv_heads, n, args.head_dim, device="cuda", dtype=dtype)
            vc = torch.randn_like(kc)
            sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                qc, kc, vc, is_causal=True, enable_gqa=True), iters=10)
            flops = 4 * batch * args.q_heads * n * n * args.head_dim / 2  # causal: half
            print(f"{batch:>6} {n:>6} {ours:>9.3f} {flops / ours / 1e9:>8.1f} {sdpa:>9.3f} "
                  f"{flops / sdpa / 1e9:>13.1f} {sdpa / ours:>8.2f}")
            del k_cache, v_cache, qc, kc, vc
            torch.cuda.empty_cache()


def main() -> None:
    import torch

    from flashpage import cuda_ops

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batches", default="1,32,128")
    ap.add_argument("--contexts", default="512,2048,8192,32768")
    ap.add_argument("--q-heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--splits", default="0", help="KV splits to try (0 = the kernel's choice); "
                    "the table shows the auto choice and the best tried")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--prefill", action="store_true", help="benchmark prefill instead of decode")
    args = ap.parse_args()
    if args.prefill:
        prefill(args)
        return
    dtype = torch.bfloat16
    copy_gbs = copy_bandwidth_gbs()
    rows = []
    for batch in map(int, args.batches.split(",")):
        for ctx in map(int, args.contexts.split(",")):
            nb_per = math.ceil(ctx / args.block_size)
            num_blocks = batch * nb_per
            shape = (num_blocks, args.kv_heads, args.block_size, args.head_dim)
            k_cache = torch.randn(shape, device="cuda", dtype=dtype)
            v_cache = torch.randn(shape, device="cuda", dtype=dtype)
            tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, nb_per)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
            q = torch.randn(batch, args.q_heads, args.head_dim, device="cuda", dtype=dtype)
            out = torch.empty_like(q)
            ws = torch.empty(max(1, cuda_ops.paged_decode_workspace_floats(
                batch, args.q_heads, args.kv_heads, args.head_dim, args.block_size, ctx)),
                dtype=torch.float32, device="cuda")
            tried = {}
            for sp in map(int, args.splits.split(",")):
                need = cuda_ops.paged_decode_workspace_floats(
                    batch, args.q_heads, args.kv_heads, args.head_dim, args.block_size, ctx, sp)
                if need > ws.numel():
                    ws = torch.empty(need, dtype=torch.float32, device="cuda")
                tried[sp] = median_ms(lambda: cuda_ops.paged_decode(
                    q, k_cache, v_cache, tables, lens, ctx, num_splits=sp, out=out, workspace=ws))
            ours = tried[0] if 0 in tried else min(tried.values())
            best_splits = min(tried, key=tried.get)
            kv_bytes = 2 * batch * ctx * args.kv_heads * args.head_dim * 2
            # Peer: SDPA over contiguous K/V [batch, kv_heads, ctx, d] (flash/cuDNN backends).
            del k_cache, v_cache
            kc = torch.randn(batch, args.kv_heads, ctx, args.head_dim, device="cuda", dtype=dtype)
            vc = torch.randn_like(kc)
            q4 = q.view(batch, args.q_heads, 1, args.head_dim)
            sdpa = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
                q4, kc, vc, enable_gqa=True))
            del kc, vc
            torch.cuda.empty_cache()
            gbs = kv_bytes / ours / 1e6
            rows.append({"batch": batch, "context": ctx, "ms": round(ours, 4),
                         "GB/s": round(gbs), "of_copy_bw": round(gbs / copy_gbs, 3),
                         "sdpa_ms": round(sdpa, 4), "speedup_vs_sdpa": round(sdpa / ours, 2),
                         "best_splits": best_splits, "best_ms": round(tried[best_splits], 4)})
    if args.json:
        print(json.dumps({"copy_GB/s": round(copy_gbs), "rows": rows}))
        return
    print(f"device copy bandwidth (read + write): {copy_gbs:.0f} GB/s")
    print(f"{'batch':>6} {'context':>8} {'ms':>9} {'GB/s':>7} {'of copy':>8} {'sdpa ms':>9} "
          f"{'vs sdpa':>8} {'best split':>10} {'best ms':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['context']:>8} {r['ms']:>9.4f} {r['GB/s']:>7} "
              f"{r['of_copy_bw']:>8.2f} {r['sdpa_ms']:>9.4f} {r['speedup_vs_sdpa']:>8.2f} "
              f"{r['best_splits']:>10} {r['best_ms']:>9.4f}")


if __name__ == "__main__":
    main()
