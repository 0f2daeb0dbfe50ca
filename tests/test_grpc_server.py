"""The gRPC server with stubs generated from the proto: streaming Generate equal to the
offline API, Tokenize/Detokenize/GetModelInfo, health and reflection, status codes, a
cancelled call that leaves no blocks, and stubs that match the proto."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

grpc = pytest.importorskip("grpc")

from flashpage import LLM, SamplingParams  # noqa: E402
from flashpage.serving.server import start  # noqa: E402
from flashpage.serving.v1 import flashpage_pb2 as pb  # noqa: E402
from flashpage.serving.v1 import flashpage_pb2_grpc as pb_grpc  # noqa: E402
from model_fixtures import STORIES  # noqa: E402
from test_openai_server import KEY, _args, _free_port, _idle_and_empty  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
AUTH = (("authorization", f"Bearer {KEY}"),)
PYTHON_DIR = os.path.join(os.path.dirname(__file__), "..", "python")


@pytest.fixture(scope="module")
def server():
    llm = LLM(STORIES, kv_cache_memory_bytes=64 << 20, max_model_len=256, verbose=False)
    args = _args(STORIES, grpc_port=_free_port())
    servers = start(args, llm)
    channel = grpc.insecure_channel(f"127.0.0.1:{servers.grpc.port}")
    yield servers, pb_grpc.GenerationStub(channel), channel
    channel.close()
    servers.stop(drain_seconds=2)


def test_generate_streams_the_offline_text(server):
    _, stub, _ = server
    want = LLM(STORIES, kv_cache_memory_bytes=16 << 20, verbose=False).generate(
        "Once upon a time", SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
    req = pb.GenerateRequest(text="Once upon a time", params=pb.SamplingParams(temperature=0, max_tokens=24, logprobs=2))
    msgs = list(stub.Generate(req, metadata=AUTH, timeout=60))
    assert "".join(m.text for m in msgs) == want.text
    assert [t for m in msgs for t in m.token_ids] == want.token_ids
    assert msgs[-1].finish_reason == pb.FINISH_REASON_LENGTH and msgs[-1].usage.completion_tokens == 24
    assert msgs[-1].usage.prompt_tokens == 5
    lps = [lp for m in msgs for lp in m.logprobs]
    assert len(lps) == 24 and all(lp.chosen.rank == 1 and len(lp.top) >= 2 for lp in lps)
    ids = list(stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 403, 407, 261, 378]),
                                                params=pb.SamplingParams(temperature=0, max_tokens=24)),
                             metadata=AUTH))
    assert "".join(m.text for m in ids) == want.text


def test_tokenize_detokenize_model_info(server):
    _, stub, _ = server
    ids = stub.Tokenize(pb.TokenizeRequest(text="Once upon a time", add_special_tokens=True), metadata=AUTH).token_ids
    assert list(ids) == [1, 403, 407, 261, 378]
    text = stub.Detokenize(pb.DetokenizeRequest(token_ids=ids, skip_special_tokens=True), metadata=AUTH).text
    assert text == "Once upon a time"
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=AUTH)
    assert info.model_name == "stories" and info.vocab_size == 512 and info.max_model_len == 256
    assert list(info.eos_token_ids) == [2] and info.model_type == "llama"
    with pytest.raises(grpc.RpcError) as e:
        stub.Detokenize(pb.DetokenizeRequest(token_ids=[100000]), metadata=AUTH)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_ids" in e.value.details()


def test_health_and_reflection(server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    _, _, channel = server
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", "flashpage.v1.Generation"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    [resp] = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"flashpage.v1.Generation", "grpc.health.v1.Health"} <= names


@pytest.mark.parametrize("req,code,needle", [
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(top_p=0)), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (pb.GenerateRequest(text="x", params=pb.SamplingParams(max_tokens=0)), grpc.StatusCode.INVALID_ARGUMENT,
     "max_tokens"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 9999])), grpc.StatusCode.INVALID_ARGUMENT, "vocabulary"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[5] * 300)), grpc.StatusCode.INVALID_ARGUMENT, "max_model_len"),
    (pb.GenerateRequest(params=pb.SamplingParams()), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
])
def test_bad_requests_get_invalid_argument(server, req, code, needle):
    _, stub, _ = server
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req, metadata=AUTH, timeout=30))
    assert e.value.code() == code and needle in e.value.details(), e.value.details()


def test_auth_overload_and_cancel(server):
    servers, stub, _ = server
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="x")))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    servers.engine.max_waiting_requests, servers.engine._waiting = 1, 1
    try:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.Generate(pb.GenerateRequest(text="x"), metadata=AUTH))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        servers.engine.max_waiting_requests, servers.engine._waiting = 1024, 0
    call = stub.Generate(pb.GenerateRequest(text="Once upon a time", params=pb.SamplingParams(
        temperature=0, max_tokens=200, ignore_eos=True)), metadata=AUTH)
    for i, _ in enumerate(call):
        if i == 2:
            call.cancel()
            break
    assert _idle_and_empty(servers)
    time.sleep(0.1)
    assert servers.engine.engine.scheduler.stats()["used_blocks"] == 0


def _normalized(text: str) -> str:
    """Generated code without the lines that name generator versions."""
    text = re.sub(r"# Protobuf Python Version: .*", "", text)
    text = re.sub(r"_runtime_version\.ValidateProtobufRuntimeVersion\([^)]*\)", "", text, flags=re.S)
    return re.sub(r"GRPC_GENERATED_VERSION = '.*'", "", text)


def test_committed_stubs_match_the_proto(tmp_path):
    pytest.importorskip("grpc_tools")
    proto = "flashpage/serving/v1/flashpage.proto"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PYTHON_DIR}", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", os.path.join(PYTHON_DIR, proto)],
                   check=True)
    for name in ("flashpage_pb2.py", "flashpage_pb2.pyi", "flashpage_pb2_grpc.py"):
        fresh = (tmp_path / "flashpage/serving/v1" / name).read_text()
        committed = open(os.path.join(PYTHON_DIR, "flashpage/serving/v1", name)).read()
        assert _normalized(fresh) == _normalized(committed), f"{name} is stale: regenerate it (see the proto's header)"


def test_structured_outputs_over_grpc(server):
    pytest.importorskip("llguidance")
    _, stub, _ = server
    choices = pb.SamplingParams(temperature=1.0, seed=4, max_tokens=20, structured_outputs=pb.StructuredOutputs(
        choice=pb.Choices(choices=["red ball", "blue kite"])))
    msgs = list(stub.Generate(pb.GenerateRequest(text="Once upon a time", params=choices), metadata=AUTH, timeout=60))
    assert "".join(m.text for m in msgs) in ("red ball", "blue kite")
    regex = pb.SamplingParams(max_tokens=20, structured_outputs=pb.StructuredOutputs(regex=r"[0-9]{2}-[a-z]{3}"))
    msgs = list(stub.Generate(pb.GenerateRequest(text="Once upon a time", params=regex), metadata=AUTH, timeout=60))
    assert re.fullmatch(r"[0-9]{2}-[a-z]{3}", "".join(m.text for m in msgs))
    schema = json.dumps({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
                         "required": ["n"], "additionalProperties": False})
    js = pb.SamplingParams(max_tokens=30, structured_outputs=pb.StructuredOutputs(json=schema,
                                                                                   disable_any_whitespace=True))
    msgs = list(stub.Generate(pb.GenerateRequest(text="Once upon a time", params=js), metadata=AUTH, timeout=60))
    assert 0 <= json.loads("".join(m.text for m in msgs))["n"] <= 9
    bad = pb.SamplingParams(structured_outputs=pb.StructuredOutputs(regex="a(b"))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(text="Once", params=bad), metadata=AUTH, timeout=60))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "structured_outputs.regex" in e.value.details()
