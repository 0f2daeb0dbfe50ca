"""Fuzzes the GGUF reader (C++, flashpage._core.GgufFile: what LLM("x.gguf") maps its model with):
the header, metadata keys and values (every value type, arrays), the tensor table (names,
dimensions, types, offsets), alignment, and the model config read from the metadata.

Contract: any file is accepted or refused with RuntimeError naming the file; every tensor of an
accepted file dequantizes (all of its bytes are read, so a tensor past the mapping would crash
the process), its metadata converts to Python, and the config it describes is accepted or
refused with RuntimeError.

Inputs, chosen by the first byte: a whole file, or a seed file with a few bytes replaced.

    python tests/fuzz/fuzz_gguf.py -max_total_time=600 [CORPUS_DIR]"""

from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import atheris  # noqa: E402

with atheris.instrument_imports(include=["flashpage"]):
    from flashpage import _core

DIR = _harness.scratch_dir("gguf")


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def _seed() -> bytes:
    """A small llama GGUF: the config keys, two tokens, an F32 vector and a Q8_0 matrix."""
    kv = [("general.architecture", 8, _str("llama")), ("llama.embedding_length", 4, struct.pack("<I", 32)),
          ("llama.feed_forward_length", 4, struct.pack("<I", 32)), ("llama.block_count", 4, struct.pack("<I", 1)),
          ("llama.attention.head_count", 4, struct.pack("<I", 2)), ("llama.context_length", 4, struct.pack("<I", 64)),
          ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 2) + _str("a") + _str("b")),
          ("general.alignment", 4, struct.pack("<I", 32))]
    head = b"GGUF" + struct.pack("<IQQ", 3, 2, len(kv))
    for k, t, v in kv:
        head += _str(k) + struct.pack("<I", t) + v
    head += _str("output_norm.weight") + struct.pack("<IQIQ", 1, 32, 0, 0)
    head += _str("token_embd.weight") + struct.pack("<IQQIQ", 2, 32, 2, 8, 128)
    head += bytes(-len(head) % 32)
    data = struct.pack("<32f", *[i / 4 for i in range(32)])
    data += (struct.pack("<e", 1.0) + bytes(range(32))) * 2
    return head + data


SEED = _seed()
KEYS = [b"general.architecture", b"general.alignment", b"llama.embedding_length", b"tokenizer.ggml.tokens",
        b"token_embd.weight", b"output_norm.weight", b"GGUF"]


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] % 2 == 0:
        blob = data[1:]
    else:  # the seed with bytes replaced: (offset, value) pairs
        blob = bytearray(SEED)
        for i in range(1, len(data) - 2, 3):
            blob[(data[i] << 8 | data[i + 1]) % len(blob)] = data[i + 2]
        blob = bytes(blob)
    path = DIR / "m.gguf"
    path.write_bytes(blob)
    try:
        f = _core.GgufFile(str(path))
    except RuntimeError as e:
        if "m.gguf" not in str(e):
            raise AssertionError(f"an error that does not name the file: {e}") from e
        _harness.feedback(str(e))
        return
    f.metadata()
    for name, _, _ in f.tensors():
        f.dequantize(name).sum()
    try:
        _core.load_gguf_config(str(path))
        _harness.feedback("config ok")
    except RuntimeError as e:
        _harness.feedback(str(e))


if __name__ == "__main__":
    seeds = {"file": b"\x00" + SEED, "edit": b"\x01\x00\x05\x00", "cut": b"\x00" + SEED[:150]}
    for i, p in enumerate(_harness.shared_files("models/*/*.gguf")):  # a real header, cut short
        with open(p, "rb") as fh:
            seeds[f"shared-{i}"] = b"\x00" + fh.read(4096)
    _harness.main(test_one_input, seeds, KEYS)
