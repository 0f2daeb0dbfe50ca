"""The engine's options in one place (flashpage.engine_args.EngineArgs): LLM(...) keywords,
`flashpage serve` / `flashpage generate` flags and the core binding all come from it, and vLLM's
scheduling_policy="priority" works from every front door (LLM, serve, OpenAI's extra `priority`
field, gRPC)."""

from __future__ import annotations

import argparse
import os

import pytest

from flashpage import _core

from flashpage import LLM, SamplingParams
from flashpage.engine_args import EngineArgs
from model_fixtures import STORIES

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")


def _parser(command: str) -> argparse.ArgumentParser:
    from flashpage import cli

    captured = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, argv=None, namespace=None):
        captured["parser"] = self
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            cli.main([command])
    finally:
        argparse.ArgumentParser.parse_args = real
    sub = next(a for a in captured["parser"]._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_every_engine_option_is_a_flag_of_both_commands(command):
    dests = {a.dest for a in _parser(command)._actions}
    if "model_flag" in dests:  # --model (and a positional the command reads itself)
        dests.add("model")
    missing = [n for n in EngineArgs.names() if n not in dests]
    assert not missing, f"flashpage {command} lacks flags for {missing}"


def test_the_cli_reaches_llm_with_every_option(monkeypatch):
    from flashpage.serving import server

    seen = {}

    class FakeLLM:
        def __init__(self, model, **kw):
            seen.update(kw, model=model)
    monkeypatch.setattr("flashpage.llm.LLM", FakeLLM)
    ns = _parser("serve").parse_args([STORIES, "--scheduling-policy", "priority", "--max-num-seqs", "7",
                                      "--no-enable-prefix-caching", "--quiet", "--kv-cache-memory-bytes", "123"])
    server.build_llm(ns)
    assert seen["model"] == STORIES and seen["scheduling_policy"] == "priority" and seen["max_num_seqs"] == 7
    assert seen["enable_prefix_caching"] is False and seen["verbose"] is False
    assert seen["kv_cache_memory_bytes"] == 123
    assert set(seen) == set(EngineArgs.names())


def test_unknown_and_impossible_options_are_refused():
    with pytest.raises(TypeError, match="'tensor_parallel'.*scheduling_policy"):
        LLM(STORIES, tensor_parallel=2)
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority"):
        LLM(STORIES, scheduling_policy="lifo")
    if not _core.cuda_info()["available"]:
        with pytest.raises(ValueError, match="device='cuda': the CUDA backend is not available here"):
            LLM(STORIES, device="cuda")
    with pytest.raises(ValueError, match="gpu_memory_utilization must be in"):
        LLM(STORIES, gpu_memory_utilization=1.5)
    assert LLM(STORIES, device="cpu", kv_cache_memory_bytes=16 << 20, verbose=False).engine_args.device == "cpu"


def test_priority_scheduling_from_the_offline_api():
    llm = LLM(STORIES, kv_cache_memory_bytes=16 << 20, scheduling_policy="priority", max_num_seqs=1, verbose=False)
    params = SamplingParams(temperature=0, max_tokens=8)
    outs = llm.generate(["Once upon a time", "The cat"], params, priority=[5, -5], use_tqdm=False)
    alone = LLM(STORIES, kv_cache_memory_bytes=16 << 20, verbose=False)
    assert [o.outputs[0].text for o in outs] == [o.outputs[0].text for o in alone.generate(
        ["Once upon a time", "The cat"], params, use_tqdm=False)]
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        alone.generate(["x"], params, priority=[1], use_tqdm=False)


def test_priority_over_http_and_grpc():
    httpx = pytest.importorskip("httpx")
    grpc = pytest.importorskip("grpc")
    from flashpage.serving.server import start
    from flashpage.serving.v1 import flashpage_pb2 as pb
    from flashpage.serving.v1 import flashpage_pb2_grpc as pb_grpc
    from test_openai_server import _args, _free_port

    for policy in ("priority", "fcfs"):
        llm = LLM(STORIES, kv_cache_memory_bytes=16 << 20, max_model_len=256, scheduling_policy=policy,
                  verbose=False)
        args = _args(STORIES, api_key=None, grpc_port=_free_port())
        servers = start(args, llm)
        try:
            r = httpx.post(f"http://127.0.0.1:{args.port}/v1/completions", timeout=30,
                           json={"prompt": "Once upon a time", "max_tokens": 4, "priority": 3})
            with grpc.insecure_channel(f"127.0.0.1:{servers.grpc.port}") as channel:
                call = pb_grpc.GenerationStub(channel).Generate(pb.GenerateRequest(
                    text="Once", priority=3, params=pb.SamplingParams(max_tokens=4)), timeout=30)
                if policy == "priority":
                    assert r.status_code == 200, r.text
                    assert list(call)[-1].finish_reason == pb.FINISH_REASON_LENGTH
                else:
                    assert r.status_code == 400 and "scheduling-policy priority" in r.json()["error"]["message"]
                    with pytest.raises(grpc.RpcError) as e:
                        list(call)
                    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            servers.stop(drain_seconds=1)


def test_device_auto_is_the_gpu_where_one_runs_the_weights(monkeypatch, tmp_path):
    import json
    import types

    from flashpage import engine_args
    plain, quantized = tmp_path / "plain", tmp_path / "awq"
    plain.mkdir()
    quantized.mkdir()
    (plain / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (quantized / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    for available in (False, True):
        monkeypatch.setattr(engine_args, "_core", types.SimpleNamespace(cuda_info=lambda a=available: {"available": a}))
        gpu = "cuda" if available else "cpu"
        assert EngineArgs(model=str(plain)).resolved_device() == gpu
        assert EngineArgs(model=str(quantized)).resolved_device() == "cpu"  # int8 / 4-bit kernels: the CPU's
        assert EngineArgs(model="m.gguf").resolved_device() == "cpu"
        assert EngineArgs(model="m.gguf", quantization="none").resolved_device() == gpu  # dequantized
        assert EngineArgs(model=str(plain), device="cpu").resolved_device() == "cpu"
