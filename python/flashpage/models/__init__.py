"""Where a model argument points: a local Hugging Face directory, a .gguf file, or, when none is
given, the tiny model that ships in the wheel (stories260K, MIT: a user's first command needs no
download). Mistakes people make get a message that says what to do instead. And what a
checkpoint holds (checkpoint_quantization), for the checks and conversions that depend on it."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

EMBEDDED_MODEL = "stories260K"
_EMBEDDED_DIR = Path(__file__).resolve().parent / EMBEDDED_MODEL

# owner/name, the shape of a Hugging Face Hub id (meta-llama/Llama-3.2-1B, TheBloke/x-GGUF)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def embedded_model_path() -> str:
    return str(_EMBEDDED_DIR)


def resolve_model(model: str | None) -> str:
    """The path to load: `model` itself where it exists; the embedded model for "" / None / its
    name; otherwise a FileNotFoundError saying why and what to pass."""
    if not model or (model == EMBEDDED_MODEL and not os.path.exists(model)):
        return embedded_model_path()
    path = os.path.expanduser(model)
    if path.endswith(".gguf"):
        if os.path.isfile(path):
            return path
        raise FileNotFoundError(f"{model}: no such GGUF file")
    if os.path.isdir(path):
        return path
    if os.path.isfile(path):
        raise FileNotFoundError(f"{model}: a file, not a model: pass the directory that holds config.json and the "
                                "*.safetensors, or a .gguf file")
    if _HUB_ID.match(model) and not model.startswith((".", "~")):
        raise FileNotFoundError(
            f"{model}: no such directory. It looks like a Hugging Face Hub id, and flashpage does not download "
            f"models: fetch it first (`huggingface-cli download {model} --local-dir DIR`) and pass DIR")
    raise FileNotFoundError(f"{model}: no such directory or .gguf file (flashpage loads local Hugging Face model "
                            "directories and GGUF files)")


def checkpoint_quantization(model: str) -> str | None:
    """What a checkpoint holds: "gguf", "awq", "gptq", flashpage's formats (w4a16, w8a8-int8,
    fp8), another config.json quant_method as named there, or None (float weights)."""
    if model.endswith(".gguf"):
        return "gguf"
    cfg = os.path.join(model, "config.json")
    if not os.path.isfile(cfg):
        return None
    with open(cfg, encoding="utf-8") as f:
        qc = json.load(f).get("quantization_config") or {}
    method = qc.get("quant_method")
    return qc.get("format") if method == "flashpage" else method
