"""The OpenAI-compatible HTTP server (FastAPI): /v1/completions, /v1/chat/completions (with
the model's chat template), /v1/models, /health, /metrics. Streams are server-sent events
ending in `data: [DONE]`, with a usage chunk when stream_options.include_usage; errors use
OpenAI's error body ({"error": {"message", "type", "param", "code"}})."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from flashpage.chat_template import ChatTemplateError
from flashpage.outputs import RequestOutput
from flashpage.serving.async_engine import AsyncLLMEngine, EngineOverloaded, EngineUnavailable
from flashpage.serving.protocol import ChatCompletionRequest, CompletionRequest
from flashpage.tokenizer import Tokenizer


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status)


class _Guard:
    """ASGI middleware (plain ASGI: it must not get between a stream and its disconnect): the
    API key on /v1, and bodies over max_bytes refused with 413 before anything parses them."""

    def __init__(self, app, max_bytes: int, api_key: str | None) -> None:
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_key and scope["path"].startswith("/v1"):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, f"Bearer {self.api_key}".encode()):
                return await ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                      type_="authentication_error", code="invalid_api_key").response()(scope, receive, send)
        length = headers.get(b"content-length")
        too_big = ApiError(413, f"request body exceeds the limit of {self.max_bytes} bytes", code="body_too_large")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_big.response()(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, too_big.message, code="body_too_large")
            return message
        try:
            await self.app(scope, limited, send)
        except ApiError as e:  # a chunked body that grew past the limit
            await e.response()(scope, receive, send)


def build_app(engine: AsyncLLMEngine, tokenizer: Tokenizer | None, *, model_name: str, max_model_len: int,
              api_key: str | None = None, max_tokens_limit: int | None = None,
              max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="flashpage", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return ApiError(400, f"the body is not valid JSON: {first.get('msg')}", code="invalid_json").response()
        where = ".".join(loc) or "body"
        return ApiError(400, f"{where}: {first.get('msg', 'invalid value')}", param=where or None).response()

    @app.get("/health")
    async def health():
        if not engine.is_running:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "flashpage", "max_model_len": max_model_len}]}

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def check_lengths(prompt_len: int, max_tokens: int | None) -> int:
        if max_tokens is not None and max_tokens < 1:
            raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if max_tokens_limit is not None and max_tokens is not None and max_tokens > max_tokens_limit:
            raise ApiError(400, f"max_tokens={max_tokens} exceeds this server's limit of {max_tokens_limit}",
                           param="max_tokens")
        want = max_tokens if max_tokens is not None else 0
        if prompt_len + want > max_model_len or prompt_len >= max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                f"requested {prompt_len + want} tokens ({prompt_len} in the prompt, {want} in the "
                                f"completion). Please reduce the length of the prompt or completion.",
                           param="max_tokens" if max_tokens else "prompt", code="context_length_exceeded")
        return max_tokens if max_tokens is not None else max_model_len - prompt_len

    def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ApiError(400, "this server has no tokenizer: send token ids", param="prompt")
            return tokenizer.encode(prompt)
        return list(prompt)

    def params_of(body, max_tokens: int, logprobs: int | None):
        try:
            return body.sampling_params(max_tokens, logprobs)
        except ValueError as e:
            field = str(e).split(" ", 1)[0]
            raise ApiError(400, str(e), param=field) from None

    async def run(prompt_ids: list[int], params, text: str | None) -> AsyncIterator[RequestOutput]:
        try:
            async for out in engine.generate({"prompt": text, "prompt_token_ids": prompt_ids}, params):
                yield out
        except EngineOverloaded as e:
            raise ApiError(429, str(e), type_="rate_limit_error", code="overloaded") from None
        except EngineUnavailable as e:
            raise ApiError(503, str(e), type_="server_error", code="unavailable") from None
        except ValueError as e:
            raise ApiError(400, str(e)) from None

    async def first_then_rest(gen: AsyncIterator[RequestOutput]):
        """Waits for the first delta so that a refused request becomes an HTTP error, not a
        broken stream."""
        try:
            first = await gen.__anext__()
        except StopAsyncIteration:
            raise ApiError(500, "the request ended without output", type_="server_error") from None

        async def chain():
            try:
                yield first
                async for x in gen:
                    yield x
            finally:
                await gen.aclose()  # a client that went away: abort the request now
        return chain()

    # ---- /v1/completions -------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        check_model(body.model)
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ApiError(400, "prompt must not be empty", param="prompt")
        ids = [encode(x) for x in prompts]
        max_tokens = [check_lengths(len(i), body.max_tokens) for i in ids]
        params = [params_of(body, m, body.logprobs) for m in max_tokens]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = list(await asyncio.gather(*(first_then_rest(run(i, sp, x if isinstance(x, str) else None))
                                              for i, sp, x in zip(ids, params, prompts))))
        n = body.n

        def choice(k: int, c) -> dict:
            return {"index": k * n + c.index, "text": c.text, "logprobs": _completion_logprobs(c),
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

        if body.stream:
            async def sse():
                usage = _Usage()
                try:
                    for k, gen in enumerate(streams):
                        async for out in gen:
                            usage.add(out)
                            for c in out.outputs:
                                if c.text or c.finish_reason or c.token_ids:
                                    yield _sse({"id": rid, "object": "text_completion", "created": created,
                                                "model": model_name, "choices": [choice(k, c)]})
                finally:
                    for gen in streams:
                        await gen.aclose()
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                "choices": [], "usage": usage.dict()})
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        usage = _Usage()
        choices = []
        for k, gen in enumerate(streams):
            final = await _collect(gen, usage)
            choices += [choice(k, c) for c in final.outputs]
            if body.echo:
                for ch in choices[-n:]:
                    ch["text"] = (prompts[k] if isinstance(prompts[k], str) else "") + ch["text"]
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage.dict()}

    # ---- /v1/chat/completions --------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        check_model(body.model)
        if tokenizer is None:
            raise ApiError(400, "this server has no tokenizer, so no chat template", param="messages")
        try:
            text = tokenizer.apply_chat_template(body.plain_messages(), add_generation_prompt=body.add_generation_prompt,
                                                 tools=body.tools, **(body.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="messages") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
        max_tokens = check_lengths(len(ids), body.max_completion_tokens or body.max_tokens)
        k = (body.top_logprobs or 0) if body.logprobs else None
        params = params_of(body, max_tokens, k)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        gen = await first_then_rest(run(ids, params, text))
        want_lp = body.logprobs

        if body.stream:
            async def sse():
                usage = _Usage()
                head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
                for i in range(body.n):
                    yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                try:
                    async for out in gen:
                        usage.add(out)
                        for c in out.outputs:
                            if c.text or c.finish_reason or c.token_ids:
                                yield _sse({**head, "choices": [{
                                    "index": c.index, "delta": {"content": c.text} if c.text else {},
                                    "logprobs": _chat_logprobs(c) if want_lp else None,
                                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}]})
                finally:
                    await gen.aclose()  # a client that went away: abort the request now
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage.dict()})
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        usage = _Usage()
        final = await _collect(gen, usage)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                             "logprobs": _chat_logprobs(c) if want_lp else None,
                             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                            for c in final.outputs],
                "usage": usage.dict()}

    return _Guard(app, max_body_bytes, api_key)  # type: ignore[return-value]


class _Usage:
    def __init__(self) -> None:
        self.prompt: dict[str, int] = {}
        self.completion = 0

    def add(self, out: RequestOutput) -> None:
        self.prompt[out.request_id] = len(out.prompt_token_ids)
        self.completion += sum(len(c.token_ids) for c in out.outputs)

    def dict(self) -> dict[str, int]:
        p = sum(self.prompt.values())
        return {"prompt_tokens": p, "completion_tokens": self.completion, "total_tokens": p + self.completion}


async def _collect(gen: AsyncIterator[RequestOutput], usage: _Usage) -> RequestOutput:
    """Joins a request's deltas into its final output."""
    try:
        final = await _join(gen, usage)
    finally:
        await gen.aclose()  # cancelled (the client went away): abort the request now
    assert final is not None
    return final


async def _join(gen: AsyncIterator[RequestOutput], usage: _Usage) -> RequestOutput | None:
    final: RequestOutput | None = None
    async for out in gen:
        usage.add(out)
        if final is None:
            final = out
            continue
        for acc, c in zip(final.outputs, out.outputs):
            acc.text += c.text
            acc.token_ids += c.token_ids
            if acc.logprobs is not None and c.logprobs is not None:
                acc.logprobs += c.logprobs
            acc.finish_reason, acc.stop_reason, acc.cumulative_logprob = c.finish_reason, c.stop_reason, c.cumulative_logprob
    return final


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _token_text(token: int, lp) -> str:
    """The token's text as the engine decoded it for its Logprob (its id without a tokenizer)."""
    return lp.decoded_token if lp.decoded_token is not None else str(token)


def _completion_logprobs(c) -> dict | None:
    if c.logprobs is None:
        return None
    tokens, lps, tops = [], [], []
    for tok, entry in zip(c.token_ids, c.logprobs):
        tokens.append(_token_text(tok, entry[tok]))
        lps.append(entry[tok].logprob)
        tops.append({_token_text(t, lp): lp.logprob for t, lp in entry.items() if t != tok or len(entry) == 1})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": []}


def _chat_logprobs(c) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for tok, entry in zip(c.token_ids, c.logprobs):
        text = _token_text(tok, entry[tok])
        top = sorted(((lp.rank or 0, t, lp) for t, lp in entry.items() if t != tok or lp.rank == 1))
        content.append({"token": text, "logprob": entry[tok].logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": _token_text(t, lp), "logprob": lp.logprob,
                                          "bytes": list(_token_text(t, lp).encode())} for _, t, lp in top]})
    return {"content": content}
