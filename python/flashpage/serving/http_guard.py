"""What stands between the network and the OpenAI routes: the connection limits and timeouts
(a uvicorn protocol), and the API key and body limits (an ASGI middleware). Every refusal is an
OpenAI error body ({"error": {"message", "type", "param", "code"}})."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from uvicorn.protocols.http.h11_impl import H11Protocol

from flashpage.serving.limits import ConnectionLimits

log = logging.getLogger("flashpage.serving")


def error_dict(message: str, type_: str, code: str | int | None, param: str | None = None) -> dict:
    """OpenAI's error body, the one shape of every refusal (responses and stream events)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_body(message: str, type_: str, code: str | None, param: str | None = None) -> bytes:
    return json.dumps(error_dict(message, type_, code, param)).encode()


async def send_error(send, status: int, message: str, type_: str = "invalid_request_error",
                     code: str | None = None, param: str | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_body(message, type_, code, param)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a connection limit and a header deadline: idle sockets and
    slow-loris headers are closed, and beyond max_connections a new socket gets a 503 at once
    (so the process never runs out of file descriptors)."""

    class GuardedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _refused = False  # over the limit: answered 503 and closed, never a connection

        def connection_made(self, transport) -> None:  # type: ignore[override]
            if len(self.server_state.connections) >= limits.max_connections:
                body = error_body(f"this server is at its limit of {limits.max_connections} connections",
                                  "server_error", "too_many_connections")
                transport.write(b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
                transport.close()
                self.transport = transport
                self._refused = True
                return
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc) -> None:
            if self._refused:
                return
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            super().data_received(data)
            if self.cycle is not None and not self.cycle.response_complete:
                self._disarm()  # a request's headers arrived; its body has a deadline of its own
            else:
                self._arm()  # waiting for (the rest of) a request's headers

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(limits.header_timeout, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.cycle is None or self.cycle.response_complete:
                if not self.transport.is_closing():
                    self.transport.close()

    return GuardedH11Protocol


class Guard:
    """ASGI middleware: the API key on every route but /health; each request's body read
    whole before the app sees it, at most max_bytes (413) within body_timeout (408); errors
    the app did not turn into a response become an OpenAI 500 body."""

    def __init__(self, app, *, max_bytes: int, api_key: str | None, body_timeout: float) -> None:
        self.app, self.max_bytes, self.api_key, self.body_timeout = app, max_bytes, api_key, body_timeout
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.expected is not None and scope["path"] != "/health":
            if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
                return await send_error(send, 401, "invalid or missing API key (Authorization: Bearer ...)",
                                        "authentication_error", "invalid_api_key")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await send_error(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes",
                                    code="body_too_large")
        try:
            body = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
        except asyncio.TimeoutError:
            return await send_error(send, 408, f"the request body did not arrive within {self.body_timeout} s",
                                    code="request_timeout", headers=[(b"connection", b"close")])
        except _TooLarge:
            return await send_error(send, 413, f"request body exceeds the limit of {self.max_bytes} bytes",
                                    code="body_too_large", headers=[(b"connection", b"close")])
        if body is None:  # the client went away before sending its body
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        started = False

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, replay, tracking_send)
        except Exception as e:  # noqa: BLE001 - never a plain-text 500
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await send_error(send, 500, f"internal error: {type(e).__name__}: {e}", "server_error",
                                 "internal_error")

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise _TooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


class _TooLarge(Exception):
    pass
