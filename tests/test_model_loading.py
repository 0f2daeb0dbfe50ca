"""config.json and safetensors loading: real checkpoints, every supported variant, and every
kind of malformed input, each with an error that names the file, the tensor and the problem."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from flashpage import _core

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models"
STORIES = SHARED / "stories260K"

LLAMA = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 100,
         "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "hidden_act": "silu"}


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], *, dtype_override=None,
                      header_patch=None, truncate: int = 0) -> None:
    header, blobs, off = {}, [], 0
    names = {np.float32: "F32", np.float16: "F16", np.int32: "I32", np.uint16: "BF16"}
    for name, a in tensors.items():
        raw = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": (dtype_override or {}).get(name, names[a.dtype.type]),
                        "shape": list(a.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {"format": "pt"}
    if header_patch:
        header_patch(header)
    h = json.dumps(header).encode()
    data = struct.pack("<Q", len(h)) + h + b"".join(blobs)
    path.write_bytes(data[: len(data) - truncate] if truncate else data)


def test_real_checkpoint_loads_with_shapes_from_its_config():
    if not STORIES.exists():
        pytest.skip("../shared/models/stories260K not present")
    cfg = _core.load_config(str(STORIES))
    assert cfg["model_type"] == "llama" and cfg["num_key_value_heads"] == 4
    assert cfg["head_dim"] == 8 and cfg["tie_word_embeddings"]
    ws = _core.WeightStore(str(STORIES))
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    ws.check_shape("model.embed_tokens.weight", [vocab, hidden])
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    for i in range(cfg["num_hidden_layers"]):
        ws.check_shape(f"model.layers.{i}.self_attn.k_proj.weight", [kv, hidden])
        ws.check_shape(f"model.layers.{i}.mlp.gate_proj.weight", [cfg["intermediate_size"], hidden])
    emb = ws.numpy("model.embed_tokens.weight")
    assert emb.dtype == np.float32 and emb.shape == (vocab, hidden) and not emb.flags.writeable
    assert np.isfinite(emb).all() and emb.std() > 0
    with pytest.raises(RuntimeError, match="shape \\[512, 64\\], expected \\[512, 65\\]"):
        ws.check_shape("model.embed_tokens.weight", [vocab, hidden + 1])


@pytest.mark.parametrize("tokenizer_family", ["smollm2-135m-instruct"])
def test_real_config_files_parse(tokenizer_family):
    path = SHARED / tokenizer_family
    if not path.exists():
        pytest.skip("shared model missing")
    cfg = _core.load_config(str(path))
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert cfg["head_dim"] == 64 and cfg["rope_theta"] == 100000


def test_variants_parse_with_their_features():
    qwen2 = _core.parse_config(json.dumps({**LLAMA, "model_type": "qwen2", "use_sliding_window": False,
                                           "sliding_window": 4096, "eos_token_id": [1, 2]}))
    assert qwen2["attention_bias"] and not qwen2["qk_norm"] and qwen2["eos_token_ids"] == [1, 2]
    qwen3 = _core.parse_config(json.dumps({**LLAMA, "model_type": "qwen3", "head_dim": 32}))
    assert qwen3["qk_norm"] and qwen3["head_dim"] == 32
    mistral = _core.parse_config(json.dumps({**LLAMA, "model_type": "mistral", "sliding_window": None}))
    assert mistral["model_type"] == "mistral" and not mistral["attention_bias"]
    mha = _core.parse_config(json.dumps({k: v for k, v in LLAMA.items() if k != "num_key_value_heads"}))
    assert mha["num_key_value_heads"] == mha["num_attention_heads"]


def hf_llama3_inv_freq(theta, dim, factor, low, high, old_len):
    inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    wavelen = 2 * math.pi / inv
    out = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * out / factor + smooth * out
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return np.where(medium, smoothed, out)


def test_rope_scaling_llama3_and_linear():
    rs = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
    cfg = _core.parse_config(json.dumps({**LLAMA, "hidden_size": 1024, "num_attention_heads": 8,
                                         "rope_theta": 500000.0, "rope_scaling": rs}))
    want = hf_llama3_inv_freq(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    np.testing.assert_allclose(cfg["rope_inv_freq"], want, rtol=1e-12)
    # transformers 5 writes rope_parameters, with rope_theta inside
    v5 = _core.parse_config(json.dumps({**LLAMA, "hidden_size": 1024, "num_attention_heads": 8,
                                        "rope_parameters": {**rs, "rope_theta": 500000.0}}))
    np.testing.assert_allclose(v5["rope_inv_freq"], want, rtol=1e-12)
    lin = _core.parse_config(json.dumps({**LLAMA, "rope_scaling": {"type": "linear", "factor": 4.0}}))
    np.testing.assert_allclose(lin["rope_inv_freq"], 1.0 / 10000 ** (np.arange(0, 8, 2) / 8) / 4)


@pytest.mark.parametrize("patch,message", [
    ({"model_type": "gpt2"}, 'model_type "gpt2" is not supported'),
    ({"hidden_size": None}, 'missing required field "hidden_size"'),
    ({"num_hidden_layers": -1}, '"num_hidden_layers" must be positive'),
    ({"num_attention_heads": 8, "num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, 'rope_scaling type "yarn" is not supported'),
    ({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}, 'rope_parameters type "dynamic" is not'),
    ({"hidden_act": "gelu"}, 'hidden_act "gelu" is not supported'),
    ({"model_type": "mistral", "sliding_window": 128}, "sliding_window=128 is not supported"),
    ({"vocab_size": 10.5}, '"vocab_size" must be an integer'),
    ({"hidden_size": "64"}, '"hidden_size" must be an integer, got a string'),
    ({"quantization_config": {"quant_method": "gptq", "bits": 4}}, 'quant_method "gptq" is not read directly'),
    ({"quantization_config": {"quant_method": "flashpage", "format": "nf4"}}, 'format "nf4" is not one of'),
    ({"quantization_config": {"quant_method": "flashpage", "format": "w4a16", "group_size": 16}},
     "group_size 16 is not supported on the CPU"),
])
def test_unsupported_or_bad_configs_are_refused_by_name(patch, message):
    cfg = {**LLAMA, **patch}
    cfg = {k: v for k, v in cfg.items() if v is not None}
    with pytest.raises(RuntimeError, match=message):
        _core.parse_config(json.dumps(cfg))


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("patch,message", [
    # Numbers that load and silently produce NaN or garbage activations.
    ({"rope_theta": NAN}, '"rope_theta" must be a finite number > 0, got nan'),
    ({"rope_theta": 0}, '"rope_theta" must be a finite number > 0, got 0'),
    ({"rope_theta": -10000.0}, '"rope_theta" must be a finite number > 0, got -10000'),
    ({"rope_theta": INF}, '"rope_theta" must be a finite number > 0, got inf'),
    ({"rms_norm_eps": NAN}, '"rms_norm_eps" must be a finite number > 0, got nan'),
    ({"rms_norm_eps": 0.0}, '"rms_norm_eps" must be a finite number > 0, got 0'),
    ({"rms_norm_eps": -1e-5}, '"rms_norm_eps" must be a finite number > 0, got -1.0000000000000001e-05'),
    ({"rms_norm_eps": -INF}, '"rms_norm_eps" must be a finite number > 0, got -inf'),
    ({"rms_norm_eps": "1e-5"}, '"rms_norm_eps" must be a number, got a string'),
    # rope_parameters (transformers 5) carries its own rope_theta
    ({"rope_parameters": {"rope_type": "default", "rope_theta": NAN}},
     'config.json rope_parameters: field "rope_theta" must be a finite number > 0, got nan'),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, 'rope_scaling: field "factor" must be a finite number > 0'),
    ({"rope_scaling": {"type": "linear", "factor": INF}}, '"factor" must be a finite number > 0, got inf'),
    ({"rope_scaling": {"rope_type": "llama3", "factor": NAN}}, '"factor" must be a finite number > 0, got nan'),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": -1}},
     '"low_freq_factor" must be a finite number > 0, got -1'),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4, "high_freq_factor": 4}},
     "high_freq_factor \\(4\\) must be greater than low_freq_factor \\(4\\)"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8, "original_max_position_embeddings": 0}},
     '"original_max_position_embeddings" must be positive, got 0'),
    ({"rope_scaling": {"factor": 2.0}}, 'rope_scaling lacks "rope_type"'),
    # Sizes: non-positive, not dividing, or so large that products overflow.
    ({"hidden_size": 0}, '"hidden_size" must be positive, got 0'),
    ({"num_attention_heads": 0}, '"num_attention_heads" must be positive, got 0'),
    ({"num_key_value_heads": 0}, '"num_key_value_heads" must be positive, got 0'),
    ({"num_key_value_heads": 16}, "must be a multiple of num_key_value_heads \\(16\\)"),
    ({"hidden_size": 60}, "hidden_size is not a multiple of num_attention_heads and no head_dim is given"),
    ({"hidden_size": 60, "head_dim": None}, "hidden_size is not a multiple of num_attention_heads"),
    ({"hidden_size": 4}, "hidden_size is not a multiple of num_attention_heads"),
    ({"head_dim": 7}, "head_dim must be even for rotary embeddings, got 7"),
    ({"head_dim": -8}, '"head_dim" must be positive, got -8'),
    ({"head_dim": 1 << 40}, '"head_dim" must be at most 65536'),
    ({"hidden_size": (1 << 24) + 2, "num_attention_heads": 1, "num_key_value_heads": 1},
     '"hidden_size" must be at most 16777216'),
    ({"hidden_size": 1 << 24, "num_attention_heads": 1, "num_key_value_heads": 1},
     "head_dim \\(hidden_size / num_attention_heads\\) must be at most 65536"),
    ({"vocab_size": 1 << 62}, '"vocab_size" must be at most 16777216'),
    ({"num_hidden_layers": 1 << 20}, '"num_hidden_layers" must be at most 65536'),
    ({"intermediate_size": 2 ** 64}, '"intermediate_size" must be an integer'),  # beyond int64
    ({"max_position_embeddings": 1 << 31}, '"max_position_embeddings" must be at most 2147483647'),
    ({"max_position_embeddings": 0}, '"max_position_embeddings" must be positive'),
    # Token ids that are not in the vocabulary (the core keeps them as int32).
    ({"eos_token_id": -1}, '"eos_token_id" holds -1, not a token id of the vocabulary \\(vocab_size 100\\)'),
    ({"eos_token_id": [2, 100]}, '"eos_token_id" holds 100, not a token id'),
    ({"eos_token_id": 1 << 40}, '"eos_token_id" holds 1099511627776, not a token id'),
    ({"eos_token_id": "2"}, '"eos_token_id" must be an integer, got a string'),
    ({"bos_token_id": -5}, '"bos_token_id" holds -5, not a token id'),
    ({"bos_token_id": 1.5}, '"bos_token_id" must be an integer, got 1.5'),
])
def test_impossible_numbers_are_refused_naming_the_field(patch, message):
    cfg = {**LLAMA, **patch}
    with pytest.raises(RuntimeError, match=message) as err:
        _core.parse_config(json.dumps(cfg))  # Python's json writes NaN / Infinity, as configs do
    assert str(err.value).startswith("config.json")


def test_impossible_numbers_in_a_model_dir_are_refused_before_the_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA, "rope_theta": float("nan")}))
    with pytest.raises(RuntimeError, match=f'{tmp_path}/config.json: field "rope_theta" must be a finite '
                                           'number > 0, got nan'):
        _core.load_config(str(tmp_path))
    from flashpage import LLM

    with pytest.raises(RuntimeError, match='"rope_theta" must be a finite number > 0'):
        LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 20)


def test_boundary_numbers_still_load():
    cfg = _core.parse_config(json.dumps({**LLAMA, "rope_theta": 1e-3, "rms_norm_eps": 1e-30, "head_dim": None,
                                         "eos_token_id": [0, 99], "bos_token_id": None,
                                         "max_position_embeddings": 10485760}))
    assert cfg["head_dim"] == 8 and cfg["eos_token_ids"] == [0, 99] and cfg["bos_token_id"] == -1
    assert all(math.isfinite(x) for x in cfg["rope_inv_freq"])


def test_bad_config_json_and_missing_files(tmp_path):
    with pytest.raises(RuntimeError, match="config.json: bad JSON at byte"):
        _core.parse_config('{"model_type": "llama",')
    with pytest.raises(RuntimeError, match="config.json: cannot open"):
        _core.load_config(str(tmp_path))
    with pytest.raises(RuntimeError, match="no model.safetensors"):
        _core.WeightStore(str(tmp_path))


def test_single_and_sharded_checkpoints(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.arange(6, dtype=np.float16).reshape(2, 3)
    bf = np.array([0x3F80, 0x4000], dtype=np.uint16)  # bf16 1.0, 2.0
    single = tmp_path / "single"
    single.mkdir()
    write_safetensors(single / "model.safetensors", {"a": a, "b": b, "c": bf})
    ws = _core.WeightStore(str(single))
    assert sorted(ws.names()) == ["a", "b", "c"]
    np.testing.assert_array_equal(ws.numpy("a"), a)
    np.testing.assert_array_equal(ws.numpy("b"), b)
    assert ws.info("c")[0] == "BF16" and ws.numpy("c").tolist() == [0x3F80, 0x4000]

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    write_safetensors(sharded / "model-00001-of-00002.safetensors", {"a": a})
    write_safetensors(sharded / "model-00002-of-00002.safetensors", {"b": b})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                        "b": "model-00002-of-00002.safetensors"}}))
    ws2 = _core.WeightStore(str(sharded))
    assert len(ws2.files) == 2 and ws2.info("b")[2].endswith("model-00002-of-00002.safetensors")
    np.testing.assert_array_equal(ws2.numpy("b"), b)
    with pytest.raises(RuntimeError, match="has no tensor 'zzz'"):
        ws2.info("zzz")


def test_malformed_safetensors_name_the_file_tensor_and_problem(tmp_path):
    a = np.zeros((4, 4), dtype=np.float32)
    cases = {
        "truncated": (dict(truncate=10), "fall outside the .*data section \\(truncated file\\?\\)"),
        "wrong_size": (dict(header_patch=lambda h: h["w"].update(shape=[4, 5])),
                       "tensor 'w' has 64 bytes but F32 \\[4, 5\\] needs 80"),
        "bad_dtype": (dict(dtype_override={"w": "Q4"}), "tensor 'w' has unsupported dtype Q4"),
        "bad_offsets": (dict(header_patch=lambda h: h["w"].update(data_offsets=[0])),
                        "data_offsets must have 2 entries"),
        "negative": (dict(header_patch=lambda h: h["w"].update(shape=[-4, -4])),
                     "negative dimension"),
        "missing_field": (dict(header_patch=lambda h: h["w"].pop("dtype")),
                          "tensor 'w' lacks dtype, shape or data_offsets"),
        # 4 x 2^62 x 4 bytes wraps to 0 in 64 bits: it must not pass as an empty tensor.
        "overflow": (dict(header_patch=lambda h: h["w"].update(shape=[4, 1 << 62], data_offsets=[0, 0])),
                     "tensor 'w' shape \\[4, 4611686018427387904\\] is too large"),
        "overflow_2": (dict(header_patch=lambda h: h["w"].update(shape=[1 << 32, 1 << 32], data_offsets=[0, 0])),
                       "is too large"),
    }
    for name, (kw, message) in cases.items():
        d = tmp_path / name
        d.mkdir()
        write_safetensors(d / "model.safetensors", {"w": a}, **kw)
        with pytest.raises(RuntimeError, match=message) as err:
            _core.WeightStore(str(d))
        assert "model.safetensors" in str(err.value)

    for name, blob, message in [
        ("tiny", b"\x01\x02", "truncated: 2 bytes"),
        ("huge_header", struct.pack("<Q", 1 << 40) + b"{}", "exceeds the 100 MB limit"),
        ("short_header", struct.pack("<Q", 100) + b"{}", "truncated: the header says 100 bytes"),
        ("bad_json", struct.pack("<Q", 5) + b"{abc}", "bad JSON at byte"),
    ]:
        d = tmp_path / name
        d.mkdir()
        (d / "model.safetensors").write_bytes(blob)
        with pytest.raises(RuntimeError, match=message):
            _core.WeightStore(str(d))

    d = tmp_path / "index_lies"
    d.mkdir()
    write_safetensors(d / "shard.safetensors", {"w": a})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "shard.safetensors"}}))
    with pytest.raises(RuntimeError, match="lists tensor 'x' in shard.safetensors, which does not contain it"):
        _core.WeightStore(str(d))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "missing.safetensors"}}))
    with pytest.raises(RuntimeError, match="missing.safetensors: cannot open"):
        _core.WeightStore(str(d))
