"""Fuzzes the request validation of the gRPC API (flashpage.v1.Generation/Generate): the request
bytes decoded as grpc decodes them (GenerateRequest.FromString), then what Generate does before
any model work: the prompt oneof, grpc_server.sampling_params(request.params), RequestLimits.

Contract: bytes are refused with protobuf's DecodeError or a ValueError (LimitExceeded is one),
nothing else; accepted parameters fit the engine and the C++ core (as in fuzz_http_request).

Inputs, chosen by the first byte: raw GenerateRequest bytes, raw SamplingParams bytes, or a
SamplingParams whose fields are set from the rest of the input (NaN and infinite floats, the
edges of int32/uint32/int64, long stop lists), serialized and decoded again.

    python tests/fuzz/fuzz_grpc_request.py -max_total_time=600 [CORPUS_DIR]"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness  # noqa: E402
import atheris  # noqa: E402

with atheris.instrument_imports(include=["flashpage"]):
    from google.protobuf.message import DecodeError
    from flashpage.serving import grpc_server
    from flashpage.serving.limits import RequestLimits
    from flashpage.serving.v1 import flashpage_pb2 as pb

LIMITS = RequestLimits(max_model_len=2048)
FLOATS = ["temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"]
INTS = {"n": (0, 2**32 - 1), "top_k": (-(2**31), 2**31 - 1), "seed": (-(2**63), 2**63 - 1),
        "max_tokens": (-(2**31), 2**31 - 1), "min_tokens": (-(2**31), 2**31 - 1), "logprobs": (-(2**31), 2**31 - 1)}
EDGE_FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 2.0, 1e-6, 3.4e38, float("nan"), float("inf"), float("-inf")]


@atheris.instrument_func
def check(request) -> None:
    which = request.WhichOneof("prompt")
    try:
        params = grpc_server.sampling_params(request.params)
        LIMITS.check_params(params)
        if which == "text":
            LIMITS.check_text("prompt.text", request.text)
    except ValueError as e:
        _harness.feedback(str(e))
        return
    _harness.check_sampling_params(params, LIMITS)
    assert all(-(2**31) <= t < 2**31 for t in request.token_ids.ids)  # int32 on the wire
    _harness.feedback(f"ok {which} {params.n} {len(params.stop)} {params.logprobs} {params.max_tokens is None}")


@atheris.instrument_func
def structured(fdp: atheris.FuzzedDataProvider) -> bytes:
    p = pb.SamplingParams()
    for name in FLOATS:
        if fdp.ConsumeBool():
            setattr(p, name, fdp.PickValueInList(EDGE_FLOATS) if fdp.ConsumeBool() else fdp.ConsumeFloat())
    for name, (lo, hi) in INTS.items():
        if fdp.ConsumeBool():
            setattr(p, name, fdp.PickValueInList([lo, hi, 0, 1, -1 if lo < 0 else 2, 20, 21, 128, 129])
                    if fdp.ConsumeBool() else fdp.ConsumeIntInRange(lo, hi))
    for _ in range(fdp.ConsumeIntInRange(0, 3) ** 3):  # up to 27 stop strings
        p.stop.append(fdp.ConsumeUnicodeNoSurrogates(fdp.PickValueInList([0, 1, 3, 300])))
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        p.stop_token_ids.append(fdp.ConsumeIntInRange(-(2**31), 2**31 - 1))
    p.include_stop_str_in_output = fdp.ConsumeBool()
    p.ignore_eos = fdp.ConsumeBool()
    if fdp.ConsumeBool():
        p.skip_special_tokens = fdp.ConsumeBool()
    req = pb.GenerateRequest(request_id=fdp.ConsumeUnicodeNoSurrogates(4), params=p,
                             priority=fdp.ConsumeIntInRange(-(2**31), 2**31 - 1))
    if fdp.ConsumeBool():
        req.text = fdp.ConsumeUnicodeNoSurrogates(16)
    else:
        req.token_ids.ids.extend(fdp.ConsumeIntInRange(-(2**31), 2**31 - 1) for _ in range(fdp.ConsumeIntInRange(0, 4)))
    return req.SerializeToString()


@atheris.instrument_func
def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, rest = data[0] % 3, data[1:]
    try:
        if mode == 0:
            request = pb.GenerateRequest.FromString(rest)
        elif mode == 1:
            request = pb.GenerateRequest(params=pb.SamplingParams.FromString(rest), token_ids=pb.TokenIds(ids=[1]))
        else:
            request = pb.GenerateRequest.FromString(structured(atheris.FuzzedDataProvider(rest)))
    except DecodeError as e:
        _harness.feedback("decode " + str(e))
        return
    check(request)


def corpus() -> dict[str, bytes]:
    full = pb.GenerateRequest(request_id="r", text="Once upon a time", priority=1, params=pb.SamplingParams(
        n=2, temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, presence_penalty=0.5, frequency_penalty=-0.5,
        repetition_penalty=1.1, seed=3, stop=["\n"], stop_token_ids=[2], include_stop_str_in_output=True,
        ignore_eos=True, max_tokens=16, min_tokens=1, logprobs=2, skip_special_tokens=False))
    ids = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 2, 3]), params=pb.SamplingParams(max_tokens=4))
    return {"full": b"\x00" + full.SerializeToString(), "ids": b"\x00" + ids.SerializeToString(),
            "params": b"\x01" + full.params.SerializeToString(), "empty": b"\x00",
            **{f"structured-{i}": bytes([2, i, 7, 1, 8, 2, 8, 1, 8, 2, 8]) for i in range(4)}}


if __name__ == "__main__":
    _harness.main(test_one_input, corpus())
