"""The OpenAI-compatible HTTP server (FastAPI): /v1/completions, /v1/chat/completions (with
the model's chat template), /v1/models, /health, /metrics; OpenAI's other routes (embeddings,
audio, ...) are refused by name with a 404. Streams are server-sent events
ending in `data: [DONE]`, with a usage chunk when stream_options.include_usage; errors use
OpenAI's error body ({"error": {"message", "type", "param", "code"}}) whatever goes wrong, and
a stream that fails midway ends with an error event and `[DONE]`.

Nothing slow runs on the event loop: prompts are measured against the limits before any work,
then tokenized and chat templates rendered on the engine's CPU workers. A client that goes
away aborts its request, streamed or not."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashpage.chat_template import RESERVED_KWARGS, ChatTemplateError
from flashpage.detokenizer import IncrementalDetokenizer
from flashpage.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestOutput
from flashpage.serving.async_engine import AsyncLLMEngine, EngineOverloaded, EngineUnavailable
from flashpage.serving.http_guard import Guard, error_dict
from flashpage.serving.limits import LimitExceeded, RequestLimits
from flashpage.serving.protocol import ChatCompletionRequest, CompletionRequest
from flashpage.serving.tool_parsers import ToolCalling, parser_for_template
from flashpage.structured_outputs import GrammarError, StructuredOutputsParams
from flashpage.tokenizer import Tokenizer

log = logging.getLogger("flashpage.serving")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse(error_dict(self.message, self.type, self.code, self.param), status_code=self.status)


def build_app(engine: AsyncLLMEngine, tokenizer: Tokenizer | None, *, model_name: str, limits: RequestLimits,
              chat_template: str | None = None, api_key: str | None = None, max_body_bytes: int = 1 << 20,
              body_timeout: float = 30.0, tool_call_parser: str | None = None) -> Guard:
    """The app behind its Guard (API key, body limits, last-resort errors). chat_template:
    the operator's template, used instead of the model's; requests never bring their own.
    tool_call_parser: how the model writes tool calls (default: what its template says)."""
    app = FastAPI(title="flashpage", docs_url=None, redoc_url=None)
    max_model_len = limits.max_model_len
    tool_parser = tool_call_parser or parser_for_template(
        chat_template or (tokenizer.chat_template if tokenizer is not None else None))
    cache = engine.engine.scheduler.config
    engine.metrics.cache_config(block_size=cache.block_size, num_blocks=cache.num_blocks)

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

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            return _not_found(request.method, request.url.path).response()
        if e.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                            code="method_not_allowed").response()
        # FastAPI's body parser: invalid UTF-8, JSON nested past Python's recursion limit.
        return ApiError(e.status_code, f"the body cannot be parsed: {e.detail}", code="invalid_body").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return ApiError(500, f"internal error: {type(e).__name__}: {e}", "server_error", code="internal_error").response()

    @app.get("/health")
    async def health():
        return Response(status_code=200 if engine.is_running and engine.is_healthy else 503)

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
        want = max_tokens if max_tokens is not None else 0
        if prompt_len + want > max_model_len or prompt_len >= max_model_len:
            raise ApiError(400, f"This model's maximum context length is {max_model_len} tokens. However, you "
                                f"requested {prompt_len + want} tokens ({prompt_len} in the prompt, {want} in the "
                                f"completion). Please reduce the length of the prompt or completion.",
                           param="max_tokens" if max_tokens else "prompt", code="context_length_exceeded")
        if max_tokens is not None:
            return max_tokens
        return min(max_model_len - prompt_len, limits.max_tokens or max_model_len)

    def check_text(field: str, text: str) -> None:
        try:
            limits.check_text(field, text)
        except LimitExceeded as e:
            raise ApiError(400, str(e), param=e.field, code="context_length_exceeded"
                           if "context" in str(e) else None) from None

    async def encode(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ApiError(400, "this server has no tokenizer: send token ids", param="prompt")
            return await engine.run_cpu(tokenizer.encode, prompt)
        return list(prompt)

    def constraint_field(body) -> str:
        """The request field a constraint came from (params_of refused malformed ones already)."""
        found = body.constraint()
        return found[0] if found else "tool_choice"

    def params_of(body, max_tokens: int | None, logprobs: int | None):
        try:
            params = body.sampling_params(max_tokens, logprobs)
            limits.check_params(params)
            return params
        except LimitExceeded as e:
            raise ApiError(400, str(e), param=e.field) from None
        except ValueError as e:
            field = str(e).split(" ", 1)[0].rstrip(":")
            raise ApiError(400, str(e), param=field) from None

    async def compile_constraint(params, field: str) -> None:
        """A constraint that does not compile is the request's error (400), found before it
        is admitted; the compile runs on the grammar thread and is cached for the engine."""
        so = params.structured_outputs
        if so is None:
            return
        try:
            await asyncio.wrap_future(engine.engine.compile_structured(so))
        except GrammarError as e:
            raise ApiError(400, f"{field}: {e}", param=field, code="invalid_structured_output") from None
        except ValueError as e:  # no tokenizer
            raise ApiError(400, str(e), param=field) from None

    def reserve(sequences: int) -> None:
        try:
            engine.reserve(sequences)
        except EngineOverloaded as e:
            raise ApiError(429, str(e), type_="rate_limit_error", code="overloaded") from None
        except EngineUnavailable as e:
            raise ApiError(503, str(e), type_="server_error", code="unavailable") from None
        except ValueError as e:
            raise ApiError(400, str(e), param="n") from None

    async def run(prompt_ids: list[int], params, text: str | None, priority: int) -> AsyncIterator[RequestOutput]:
        try:
            async for out in engine.generate({"prompt": text, "prompt_token_ids": prompt_ids}, params,
                                             priority=priority, reserved=True):
                yield out
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

    async def start_all(ids: list[list[int]], params: list, texts: list[str | None], priority: int) -> list:
        """Admits the request's sequences all at once, then starts one engine request per prompt."""
        reserve(sum(p.n for p in params))
        results = await asyncio.gather(*(first_then_rest(run(i, sp, x, priority))
                                         for i, sp, x in zip(ids, params, texts)), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if not isinstance(r, BaseException):
                    await r.aclose()
            raise errors[0]
        return list(results)

    # ---- /v1/completions -------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        p = body.prompt
        prompts = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise ApiError(400, "prompt must not be empty", param="prompt")
        try:
            limits.check_prompt_count(len(prompts), body.n)
        except LimitExceeded as e:
            raise ApiError(400, str(e), param=e.field) from None
        for x in prompts:
            if isinstance(x, str):
                check_text("prompt", x)
        params_of(body, None, body.logprobs)  # the limits, before any tokenizing
        ids = [await encode(x) for x in prompts]
        max_tokens = [check_lengths(len(i), body.max_tokens) for i in ids]
        params = [params_of(body, m, body.logprobs) for m in max_tokens]
        await compile_constraint(params[0], constraint_field(body))
        want_lp = body.logprobs is not None
        echoes = [await engine.run_cpu(_echo, tokenizer, x, i, want_lp) if body.echo else _NO_ECHO
                  for x, i in zip(prompts, ids)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        streams = await start_all(ids, params, [x if isinstance(x, str) else None for x in prompts], body.priority)
        n = body.n
        texts: dict[int, IncrementalDetokenizer | None] = {}  # choice index -> its text so far (text_offset)

        def choice(k: int, c: CompletionOutput, first: bool, prompt_lp: PromptLogprobs | None) -> dict:
            """A choice, or a streamed chunk of one: the first carries the echoed prompt (and,
            with logprobs, its tokens' logprobs, as vLLM)."""
            index, echo = k * n + c.index, echoes[k] if first else _NO_ECHO
            lp = None
            if want_lp:
                if index not in texts:
                    texts[index] = (IncrementalDetokenizer.after_prompt(tokenizer, ids[k], body.skip_special_tokens)
                                    if tokenizer is not None else None)
                tokens, entries = list(c.token_ids), list(c.logprobs or [])
                starts = _text_starts(texts[index], tokens, len(echoes[k].text))
                if echo.offsets is not None:
                    tokens, entries = ids[k] + tokens, list(prompt_lp or [None] * len(ids[k])) + entries
                    starts = echo.offsets + starts
                lp = _completion_logprobs(tokens, entries, starts, tokenizer)
            return {"index": index, "text": echo.text + c.text, "logprobs": lp,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}

        if body.stream:
            async def sse():
                usage = _Usage()
                try:
                    for k, gen in enumerate(streams):
                        started: set[int] = set()
                        prompt_lp = None
                        async for out in gen:
                            usage.add(out)
                            prompt_lp = out.prompt_logprobs or prompt_lp  # with the first tokens
                            for c in out.outputs:
                                first = c.index not in started
                                started.add(c.index)
                                yield _sse({"id": rid, "object": "text_completion", "created": created,
                                            "model": model_name, "choices": [choice(k, c, first, prompt_lp)]})
                except Exception as e:  # noqa: BLE001 - the stream ends with the error, then [DONE]
                    yield _sse_error(e)
                finally:
                    for gen in streams:
                        await gen.aclose()
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({"id": rid, "object": "text_completion", "created": created, "model": model_name,
                                "choices": [], "usage": usage.dict()})
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        async def collect_all():
            usage = _Usage()
            finals = [await _collect(gen, usage) for gen in streams]

            def build() -> list[dict]:
                return [choice(k, c, True, f.prompt_logprobs) for k, f in enumerate(finals) for c in f.outputs]
            # text_offset detokenizes every returned token once more: off the event loop.
            return (await engine.run_cpu(build) if want_lp else build()), usage

        try:
            collected = await _unless_disconnected(request, collect_all())
        finally:
            for gen in streams:
                await gen.aclose()
        if collected is None:  # the client left: nobody to answer
            return Response(status_code=499)
        choices, usage = collected
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name,
                "choices": choices, "usage": usage.dict()}

    # ---- /v1/chat/completions --------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if tokenizer is None:
            raise ApiError(400, "this server has no tokenizer, so no chat template", param="messages")
        if body.chat_template is not None:
            raise ApiError(400, "chat_template: this server renders only its own chat template (operators choose "
                                "one with --chat-template)", param="chat_template")
        kwargs = body.chat_template_kwargs or {}
        if "chat_template" in kwargs:
            raise ApiError(400, "chat_template_kwargs.chat_template: this server renders only its own chat template "
                                "(operators choose one with --chat-template)", param="chat_template_kwargs")
        reserved = sorted(RESERVED_KWARGS & kwargs.keys())
        if reserved:
            raise ApiError(400, f"chat_template_kwargs.{reserved[0]}: set by the server (or by the request's own "
                                f"field), not a template argument", param="chat_template_kwargs")
        if len(body.messages) > limits.max_chat_messages:
            raise ApiError(400, f"messages: {len(body.messages)} messages exceed this server's limit of "
                                f"{limits.max_chat_messages}", param="messages")
        messages = body.plain_messages()
        check_text("messages", "".join(m["content"] for m in messages if isinstance(m.get("content"), str)))
        k = (body.top_logprobs or 0) if body.logprobs else None
        params_of(body, None, k)  # the limits, before any rendering
        try:
            body.check_tools()
            tooling = ToolCalling.for_request(body.tools, body.tool_choice, body.named_tool(), tool_parser,
                                              parallel=body.parallel_tool_calls)
        except ValueError as e:
            raise ApiError(400, str(e), param=str(e).split(":", 1)[0]) from None
        tool_schema = tooling.constraint() if tooling is not None else None
        given = body.constraint()
        if tool_schema is not None and given is not None:
            raise ApiError(400, f"tool_choice: a required or named tool choice constrains the output already; "
                                f"drop {given[0]}", param="tool_choice")
        try:
            text = await engine.run_cpu(lambda: tokenizer.apply_chat_template(
                messages, chat_template=chat_template, add_generation_prompt=body.add_generation_prompt,
                tools=body.tools, **kwargs))
        except ChatTemplateError as e:
            raise ApiError(400, str(e), param="messages") from None
        except (ValueError, TypeError) as e:
            raise ApiError(400, f"the chat template cannot render these messages: {e}", param="messages") from None
        check_text("messages", text)
        ids = await engine.run_cpu(lambda: tokenizer.encode(text, add_special_tokens=False))
        max_tokens = check_lengths(len(ids), body.max_completion_tokens or body.max_tokens)
        params = params_of(body, max_tokens, k)
        if tool_schema is not None:
            params.structured_outputs = StructuredOutputsParams(json=tool_schema)
        await compile_constraint(params, constraint_field(body))
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        gen = (await start_all([ids], [params], [text], body.priority))[0]
        want_lp = body.logprobs

        if body.stream:
            async def sse():
                usage = _Usage()
                head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}
                for i in range(body.n):
                    yield _sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                     "logprobs": None, "finish_reason": None}]})
                calls = {i: tooling.stream() for i in range(body.n)} if tooling is not None else {}
                made_calls: set[int] = set()
                try:
                    async for out in gen:
                        usage.add(out)
                        for c in out.outputs:
                            delta: dict[str, Any] = {"content": c.text} if c.text else {}
                            finish = c.finish_reason
                            if tooling is not None:
                                content, tool_deltas = calls[c.index].feed(c.text, final=finish is not None)
                                delta = {"content": content} if content else {}
                                if tool_deltas:
                                    delta["tool_calls"] = tool_deltas
                                    made_calls.add(c.index)
                                if finish == "stop" and c.index in made_calls:
                                    finish = tooling.finish_reason
                            yield _sse({**head, "choices": [{
                                "index": c.index, "delta": delta,
                                "logprobs": _chat_logprobs(c) if want_lp else None,
                                "finish_reason": finish, "stop_reason": c.stop_reason}]})
                except Exception as e:  # noqa: BLE001 - the stream ends with the error, then [DONE]
                    yield _sse_error(e)
                finally:
                    await gen.aclose()  # a client that went away: abort the request now
                if body.stream_options and body.stream_options.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage.dict()})
                yield "data: [DONE]\n\n"
            return StreamingResponse(sse(), media_type="text/event-stream")

        usage = _Usage()
        try:
            final = await _unless_disconnected(request, _collect(gen, usage))
        finally:
            await gen.aclose()
        if final is None:
            return Response(status_code=499)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [_chat_choice(c, tooling, want_lp) for c in final.outputs], "usage": usage.dict()}

    return Guard(app, max_bytes=max_body_bytes, api_key=api_key, body_timeout=body_timeout)


def _chat_choice(c: CompletionOutput, tooling: ToolCalling | None, want_lp: bool) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": c.text}
    finish = c.finish_reason
    if tooling is not None:
        content, calls = tooling.extract(c.text)
        message = {"role": "assistant", "content": content, "tool_calls": [t.to_openai() for t in calls]}
        if calls and finish == "stop":
            finish = tooling.finish_reason
    return {"index": c.index, "message": message, "logprobs": _chat_logprobs(c) if want_lp else None,
            "finish_reason": finish, "stop_reason": c.stop_reason}


async def _unless_disconnected(request: Request, work):
    """Runs work (a coroutine) unless the client goes away first: then cancels it (which
    aborts its requests) and returns None."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            return None
    return task.result()


def _sse_error(e: Exception) -> str:
    status, type_ = (503, "server_error") if isinstance(e, EngineUnavailable) else (500, "server_error")
    if isinstance(e, ApiError):
        status, type_ = e.status, e.type
    elif isinstance(e, ValueError):
        status, type_ = 400, "invalid_request_error"
    return _sse(error_dict(str(e), type_, status))


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
    final.outputs.sort(key=lambda c: c.index)
    return final


async def _join(gen: AsyncIterator[RequestOutput], usage: _Usage) -> RequestOutput | None:
    final: RequestOutput | None = None
    async for out in gen:
        usage.add(out)
        if final is None:
            final = out
            continue
        if out.prompt_logprobs is not None:  # they come with the first tokens, maybe not the first delta
            final.prompt_logprobs = out.prompt_logprobs
        by_index = {c.index: c for c in final.outputs}
        for c in out.outputs:
            acc = by_index.get(c.index)
            if acc is None:  # a sequence's first delta
                final.outputs.append(c)
                by_index[c.index] = c
                continue
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


def _finite(logprob: float) -> float:
    """JSON has no -Infinity (a token the sampler ruled out): OpenAI's and vLLM's floor."""
    return max(logprob, -9999.0)


@dataclass(frozen=True)
class _Echo:
    """What a completion choice returns of its prompt: its text and, with logprobs, where each
    prompt token's text begins in it."""
    text: str = ""
    offsets: list[int] | None = None


_NO_ECHO = _Echo()


def _echo(tokenizer: Tokenizer | None, prompt: str | list[int], ids: list[int], with_offsets: bool) -> _Echo:
    """A text prompt echoes as sent; token ids as the tokenizer decodes them, special tokens
    included (as vLLM). Without a tokenizer there is no text (as for the generated text)."""
    if tokenizer is None:
        return _Echo(prompt if isinstance(prompt, str) else "", [0] * len(ids) if with_offsets else None)
    text = prompt if isinstance(prompt, str) else tokenizer.decode(ids, skip_special_tokens=False)
    if not with_offsets:
        return _Echo(text)
    # The beginning-of-sequence token the tokenizer put before a text prompt has no text in it.
    added = int(isinstance(prompt, str) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
                and not prompt.startswith(tokenizer.bos_token or ""))
    starts = [0] * added + _text_starts(IncrementalDetokenizer(tokenizer, skip_special_tokens=False), ids[added:], 0)
    return _Echo(text, [min(s, len(text)) for s in starts])  # a prompt the tokenizer normalized


def _text_starts(text: IncrementalDetokenizer | None, ids: Sequence[int], base: int) -> list[int]:
    """text_offset: where each token's text begins, counting from base, found by detokenizing
    the tokens one by one as the engine does (text continues across calls, hence across
    streamed chunks). A token that completes no character yet begins where the next one does.
    The tokens' own strings cannot be summed instead: decoded alone, a sentencepiece token
    loses its leading space."""
    starts = []
    for t in ids:
        starts.append(base + (len(text.text) if text is not None else 0))
        if text is not None:
            text.add(t)
    return starts


def _completion_logprobs(ids: list[int], entries: list[dict[int, Logprob] | None], starts: list[int],
                         tokenizer: Tokenizer | None) -> dict:
    """OpenAI's completion logprobs, as vLLM fills them: top_logprobs holds the chosen token
    and the top k; a prompt's first token, which nothing scores, has None for both."""
    tokens, lps, tops = [], [], []
    for tok, entry in zip(ids, entries):
        if entry is None:
            tokens.append(tokenizer.decode([tok], skip_special_tokens=False) if tokenizer else str(tok))
            lps.append(None)
            tops.append(None)
            continue
        tokens.append(_token_text(tok, entry[tok]))
        lps.append(_finite(entry[tok].logprob))
        tops.append({_token_text(t, lp): _finite(lp.logprob) for t, lp in entry.items()})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": starts}


# OpenAI (and vLLM) routes for what flashpage does not do: refused by name, not as a typo.
_UNSUPPORTED: tuple[tuple[str, str], ...] = (
    ("/v1/embeddings", "embeddings"), ("/v1/audio", "audio"), ("/v1/images", "image generation"),
    ("/v1/moderations", "moderation"), ("/v1/files", "files"), ("/v1/batches", "batches"),
    ("/v1/fine_tuning", "fine-tuning"), ("/v1/responses", "the Responses API"), ("/v1/assistants", "assistants"),
    ("/v1/threads", "assistants"), ("/v1/vector_stores", "vector stores"), ("/v1/realtime", "the Realtime API"),
    ("/v1/rerank", "reranking"), ("/v2/rerank", "reranking"), ("/rerank", "reranking"), ("/v1/score", "scoring"),
    ("/score", "scoring"), ("/pooling", "pooling"), ("/classify", "classification"),
    ("/tokenize", "tokenizing over HTTP (gRPC has Tokenize)"),
    ("/detokenize", "detokenizing over HTTP (gRPC has Detokenize)"),
)


def _not_found(method: str, path: str) -> ApiError:
    """404 for a route that does not exist. 404 as vLLM answers a route its model's task lacks,
    and because OpenAI's clients retry 5xx (a 501 would be sent again, twice)."""
    what = next((w for prefix, w in _UNSUPPORTED if path == prefix or path.startswith(prefix + "/")), None)
    if what is None:
        return ApiError(404, f"no route {method} {path}", code="not_found")
    return ApiError(404, f"{method} {path} is not supported: flashpage serves generative models "
                         f"(/v1/completions, /v1/chat/completions), not {what}", code="unsupported_endpoint")


def _chat_logprobs(c) -> dict | None:
    if c.logprobs is None:
        return None
    content = []
    for tok, entry in zip(c.token_ids, c.logprobs):
        text = _token_text(tok, entry[tok])
        top = sorted(((lp.rank or 0, t, lp) for t, lp in entry.items() if t != tok or lp.rank == 1))
        content.append({"token": text, "logprob": _finite(entry[tok].logprob), "bytes": list(text.encode()),
                        "top_logprobs": [{"token": _token_text(t, lp), "logprob": _finite(lp.logprob),
                                          "bytes": list(_token_text(t, lp).encode())} for _, t, lp in top]})
    return {"content": content}
