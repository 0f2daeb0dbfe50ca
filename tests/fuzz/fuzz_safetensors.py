"""Fuzzes the safetensors loader (C++, flashpage._core.WeightStore: what every model load maps
its weights with): the 8-byte length, the JSON header, dtypes, shapes and data offsets, and the
shard index model.safetensors.index.json.

Contract: any file is accepted or refused with RuntimeError naming the file; every tensor of an
accepted file lies inside it with as many bytes as its dtype and shape need (all of them are
read back through numpy, so a view past the mapping would crash the process).

Inputs, chosen by the first byte: a header (its length prefix computed, a data section sized
from the offsets it names), a whole file (length prefix included), a shard index over two
fixed shards, or a seed header whose fields are replaced with edge values.

    python tests/fuzz/fuzz_safetensors.py -max_total_time=600 [CORPUS_DIR]"""

from __future__ import annotations

import copy
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import atheris  # noqa: E402

with atheris.instrument_imports(include=["flashpage"]):
    import numpy as np
    from flashpage import _core

DIR = _harness.scratch_dir("safetensors")
INDEX_DIR = _harness.scratch_dir("safetensors-index")
MAX_DATA = 4 << 20


def header_of(blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8:8 + n]


def _shard(tensors: dict[str, np.ndarray]) -> bytes:
    header, data = {}, b""
    names = {np.float32: "F32", np.float16: "F16", np.int8: "I8", np.uint16: "BF16"}
    for name, a in tensors.items():
        raw = a.tobytes()
        header[name] = {"dtype": names[a.dtype.type], "shape": list(a.shape), "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


SHARDS = {"model-00001-of-00002.safetensors": _shard({"a": np.ones((2, 3), np.float32), "b": np.zeros(4, np.uint16)}),
          "model-00002-of-00002.safetensors": _shard({"c": np.arange(5, dtype=np.int8)})}
for _name, _blob in SHARDS.items():
    (INDEX_DIR / _name).write_bytes(_blob)

SEED_HEADERS = [json.loads(header_of(b)) for b in SHARDS.values()]
for _p in _harness.shared_files("models/*/model.safetensors"):
    with open(_p, "rb") as _f:
        (_n,) = struct.unpack("<Q", _f.read(8))
        if _n < 1 << 20:
            SEED_HEADERS.append(json.loads(_f.read(_n)))
FIELDS = ["dtype", "shape", "data_offsets", "__metadata__"]
DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "Q4", "f32", ""]


@atheris.instrument_func
def data_size(header: bytes) -> int:
    """The data section the header's offsets name (so that valid headers load), capped."""
    try:
        h = json.loads(header)
        ends = [v["data_offsets"][1] for v in h.values() if isinstance(v, dict) and "data_offsets" in v]
        return max(0, min(MAX_DATA, max((e for e in ends if isinstance(e, int)), default=0)))
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError):
        return 64


@atheris.instrument_func
def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    h = copy.deepcopy(SEED_HEADERS[fdp.ConsumeIntInRange(0, len(SEED_HEADERS) - 1)])
    names = sorted(h) or ["w"]
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        name = fdp.PickValueInList(names)
        entry = h.setdefault(name, {})
        if not isinstance(entry, dict):
            h[name] = entry = {}
        field = fdp.PickValueInList(FIELDS)
        choice = fdp.ConsumeIntInRange(0, 5)
        if choice == 0:
            entry.pop(field, None)
        elif choice == 1:
            entry[field] = copy.deepcopy(fdp.PickValueInList(_harness.EDGE_VALUES))
        elif choice == 2:
            entry["dtype"] = fdp.PickValueInList(DTYPES)
        elif choice == 3:
            entry["shape"] = [fdp.PickValueInList([0, 1, 2, 3, 4, 2**31, 2**32, 2**62, 2**63 - 1, -1])
                              for _ in range(fdp.ConsumeIntInRange(0, 4))]
        else:
            entry["data_offsets"] = [fdp.ConsumeIntInRange(-2, 1 << 20) for _ in range(fdp.ConsumeIntInRange(1, 3))]
    return _harness.dumps(h)


@atheris.instrument_func
def load(directory: Path, files: list[str]) -> None:
    try:
        ws = _core.WeightStore(str(directory))
    except RuntimeError as e:
        if not any(f in str(e) for f in files):
            raise AssertionError(f"an error that does not name the file: {e}") from e
        _harness.feedback(str(e))
        return
    total = 0
    for name in ws.names():
        dtype, shape, _ = ws.info(name)
        a = ws.numpy(name)
        assert list(a.shape) == list(shape), (name, a.shape, shape)
        total += int(np.frombuffer(a.tobytes(), dtype=np.uint8).sum())  # reads every byte
        ws.check_shape(name, list(shape))
    _harness.feedback(f"ok {len(ws.names())} {min((len(ws.info(n)[1]) for n in ws.names()), default=-1)}")


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 4, data[1:]
    if mode == 3:  # a shard index over the two fixed shards
        (INDEX_DIR / "model.safetensors.index.json").write_bytes(rest)
        load(INDEX_DIR, ["model.safetensors.index.json", "safetensors"])
        return
    if mode == 0:
        header = structured(atheris.FuzzedDataProvider(rest))
        blob = struct.pack("<Q", len(header)) + header + bytes(data_size(header))
    elif mode == 1:
        blob = struct.pack("<Q", len(rest)) + rest + bytes(range(256)) * (data_size(rest) // 256 + 1)
    else:
        blob = rest
    (DIR / "model.safetensors").write_bytes(blob)
    load(DIR, ["model.safetensors"])


def corpus() -> dict[str, bytes]:
    out = {}
    for i, h in enumerate(SEED_HEADERS):
        out[f"header-{i}"] = b"\x01" + _harness.dumps(h)
        out[f"structured-{i}"] = b"\x00" + bytes([i, 3, 1, 4, 1, 5, 9, 2, 6])
    for i, blob in enumerate(SHARDS.values()):
        out[f"file-{i}"] = b"\x02" + blob
    out["index"] = b"\x03" + json.dumps({"metadata": {"total_size": 31}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}).encode()
    return out


if __name__ == "__main__":
    _harness.main(test_one_input, corpus(), [f'"{w}"'.encode() for w in FIELDS + DTYPES if w]
                  + [b'"weight_map"', b'"metadata"'] + [f'"{n}"'.encode() for n in SHARDS])
