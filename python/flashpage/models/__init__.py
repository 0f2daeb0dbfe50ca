"""Where a model argument points: a local Hugging Face directory, a .gguf file, or, when none is
given, the tiny model that ships in the wheel (stories260K, MIT: a user's first command needs no
download). Mistakes people make get a message that says what to do instead."""

from __future__ import annotations

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
