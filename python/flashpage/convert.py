"""Checkpoints in flashpage's canonical quantized format (flashpage.quantization): written from a
float Hugging Face checkpoint (round-to-nearest quantization of every Linear layer of the
decoder) or converted from a GPTQ or AWQ checkpoint (4-bit, repacked without requantizing), and
read back Linear by Linear.

    flashpage quantize SRC DST [--format w4a16|w8a8-int8|fp8] [--group-size N] [--asymmetric]

DST gets model.safetensors, config.json with "quantization_config": {"quant_method":
"flashpage", "format", "group_size", "symmetric"}, and every other file of SRC (tokenizer,
generation config, chat template) as it is. Embeddings, norms and lm_head stay as they are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from flashpage import quantization as Q

FORMATS = ("w4a16", "w8a8-int8", "fp8")
# The decoder's Linear layers (Llama family): the weights a backend's quantized GEMMs read.
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def read_tensors(src: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (model.safetensors, or the shards its index names)."""
    from safetensors.torch import load_file

    src = Path(src)
    index = src / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else \
        ["model.safetensors"]
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        if not (src / f).is_file():
            raise FileNotFoundError(f"{src / f}: the checkpoint's weights are missing")
        tensors.update(load_file(src / f))
    return tensors


def is_linear(name: str) -> bool:
    return any(name.endswith(f"{suffix}.weight") for suffix in LINEARS)


def _quantize(name: str, w: torch.Tensor, fmt: str, group_size: int, symmetric: bool) -> dict[str, torch.Tensor]:
    prefix = name[: -len(".weight")]
    if fmt == "w4a16":
        if group_size == -1:  # one group per row
            group_size = w.shape[1]
        if w.shape[1] % group_size:
            raise ValueError(f"{name}: K={w.shape[1]} is not a multiple of group_size={group_size}")
        scale_dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
        q = Q.quantize_w4a16(w, group_size, symmetric=symmetric, scale_dtype=scale_dtype)
        out = {f"{prefix}.qweight": q.qweight, f"{prefix}.scales": q.scales}
        if q.qzeros is not None:
            out[f"{prefix}.qzeros"] = q.qzeros
        return out
    if fmt == "w8a8-int8":
        qweight, scales = Q.quantize_w8a8(w)
    else:
        qweight, scales = Q.quantize_fp8(w, per_channel=True)
    return {f"{prefix}.qweight": qweight, f"{prefix}.scales": scales}


def _from_4bit(qc: dict[str, Any], tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int, bool]:
    """A GPTQ or AWQ checkpoint's tensors -> canonical w4a16 tensors (and the group size, symmetry)."""
    method = qc.get("quant_method")
    if qc.get("bits") != 4:
        raise ValueError(f"quantization_config: {method} with bits={qc.get('bits')} is not supported (only 4)")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ValueError(f"quantization_config: AWQ version {qc.get('version')!r} is not supported (only 'gemm')")
    out: dict[str, torch.Tensor] = {}
    symmetric = True
    configured = qc.get("group_size", 128)
    channelwise = configured in (-1, None)  # GPTQ's -1: one group per row, whatever K the layer has
    for name in [n for n in tensors if n.endswith(".qweight")]:
        prefix = name[: -len(".qweight")]
        qweight, qzeros, scales = tensors[name], tensors[f"{prefix}.qzeros"], tensors[f"{prefix}.scales"]
        K = qweight.shape[0] * 8 if method == "gptq" else qweight.shape[0]
        group_size = K if channelwise else configured
        try:
            if method == "gptq":
                fmt = qc.get("checkpoint_format", "gptq")
                w = Q.from_gptq(qweight, qzeros, scales, group_size, tensors.get(f"{prefix}.g_idx"),
                                sym=bool(qc.get("sym", True)), zero_offset=0 if fmt == "gptq_v2" else 1)
            else:
                w = Q.from_awq(qweight, qzeros, scales, group_size)
        except ValueError as e:
            raise ValueError(f"{prefix}: {e}") from None
        symmetric = symmetric and w.qzeros is None
        out[f"{prefix}.qweight"], out[f"{prefix}.scales"] = w.qweight, w.scales
        if w.qzeros is not None:
            out[f"{prefix}.qzeros"] = w.qzeros
    if not out:
        raise ValueError(f"quantization_config says {method}, but no tensor ends in .qweight")
    quantized = {n.rsplit(".", 1)[0] for n in out}
    for name, t in tensors.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix not in quantized or leaf == "bias":
            out[name] = t
    if not symmetric:  # a mixed checkpoint: every quantized layer carries zeros
        for prefix in quantized:
            out.setdefault(f"{prefix}.qzeros", torch.full(out[f"{prefix}.scales"].shape, 8, dtype=torch.uint8))
    return out, -1 if channelwise else configured, symmetric


GROUP_SIZES = (128, 64, 32)  # the default's candidates: multiples of 32, what the CPU's kernels take


def pick_group_size(tensors: dict[str, torch.Tensor], linears: list[str]) -> int:
    """The largest of GROUP_SIZES dividing every Linear's input size; ValueError naming the
    Linear no candidate divides."""
    for g in GROUP_SIZES:
        if all(tensors[n].shape[1] % g == 0 for n in linears):
            return g
    worst = next(n for n in linears if tensors[n].shape[1] % GROUP_SIZES[-1])
    raise ValueError(f"{worst}: K={tensors[worst].shape[1]} is a multiple of none of {GROUP_SIZES}; pass "
                     "--group-size (a divisor of every K, or -1 for one group per row)")


def quantize_checkpoint(src: str | Path, dst: str | Path, fmt: str = "w4a16", group_size: int | None = None,
                        symmetric: bool = True) -> dict[str, Any]:
    """Writes src as a canonical quantized checkpoint into dst; returns its quantization_config.
    A GPTQ/AWQ src is converted (w4a16, its own group size); a float src is quantized to fmt
    (group_size None: pick_group_size)."""
    src, dst = Path(src), Path(dst)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if group_size is not None and group_size <= 0 and group_size != -1:
        raise ValueError(f"group_size must be positive (or -1: one group per row), got {group_size}")
    if src.resolve() == dst.resolve():
        raise ValueError("the destination must differ from the source")
    config = json.loads((src / "config.json").read_text())
    tensors = read_tensors(src)
    qc = config.get("quantization_config")
    if qc is not None:
        method = qc.get("quant_method")
        if method == "flashpage":
            raise ValueError(f"{src} is already in flashpage's format ({qc.get('format')})")
        if method not in ("gptq", "awq"):
            raise ValueError(f"quantization_config: quant_method {method!r} cannot be converted (gptq or awq can)")
        out, group_size, symmetric = _from_4bit(qc, tensors)
        fmt = "w4a16"
    else:
        linears = [n for n in tensors if is_linear(n) and tensors[n].dim() == 2]
        if not linears:
            raise ValueError(f"{src}: no decoder Linear weights ({', '.join(LINEARS)}) to quantize")
        out = {n: t for n, t in tensors.items() if n not in linears}
        if fmt == "w4a16" and group_size is None:
            group_size = pick_group_size(tensors, linears)
        for n in linears:
            out.update(_quantize(n, tensors[n], fmt, group_size, symmetric))
    qconfig: dict[str, Any] = {"quant_method": "flashpage", "format": fmt}
    if fmt == "w4a16":
        qconfig.update(group_size=group_size, symmetric=symmetric)
    write_checkpoint(src, dst, out, {**config, "quantization_config": qconfig})
    return qconfig


def write_checkpoint(src: Path, dst: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """dst as src with these tensors (one model.safetensors) and config.json; src's other files
    (tokenizer, chat template, generation config) copied as they are."""
    from safetensors.torch import save_file

    dst.mkdir(parents=True, exist_ok=True)
    save_file({n: t.contiguous() for n, t in tensors.items()}, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and f.name != "config.json" and not f.name.startswith(("model", ".")) \
                and not f.name.endswith(".safetensors"):
            shutil.copy2(f, dst / f.name)


def converted_for_cpu(model: str) -> str:
    """A GPTQ or AWQ checkpoint directory in flashpage's format, converted once (repacked, not
    requantized) into a cache beside the user's ($FLASHPAGE_CACHE or ~/.cache/flashpage); any
    other model as it is."""
    import hashlib
    import os

    from flashpage.models import checkpoint_quantization

    if checkpoint_quantization(model) not in ("gptq", "awq"):
        return model
    src = Path(model).resolve()
    stamp = hashlib.sha256(str(src).encode() + b"".join(
        f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode() for f in sorted(src.iterdir()) if f.is_file()))
    cache = Path(os.environ.get("FLASHPAGE_CACHE", Path.home() / ".cache" / "flashpage")) / "converted"
    dst = cache / f"{src.name}-{stamp.hexdigest()[:16]}"
    if not (dst / "config.json").is_file():
        tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
        quantize_checkpoint(src, tmp)
        tmp.rename(dst)
    return str(dst)


def read_linear(tensors: dict[str, torch.Tensor], prefix: str, qconfig: dict[str, Any]) -> Any:
    """One Linear of a canonical checkpoint: a quantization.W4A16, or (qweight, scales) for
    w8a8-int8 and fp8. Checks dtypes and shapes, naming the tensor."""
    fmt = qconfig.get("format")
    qweight, scales = tensors.get(f"{prefix}.qweight"), tensors.get(f"{prefix}.scales")
    if qweight is None or scales is None:
        raise ValueError(f"{prefix}: qweight and scales are required in format {fmt}")
    want = {"w4a16": torch.uint8, "w8a8-int8": torch.int8, "fp8": torch.float8_e4m3fn}.get(fmt)
    if want is None:
        raise ValueError(f"quantization_config: unknown format {fmt!r}")
    if qweight.dtype != want or qweight.dim() != 2:
        raise ValueError(f"{prefix}.qweight must be a 2-D {want} tensor in format {fmt}, got {qweight.dtype} "
                         f"{tuple(qweight.shape)}")
    N = qweight.shape[0]
    if fmt != "w4a16":
        if scales.dtype != torch.float32 or scales.shape not in ((N,), (1,)):
            raise ValueError(f"{prefix}.scales must be float32 [{N}] or [1], got {scales.dtype} {tuple(scales.shape)}")
        return qweight, scales
    group_size = int(qconfig.get("group_size", 0))
    K = qweight.shape[1] * 2
    group_size = K if group_size == -1 else group_size  # channel-wise
    if group_size <= 0 or K % group_size or scales.shape != (N, K // group_size):
        raise ValueError(f"{prefix}.scales has shape {tuple(scales.shape)}; with K={K} and group_size={group_size} "
                         f"it must be ({N}, {K // max(group_size, 1)})")
    zeros = tensors.get(f"{prefix}.qzeros")
    if zeros is None and not qconfig.get("symmetric", True):
        raise ValueError(f"{prefix}.qzeros is missing from an asymmetric checkpoint")
    if zeros is not None and (zeros.dtype != torch.uint8 or zeros.shape != scales.shape):
        raise ValueError(f"{prefix}.qzeros must be uint8 {tuple(scales.shape)}, got {zeros.dtype} {tuple(zeros.shape)}")
    return Q.W4A16(qweight, scales, zeros, group_size)
