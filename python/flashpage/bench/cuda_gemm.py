"""Quantized GEMM benchmark on the GPU: flashpage's W4A16 kernel against torch's bf16 matmul
(cuBLAS) on Llama-shaped problems, and its achieved bandwidth at M = 1 against the device's
measured copy bandwidth.

    python -m flashpage.bench.cuda_gemm [--m 1,16,64,256,4096] [--repeats 50]

Weights: random, quantized round-to-nearest to the canonical int4 format with group size 128
(flashpage.quantization). Times are medians of CUDA-event timings; bytes at M = 1 count the
packed weights, scales and activations read and the output written.
"""

from __future__ import annotations

import argparse
import statistics

SHAPES = [(4096, 4096), (4096, 14336), (14336, 4096), (4096, 128256)]  # K x N


def _time(fn, repeats: int) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def copy_bandwidth(repeats: int = 20) -> float:
    import torch

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / _time(lambda: dst.copy_(src), repeats)


def main() -> None:
    import torch

    from flashpage import cuda_ops
    from flashpage.quantization import quantize_w4a16

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,64,256,4096")
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    ms = [int(x) for x in a.m.split(",")]
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {bw / 1e9:.0f} GB/s")
    print("| K x N | M | torch bf16 us | w4a16 us | speed-up | w4a16 GB/s (M=1) |")
    print("|---|---:|---:|---:|---:|---:|")
    for K, N in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = quantize_w4a16(w.float().cpu(), 128, symmetric=True, scale_dtype=torch.bfloat16)
        qweight, scales = qw.qweight.cuda(), qw.scales.cuda()
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            t_ref = _time(lambda: x @ w.T, a.repeats)
            t_q = _time(lambda: cuda_ops.w4a16_gemm(x, qweight, scales, None, 128), a.repeats)
            gbs = ""
            if M == 1:
                moved = qweight.numel() + scales.numel() * 2 + x.numel() * 2 + N * 2
                gbs = f"{moved / t_q / 1e9:.0f} ({moved / t_q / bw:.0%})"
            print(f"| {K}x{N} | {M} | {t_ref * 1e6:.1f} | {t_q * 1e6:.1f} | {t_ref / t_q:.2f}x | {gbs} |", flush=True)


if __name__ == "__main__":
    main()
