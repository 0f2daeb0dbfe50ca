"""GEMM benchmark on the GPU, one run: flashpage's W4A16 (tensor-core kernel; dequantize +
cuBLASLt from M = 512), FP8 W8A8 (per-token x per-channel, cuBLASLt), W8A8-INT8 (__dp4a up to
M = 32, then cuBLASLt int8) and dense bf16 (cuBLASLt) against torch's bf16 matmul on Llama-shaped problems, and W4A16's achieved bandwidth at M = 1
against the device's measured copy bandwidth.

    python -m flashpage.bench.cuda_gemm [--m 1,16,64,256,4096] [--repeats 50] [--sweep] [--json F]

Weights: random, quantized round-to-nearest to the canonical formats (flashpage.quantization):
int4 with group size 128 (symmetric), fp8 e4m3 and int8 per channel. Times are medians of CUDA-event
timings of back-to-back calls with the outputs preallocated by the callee (as in a model step).
Bytes at M = 1 count the packed weights, scales and activations read and the output written.
--sweep also times every tensor-core configuration of the W4A16 kernel (for tuning the choice).
"""

from __future__ import annotations

import argparse
import json
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
    from flashpage.quantization import quantize_fp8, quantize_w4a16, quantize_w8a8

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,64,256,4096")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--sweep", action="store_true", help="time every W4A16 configuration too")
    ap.add_argument("--json", help="also write the rows to this file")
    a = ap.parse_args()
    ms = [int(x) for x in a.m.split(",")]
    fp8_ok = torch.cuda.get_device_capability() >= (8, 9)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: device copy bandwidth {bw / 1e9:.0f} GB/s; cuBLASLt: "
          f"{cuda_ops.blaslt_available()}")
    print("| K x N | M | torch bf16 us | dense us (x) | w4a16 us (x) | w4a16 cuda-core us | fp8 us (x) | "
          "int8 us (x) | w4a16 GB/s at M=1 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = []
    for K, N in SHAPES:
        w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        qw = quantize_w4a16(w.float(), 128, symmetric=True, scale_dtype=torch.bfloat16)
        packed = cuda_ops.w4a16_repack(qw.qweight, qw.scales, None, 128)
        w8, s8 = quantize_fp8(w.float(), per_channel=True) if fp8_ok else (None, None)
        wi, si = quantize_w8a8(w.float())
        ws = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
        for M in ms:
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            row = {"K": K, "N": N, "M": M}
            row["torch_bf16"] = _time(lambda: x @ w.T, a.repeats)
            row["dense"] = _time(lambda: cuda_ops.gemm(x, w), a.repeats)
            row["w4a16"] = _time(lambda: cuda_ops.w4a16_linear(x, packed, workspace=ws), a.repeats)
            row["w4a16_cuda_core"] = (_time(lambda: cuda_ops.w4a16_gemm(x, qw.qweight, qw.scales, None, 128),
                                            a.repeats) if M <= 64 else None)
            row["fp8"] = _time(lambda: cuda_ops.fp8_linear(x, w8, s8, workspace=ws), a.repeats) if fp8_ok else None
            row["int8"] = _time(lambda: cuda_ops.w8a8_gemm(x, wi, si, workspace=ws), a.repeats)
            if a.sweep:
                row["w4a16_configs"] = [_time(lambda: cuda_ops.w4a16_linear(x, packed, config=c, workspace=ws),
                                              a.repeats) for c in (-2, *range(cuda_ops.w4a16_num_configs()))]
            ref = row["torch_bf16"]
            gbs = ""
            if M == 1:
                moved = qw.qweight.numel() + qw.scales.numel() * 2 + x.numel() * 2 + N * 2
                row["w4a16_bandwidth"] = moved / row["w4a16"]
                gbs = f"{moved / row['w4a16'] / 1e9:.0f} ({moved / row['w4a16'] / bw:.0%})"

            def us(key: str) -> str:
                t = row.get(key)
                return "-" if t is None else f"{t * 1e6:.1f} ({ref / t:.2f}x)"
            core = row["w4a16_cuda_core"]
            print(f"| {K}x{N} | {M} | {ref * 1e6:.1f} | {us('dense')} | {us('w4a16')} | "
                  f"{'-' if core is None else f'{core * 1e6:.1f}'} | {us('fp8')} | {us('int8')} | {gbs} |", flush=True)
            if a.sweep:
                print("    configs (-2 = dequantize + cuBLASLt, 0..):",
                      " ".join(f"{t * 1e6:.1f}" for t in row["w4a16_configs"]), flush=True)
            rows.append(row)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
