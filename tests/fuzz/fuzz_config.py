"""Fuzzes config.json through the C++ loader (flashpage._core.parse_config, what LLM(),
`flashpage serve` and the C++ Engine parse a model directory's config.json with).

Contract: any bytes are accepted or refused with RuntimeError("config.json: ..."); an accepted
config keeps the loader's promises (positive sizes within bounds, heads that divide, finite
positive eps/theta and rotary frequencies, bos/eos ids inside the vocabulary).

Two kinds of input, chosen by the first byte: raw bytes (the JSON parser and everything after
it), and a seed config whose fields are replaced with edge values (type confusion, overflow,
NaN/inf) chosen by the rest of the input: the structured mode reaches the validation of every
field.

    python tests/fuzz/fuzz_config.py -max_total_time=600 [CORPUS_DIR]"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import atheris  # noqa: E402

with atheris.instrument_imports(include=["flashpage"]):
    from flashpage import _core

BUILTIN = [
    {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
     "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 100, "max_position_embeddings": 256,
     "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": [2, 3],
     "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 64}},
    {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
     "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 50, "use_sliding_window": False,
     "sliding_window": 4096, "attention_bias": True, "tie_word_embeddings": True, "torch_dtype": "bfloat16"},
    {"model_type": "qwen3", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1, "head_dim": 32,
     "num_attention_heads": 4, "num_key_value_heads": 1, "vocab_size": 50, "eos_token_id": 7,
     "rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
    {"model_type": "mistral", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
     "num_attention_heads": 4, "vocab_size": 50, "sliding_window": None,
     "quantization_config": None, "dtype": "float32"},
]
FIELDS = sorted(_harness.json_keys(BUILTIN) | {"head_dim", "mlp_bias", "quantization_config", "rope_parameters",
                                               "type", "format", "quant_method"})


def seeds() -> list[dict]:
    out = list(BUILTIN)
    for p in _harness.shared_files("models/*/config.json"):
        out.append(json.loads(p.read_text()))
    return out


SEEDS = seeds()


@atheris.instrument_func
def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    cfg = json.loads(json.dumps(SEEDS[fdp.ConsumeIntInRange(0, len(SEEDS) - 1)]))
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        target = cfg
        if fdp.ConsumeBool():  # inside rope_scaling / rope_parameters
            key = fdp.PickValueInList(["rope_scaling", "rope_parameters"])
            if not isinstance(cfg.get(key), dict):
                cfg[key] = {"rope_type": fdp.PickValueInList(["llama3", "linear", "default", "yarn"])}
            target = cfg[key]
        field = fdp.PickValueInList(FIELDS)
        if fdp.ConsumeIntInRange(0, 7) == 0:
            target.pop(field, None)
        elif fdp.ConsumeBool():
            target[field] = copy.deepcopy(fdp.PickValueInList(_harness.EDGE_VALUES))
        elif fdp.ConsumeBool():
            target[field] = fdp.ConsumeInt(8)
        else:
            target[field] = fdp.ConsumeFloat()
    return _harness.dumps(cfg)


@atheris.instrument_func
def check(text: bytes) -> None:
    try:
        cfg = _core.parse_config(text)
    except RuntimeError as e:
        if not str(e).startswith("config.json"):
            raise AssertionError(f"an error that does not name the file: {e}") from e
        _harness.feedback(str(e))
        return
    _harness.feedback(f"ok {cfg['model_type']} {cfg['rope_scaling']} {cfg['attention_bias']} {cfg['qk_norm']} "
                      f"{cfg['tie_word_embeddings']} {cfg['torch_dtype']} {len(cfg['eos_token_ids'])}")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings"):
        assert 0 < cfg[key] < 2**31, (key, cfg[key])
    assert cfg["num_attention_heads"] % cfg["num_key_value_heads"] == 0 and cfg["head_dim"] % 2 == 0
    assert math.isfinite(cfg["rms_norm_eps"]) and cfg["rms_norm_eps"] > 0, cfg["rms_norm_eps"]
    assert math.isfinite(cfg["rope_theta"]) and cfg["rope_theta"] > 0, cfg["rope_theta"]
    assert all(math.isfinite(x) and x > 0 for x in cfg["rope_inv_freq"])
    assert all(0 <= e < cfg["vocab_size"] for e in cfg["eos_token_ids"]), cfg["eos_token_ids"]
    assert cfg["bos_token_id"] == -1 or 0 <= cfg["bos_token_id"] < cfg["vocab_size"]


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    if not data:
        return
    if data[0] < 0x40:  # a quarter of the inputs: structured
        check(structured(atheris.FuzzedDataProvider(data[1:])))
    else:
        check(data[1:])


def corpus() -> dict[str, bytes]:
    out = {}
    for i, cfg in enumerate(SEEDS):
        out[f"raw-{i}"] = b"\x80" + _harness.dumps(cfg)
        out[f"structured-{i}"] = b"\x00" + bytes([i, 1, 2, 3, 4, 5, 6, 7])
    return out


if __name__ == "__main__":
    _harness.main(test_one_input, corpus(), [f'"{k}"'.encode() for k in FIELDS])
