"""The gRPC server (grpc.aio) of flashpage.v1, beside the standard health service and server
reflection, over the same AsyncLLMEngine as the HTTP server. It runs its own event loop in a
thread of its own. The same per-request limits as HTTP (serving.limits); text is tokenized on
the engine's CPU workers, off this loop; a client's request_id is a label echoed back, never
the engine's key. The port is bound exclusively (no SO_REUSEPORT: a second server on the same
port fails to start instead of sharing the calls)."""

from __future__ import annotations

import asyncio
import hmac
import threading
import uuid

from flashpage.serving.limits import LimitExceeded, RequestLimits

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from flashpage.sampling_params import SamplingParams
from flashpage.structured_outputs import StructuredOutputsParams
from flashpage.serving.async_engine import AsyncLLMEngine, EngineOverloaded, EngineUnavailable
from flashpage.serving.v1 import flashpage_pb2 as pb
from flashpage.serving.v1 import flashpage_pb2_grpc as pb_grpc
from flashpage.tokenizer import Tokenizer

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
_FINISH = {None: pb.FINISH_REASON_UNSPECIFIED, "stop": pb.FINISH_REASON_STOP, "length": pb.FINISH_REASON_LENGTH,
           "abort": pb.FINISH_REASON_ABORT}
_OPTIONAL = ("n", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed", "max_tokens", "logprobs", "skip_special_tokens")


def structured_outputs(p: pb.SamplingParams) -> StructuredOutputsParams | None:
    if not p.HasField("structured_outputs"):
        return None
    so = p.structured_outputs
    which = so.WhichOneof("constraint")
    if which is None:
        raise ValueError("structured_outputs: set one of json, regex, choice, grammar, json_object")
    value = list(so.choice.choices) if which == "choice" else getattr(so, which)
    return StructuredOutputsParams(**{which: value}, disable_any_whitespace=so.disable_any_whitespace)


def sampling_params(p: pb.SamplingParams) -> SamplingParams:
    """The request's parameters; unset optional fields keep vLLM's defaults."""
    given = {f: getattr(p, f) for f in _OPTIONAL if p.HasField(f)}
    return SamplingParams(stop=list(p.stop), stop_token_ids=list(p.stop_token_ids),
                          include_stop_str_in_output=p.include_stop_str_in_output, ignore_eos=p.ignore_eos,
                          min_tokens=p.min_tokens, structured_outputs=structured_outputs(p), **given)


class _Auth(grpc.aio.ServerInterceptor):
    """The API key in the `authorization: Bearer ...` metadata; health and reflection are open."""

    def __init__(self, api_key: str) -> None:
        self.expected = f"Bearer {api_key}".encode()

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API key (authorization: Bearer ...)")
        self.deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self.deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE}/"):
            return await continuation(details)
        given = dict(details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(given.encode(), self.expected):
            return await continuation(details)
        return self.deny_stream if details.method.endswith("/Generate") else self.deny_unary


class GenerationServicer(pb_grpc.GenerationServicer):
    def __init__(self, engine: AsyncLLMEngine, tokenizer: Tokenizer | None, model_name: str,
                 limits: RequestLimits) -> None:
        self.engine, self.tokenizer, self.model_name, self.limits = engine, tokenizer, model_name, limits

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        which = request.WhichOneof("prompt")
        if which is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: set text or token_ids")
        if which == "text" and self.tokenizer is None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt: this server has no tokenizer; send token_ids")
        try:
            params = sampling_params(request.params)
            self.limits.check_params(params)
            if which == "text":
                self.limits.check_text("prompt.text", request.text)
                ids = await self.engine.run_cpu(self.tokenizer.encode, request.text)
                prompt = {"prompt": request.text, "prompt_token_ids": ids}
            else:
                prompt = {"prompt_token_ids": list(request.token_ids.ids)}
            if params.structured_outputs is not None:  # compiled off this loop, cached for the engine
                await asyncio.wrap_future(self.engine.engine.compile_structured(params.structured_outputs))
        except (LimitExceeded, ValueError) as e:  # GrammarError is a ValueError naming structured_outputs
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        rid = request.request_id or f"grpc-{uuid.uuid4().hex}"  # the client's label, echoed back
        prompt_tokens = completion = 0
        stream = self.engine.generate(prompt, params, request_id=rid, priority=request.priority)
        try:
            async for out in stream:
                prompt_tokens = len(out.prompt_token_ids)
                for c in out.outputs:
                    completion += len(c.token_ids)
                    if not (c.text or c.token_ids or c.finish_reason):
                        continue
                    msg = pb.GenerateResponse(request_id=rid, index=c.index, token_ids=c.token_ids, text=c.text,
                                              finish_reason=_FINISH[c.finish_reason],
                                              stop_reason="" if c.stop_reason is None else str(c.stop_reason))
                    for tok, entry in zip(c.token_ids, c.logprobs or []):
                        msg.logprobs.append(pb.Logprobs(
                            chosen=self._logprob(tok, entry[tok]),
                            top=[self._logprob(t, lp) for t, lp in sorted(entry.items(), key=lambda x: x[1].rank or 0)]))
                    if out.finished:
                        msg.usage.CopyFrom(pb.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion))
                    yield msg
        except EngineOverloaded as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        except EngineUnavailable as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ValueError as e:  # refused by the engine: the message names the field or limit
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        finally:
            await stream.aclose()  # a cancelled call: abort the request now

    def _logprob(self, token: int, lp) -> pb.TokenLogprob:
        return pb.TokenLogprob(token_id=token, logprob=lp.logprob, rank=lp.rank or 0, text=lp.decoded_token or "")

    async def Tokenize(self, request: pb.TokenizeRequest, context):
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server has no tokenizer")
        try:
            self.limits.check_text("text", request.text)
        except LimitExceeded as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        ids = await self.engine.run_cpu(self.tokenizer.encode, request.text, request.add_special_tokens)
        return pb.TokenizeResponse(token_ids=ids)

    async def Detokenize(self, request: pb.DetokenizeRequest, context):
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server has no tokenizer")
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in request.token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"token_ids: {bad} is outside the vocabulary [0, {vocab})")
        text = await self.engine.run_cpu(self.tokenizer.decode, list(request.token_ids), request.skip_special_tokens)
        return pb.DetokenizeResponse(text=text)

    async def GetModelInfo(self, request, context):
        info = self.engine.engine.core.info
        return pb.ModelInfo(model_name=self.model_name, model_type=info["model_type"], dtype=info["dtype"],
                            vocab_size=int(info["vocab_size"]), max_model_len=self.limits.max_model_len,
                            eos_token_ids=self.engine.engine.eos_token_ids, bos_token_id=int(info["bos_token_id"]))


class GrpcServer:
    """The server and its event-loop thread; stop() drains for up to `grace` seconds."""

    def __init__(self, engine: AsyncLLMEngine, tokenizer: Tokenizer | None, *, model_name: str,
                 limits: RequestLimits, host: str, port: int, api_key: str | None) -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.port = port
        self._thread = threading.Thread(target=self._run, args=(engine, tokenizer, model_name, limits,
                                                                host, port, api_key),
                                        name="flashpage-grpc", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"the gRPC server did not start on {host}:{port}: {self._error}")

    def _run(self, engine, tokenizer, model_name, limits, host, port, api_key) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._start(engine, tokenizer, model_name, limits, host, port, api_key))
        except BaseException as e:  # noqa: BLE001 - reported to the starting thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()  # until stop()

    async def _start(self, engine, tokenizer, model_name, limits, host, port, api_key) -> None:
        self.server = grpc.aio.server(interceptors=[_Auth(api_key)] if api_key else [],
                                      options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_GenerationServicer_to_server(
            GenerationServicer(engine, tokenizer, model_name, limits), self.server)
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                                             reflection.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise RuntimeError("cannot bind")
        await self.server.start()
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)

    def set_not_serving(self) -> None:
        """Health: NOT_SERVING (draining); calls still answer, new ones with UNAVAILABLE."""
        asyncio.run_coroutine_threadsafe(self.health.enter_graceful_shutdown(), self.loop).result()

    def stop(self, grace: float = 10.0) -> None:
        async def _stop():
            await self.health.enter_graceful_shutdown()  # health: NOT_SERVING while draining
            await self.server.stop(grace)
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()


def start_grpc(engine: AsyncLLMEngine, tokenizer: Tokenizer | None, **kw) -> GrpcServer:
    return GrpcServer(engine, tokenizer, **kw)
