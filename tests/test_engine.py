"""The Engine and LLM front doors: loading errors that name the file, tensor and problem; the
dummy load format; request validation; the C++ sampler's seeded reproducibility."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from flashpage import LLM, RequestRejected, SamplingParams, _core
from model_fixtures import STORIES, make_checkpoint

TINY_110M_LIKE = {"model_type": "llama", "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 500,
                  "max_position_embeddings": 256, "torch_dtype": "bfloat16"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_checkpoint("llama_gqa", str(tmp_path_factory.mktemp("ckpt")))


def edited_copy(src: str, dst, edit) -> str:
    """A copy of checkpoint `src` whose tensors went through edit(dict) -> dict."""
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    tensors = edit(load_file(os.path.join(src, "model.safetensors")))
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    return str(dst)


def small(path: str, **kw) -> _core.Engine:
    return _core.Engine(path, kv_cache_bytes=8 << 20, max_num_seqs=8, **kw)


def test_missing_tensor_is_named(ckpt, tmp_path):
    def drop(t):
        del t["model.layers.1.mlp.up_proj.weight"]
        return t
    with pytest.raises(RuntimeError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        small(edited_copy(ckpt, tmp_path / "m", drop))


def test_wrong_shape_is_named_with_both_shapes(ckpt, tmp_path):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:16]
        return t
    with pytest.raises(RuntimeError, match=r"k_proj\.weight.*\[16, 64\].*\[32, 64\]|k_proj\.weight.*\[32, 64\].*\[16, 64\]"):
        small(edited_copy(ckpt, tmp_path / "m", shrink))


def test_non_float_tensor_is_refused_by_dtype(ckpt, tmp_path):
    def to_int(t):
        t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)
        return t
    with pytest.raises(RuntimeError, match=r"model\.norm\.weight.*I32"):
        small(edited_copy(ckpt, tmp_path / "m", to_int))


def test_missing_and_truncated_files(ckpt, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RuntimeError, match="config.json"):
        small(str(empty))
    shutil.copytree(ckpt, tmp_path / "trunc")
    st = tmp_path / "trunc" / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(RuntimeError, match="model.safetensors"):
        small(str(tmp_path / "trunc"))
    os.remove(st)
    with pytest.raises(RuntimeError, match="model.safetensors"):
        small(str(tmp_path / "trunc"))


def test_bad_options_are_refused_by_name(ckpt):
    with pytest.raises(ValueError, match='dtype "float8"'):
        small(ckpt, dtype="float8")
    with pytest.raises(ValueError, match='load_format "pt" is not supported'):
        small(ckpt, load_format="pt")
    with pytest.raises(RuntimeError, match="ckpt0: not a regular file"):
        small(ckpt, load_format="gguf")  # a directory is not a GGUF file
    with pytest.raises(ValueError, match="max_model_len=4096 exceeds the model's max_position_embeddings=256"):
        small(ckpt, max_model_len=4096)
    with pytest.raises(RuntimeError, match=r"KV cache too small: .* max_model_len=256 needs 16 blocks"):
        _core.Engine(ckpt, kv_cache_bytes=4096)


def test_request_validation(ckpt):
    e = small(ckpt, max_model_len=64)
    with pytest.raises(RequestRejected, match="token id 320 at position 1 is outside the vocabulary"):
        e.add_request(np.array([1, 320], np.int32))
    with pytest.raises(RequestRejected):
        e.add_request(np.arange(100, dtype=np.int32) % 300)  # longer than max_model_len
    with pytest.raises(ValueError, match="top_p must be in"):
        e.add_request(np.array([1, 2], np.int32), top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not e.has_unfinished  # nothing half-added


def test_dummy_load_format_from_a_config_only_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_110M_LIKE))
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a = LLM(str(tmp_path), load_format="dummy", kv_cache_memory_bytes=8 << 20)
    b = LLM(str(tmp_path), load_format="dummy", kv_cache_memory_bytes=8 << 20)
    assert a.model_info["dtype"] == "bfloat16" and a.model_info["weight_bytes_mapped"] == 0
    assert a.get_tokenizer() is None
    outs = a.generate([{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4, 5]}], sp)
    assert [len(o.outputs[0].token_ids) for o in outs] == [8, 8]
    assert outs[0].outputs[0].token_ids == b.generate({"prompt_token_ids": [1, 2, 3]}, sp)[0].outputs[0].token_ids
    with pytest.raises(RuntimeError, match="model.safetensors"):
        LLM(str(tmp_path))  # not dummy: the weights are missing


@pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
def test_seeded_sampling_is_reproducible_and_batch_independent():
    llm = LLM(STORIES, kv_cache_memory_bytes=64 << 20)
    seeded = SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=1234, max_tokens=24)
    alone = llm.generate("Once upon a time", seeded)[0].outputs[0].token_ids
    crowd = llm.generate(["The dog", "Once upon a time", "A fish"],
                         [SamplingParams(temperature=1.0, max_tokens=30), seeded,
                          SamplingParams(temperature=0.5, seed=7, max_tokens=10)])
    assert crowd[1].outputs[0].token_ids == alone
    greedy = llm.generate("Once upon a time", SamplingParams(temperature=0, max_tokens=24))[0]
    top1 = llm.generate("Once upon a time", SamplingParams(temperature=1.5, top_k=1, max_tokens=24))[0]
    tiny_p = llm.generate("Once upon a time", SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=24))[0]
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids == tiny_p.outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=24)
    texts = {tuple(llm.generate("Once upon a time", unseeded)[0].outputs[0].token_ids) for _ in range(4)}
    assert len(texts) > 1  # unseeded requests differ


def test_engine_generate_and_abort_leave_no_blocks(ckpt):
    e = small(ckpt)
    ids = [e.add_request(np.array([1, 2, 3, 4], np.int32), temperature=0.0, max_tokens=50, ignore_eos=True)
           for _ in range(3)]
    e.step()
    assert e.abort_request(ids[1])
    while e.has_unfinished:
        e.step()
    assert e.scheduler.stats()["used_blocks"] == 0


def test_compute_dtype_option(tmp_path):
    """bf16 weights compute in bf16 where the CPU has bf16 dot products, unless float32 is asked
    for; float32 weights always compute in float32; impossible choices are refused by name."""
    (tmp_path / "config.json").write_text(json.dumps(TINY_110M_LIKE))
    bf16_dot = _core.cpu_best_isa() in ("avx512_bf16", "amx") and _core.cpu_isa() == _core.cpu_best_isa()
    auto = LLM(str(tmp_path), load_format="dummy", kv_cache_memory_bytes=8 << 20, verbose=False)
    assert auto.model_info["compute_dtype"] == ("bfloat16" if bf16_dot else "float32")
    fp32 = LLM(str(tmp_path), load_format="dummy", compute_dtype="float32", kv_cache_memory_bytes=8 << 20,
               verbose=False)
    assert fp32.model_info["compute_dtype"] == "float32"
    assert fp32.model_info["isa"] in ("avx2", "avx512", "scalar")
    wide = LLM(str(tmp_path), load_format="dummy", dtype="float32", kv_cache_memory_bytes=8 << 20, verbose=False)
    assert wide.model_info["compute_dtype"] == "float32"
    with pytest.raises(ValueError, match="needs bf16 weights"):
        LLM(str(tmp_path), load_format="dummy", dtype="float32", compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="compute_dtype"):
        LLM(str(tmp_path), load_format="dummy", compute_dtype="int3")
    if bf16_dot:
        # Both give sensible greedy text of the same length; bf16 arithmetic may pick other tokens.
        sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        for llm in (auto, fp32):
            assert len(llm.generate({"prompt_token_ids": [1, 2, 3]}, sp)[0].outputs[0].token_ids) == 4


def test_logits_come_out_in_place_through_dlpack(ckpt):
    """Engine.execute hands out the runner's own logits buffer (DLPack, no copy): torch and numpy
    see the same memory, which the next step overwrites."""
    torch = pytest.importorskip("torch")
    e = small(ckpt)
    sched = e.scheduler
    sched.add_request(1, np.array([1, 2, 3, 4, 5], np.int32), max_tokens=4, ignore_eos=True)
    step = sched.schedule()
    out = e.execute(step)
    assert out.__dlpack_device__() == (1, 0) and out.shape == (1, e.info["vocab_size"])
    t, a = torch.from_dlpack(out), np.from_dlpack(out)
    assert t.dtype == torch.float32 and tuple(t.shape) == out.shape
    assert t.data_ptr() == a.ctypes.data
    first = t.clone()
    assert np.isfinite(a).all()
    sched.update(np.array([int(first.argmax())], np.int32))
    e.execute(sched.schedule())
    assert not torch.equal(t, first)  # the same buffer, now holding the next step's logits
    with pytest.raises(BufferError, match="copy=True"):
        out.__dlpack__(copy=True)
    with pytest.raises(BufferError, match="another device"):
        out.__dlpack__(dl_device=(2, 0))
