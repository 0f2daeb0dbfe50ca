"""`flashpage serve`: one engine behind the OpenAI-compatible HTTP server (and the gRPC server
when it is built in), with a clean shutdown.

Shutdown, on SIGTERM or SIGINT (handled explicitly, whatever dispositions the process
inherited: a shell's background job ignores SIGINT; Kubernetes sends SIGTERM): new requests get
503 / UNAVAILABLE while the running ones finish, for up to --shutdown-timeout seconds; what is
left then ends with a final chunk (finish_reason "abort") and `[DONE]`; the process exits 0. A
second signal skips the wait."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from flashpage.serving.limits import ConnectionLimits, RequestLimits

if TYPE_CHECKING:  # the CLI imports this module for its flags: keep torch out until serving starts
    from flashpage.serving.async_engine import AsyncLLMEngine

log = logging.getLogger("flashpage.serving")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The LLM(...) options, as command-line flags (vLLM's names): flashpage.engine_args."""
    from flashpage.engine_args import EngineArgs

    EngineArgs.add_cli_args(p, positional_model=False)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (OpenAI API)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: no gRPC server)")
    p.add_argument("--served-model-name", default=None,
                   help="the model name clients send and metrics show (default: the model directory's name)")
    keys = p.add_argument_group("access")
    keys.add_argument("--api-key", default=None,
                      help="require this key (Authorization: Bearer / gRPC metadata); visible in `ps`: prefer "
                           "FLASHPAGE_API_KEY or --api-key-file")
    keys.add_argument("--api-key-file", default=None, help="read the API key from this file (first line)")
    keys.add_argument("--chat-template", default=None,
                      help="a chat template (a file, or the template text) used instead of the model's")
    tools = p.add_argument_group("tool calling")
    tools.add_argument("--tool-call-parser", default=None, choices=["hermes", "llama3_json", "mistral"],
                       help="how the model writes tool calls, for tool_choice auto (default: from the chat template, "
                            "where it says: <tool_call> hermes, [TOOL_CALLS] mistral, <|python_tag|> llama3_json)")
    tools.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM's scripts: tool_choice auto works wherever a parser is known")
    lim = p.add_argument_group("limits (each refusal names the field and the limit)")
    lim.add_argument("--max-waiting-requests", type=int, default=1024,
                     help="beyond this many waiting sequences (n counts n), new requests get 429 / RESOURCE_EXHAUSTED")
    lim.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    lim.add_argument("--max-n", type=int, default=RequestLimits.max_n, help="largest n (sequences) of one request")
    lim.add_argument("--max-logprobs", type=int, default=RequestLimits.max_logprobs,
                     help="largest logprobs / prompt_logprobs")
    lim.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest HTTP request body")
    lim.add_argument("--max-connections", type=int, default=ConnectionLimits.max_connections,
                     help="open HTTP connections; more get 503")
    lim.add_argument("--header-timeout", type=float, default=ConnectionLimits.header_timeout,
                     help="seconds for a connection to send a request's headers (idle sockets close)")
    lim.add_argument("--body-timeout", type=float, default=ConnectionLimits.body_timeout,
                     help="seconds to receive a request's body")
    lim.add_argument("--timeout-keep-alive", type=float, default=ConnectionLimits.keep_alive_timeout,
                     help="idle seconds between requests")
    lim.add_argument("--shutdown-timeout", type=float, default=30.0,
                     help="on SIGTERM/SIGINT, seconds running requests get to finish before they are aborted")
    lim.add_argument("--engine-watchdog-seconds", type=float, default=60.0,
                     help="/health turns 503 when one engine step runs longer than this (a wedged engine)")
    # -- KV-cache events (flashpage.serving.kv_events) --
    from flashpage.serving.kv_events import parse_kv_events_config

    p.add_argument("--kv-events-config", type=parse_kv_events_config, default=None, metavar="JSON",
                   help="publish prefix-cache events for prefix-aware routers (llm-d, Dynamo) in vLLM's format, "
                        "e.g. '{\"enable_kv_cache_events\": true, \"endpoint\": \"tcp://*:5557\", \"topic\": "
                        "\"kv-events\"}' (vLLM's keys; needs pip install 'flashpage[kv-events]')")
    # -- end KV-cache events --
    add_engine_args(p)


def add_model_args(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """The model, positionally (flashpage's, vllm serve's) or as --model (vLLM's api_server)."""
    from flashpage.engine_args import EngineArgs

    help = EngineArgs.__dataclass_fields__["model"].metadata["help"]
    if positional:
        p.add_argument("model", nargs="?", default=None, help=help)
    p.add_argument("--model", dest="model_flag", default=None, metavar="MODEL", help="the same, as a flag")


def model_arg(args: argparse.Namespace) -> str:
    """The model given positionally or by --model ("" for the embedded one); both, differing: an error."""
    flag, given = getattr(args, "model_flag", None), getattr(args, "model", None)
    if flag and given and flag != given:
        raise ValueError(f"two models given: {given!r} and --model {flag!r}")
    return flag or given or ""


def build_llm(args: argparse.Namespace):
    from flashpage.engine_args import EngineArgs
    from flashpage.llm import LLM
    from flashpage.models import resolve_model

    args.model = resolve_model(model_arg(args))  # served_name reads the path
    options = vars(EngineArgs.from_cli_args(args))
    return LLM(options.pop("model"), **options)


def served_name(args: argparse.Namespace) -> str:
    """--served-model-name, else the model directory's name (not its path: clients and metrics
    see it)."""
    return args.served_model_name or os.path.basename(os.path.normpath(args.model)) or "model"


def api_key(args: argparse.Namespace) -> str | None:
    if getattr(args, "api_key_file", None):
        with open(args.api_key_file, encoding="utf-8") as f:
            key = f.readline().strip()
        if not key:
            raise ValueError(f"{args.api_key_file}: the API key file is empty")
        return key
    return getattr(args, "api_key", None) or os.environ.get("FLASHPAGE_API_KEY") or None


def chat_template(args: argparse.Namespace) -> str | None:
    given = getattr(args, "chat_template", None)
    if given and os.path.isfile(given):
        with open(given, encoding="utf-8") as f:
            return f.read()
    return given or None


def _given(args: argparse.Namespace, **fields: str) -> dict:
    """{field: args.<flag>} for the flags present and set: a Namespace built by hand (tests,
    embedding programs) leaves the rest at the dataclass's defaults."""
    return {f: getattr(args, flag) for f, flag in fields.items() if getattr(args, flag, None) is not None}


def _raise_fd_limit(wanted: int) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (connections are file descriptors); returns it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


@dataclass
class Servers:
    """What `start` brought up; `stop` takes it down."""
    engine: AsyncLLMEngine
    http: object  # uvicorn.Server
    http_thread: threading.Thread
    grpc: object | None = None
    kv_events: object | None = None  # a kv_events.ZmqEventPublisher

    def stop(self, drain_seconds: float = 10.0, force: threading.Event | None = None) -> None:
        """Refuses new requests (503 / UNAVAILABLE: the listeners stay open) while running ones
        finish, for up to drain_seconds or until `force` is set; then ends the rest with a
        final "abort" chunk and stops everything."""
        self.engine.drain()
        if self.grpc is not None:
            self.grpc.set_not_serving()
        deadline = time.monotonic() + drain_seconds
        while self.engine.num_unfinished() and time.monotonic() < deadline and not (force and force.is_set()):
            time.sleep(0.05)
        self.engine.shutdown(timeout=0, drain=False)  # the rest: a final "abort" chunk each
        if self.kv_events is not None:  # after the engine's last step: its events go out too
            self.kv_events.shutdown()
        self.http.should_exit = True  # type: ignore[attr-defined]  # lets the final chunks go out
        if self.grpc is not None:
            self.grpc.stop(grace=2.0)
        self.http_thread.join(10)


def start(args: argparse.Namespace, llm=None, on_listen: Callable[[], None] | None = None) -> Servers:
    """Builds the engine and starts the servers in background threads; returns once HTTP is up.
    on_listen is called just before the HTTP server starts listening (from then on, a client may
    be served before this returns)."""
    import uvicorn

    from flashpage.serving.async_engine import AsyncLLMEngine
    from flashpage.serving.http_guard import guarded_protocol
    from flashpage.serving.openai_server import build_app

    key = api_key(args)
    template = chat_template(args)
    llm = llm if llm is not None else build_llm(args)
    name = served_name(args)
    max_len = int(llm.model_info["max_model_len"])
    limits = RequestLimits(max_model_len=max_len, **_given(args, max_n="max_n", max_logprobs="max_logprobs",
                                                           max_prompt_logprobs="max_logprobs",
                                                           max_tokens="max_tokens_limit"))
    conn = ConnectionLimits(**_given(args, max_connections="max_connections", header_timeout="header_timeout",
                                     body_timeout="body_timeout", keep_alive_timeout="timeout_keep_alive"))
    fds = _raise_fd_limit(conn.max_connections + 256)
    if conn.max_connections + 64 > fds:
        conn = replace(conn, max_connections=max(1, fds - 64))
        log.warning("only %d file descriptors: at most %d connections", fds, conn.max_connections)
    # -- KV-cache events: opened before anything listens, so a bad endpoint fails the start cleanly --
    from flashpage.serving.kv_events import start_publisher

    kv_events = start_publisher(getattr(args, "kv_events_config", None), llm)
    on_step = None
    if kv_events is not None:
        block_manager = llm.llm_engine.scheduler.block_manager
        on_step = lambda: kv_events.collect(block_manager)  # noqa: E731
    # -- end KV-cache events --
    engine = AsyncLLMEngine(llm.llm_engine, model_name=name, max_waiting_requests=args.max_waiting_requests,
                            watchdog_seconds=getattr(args, "engine_watchdog_seconds", 60.0), on_step=on_step)
    app = build_app(engine, llm.tokenizer, model_name=name, limits=limits, chat_template=template, api_key=key,
                    max_body_bytes=args.max_body_bytes, body_timeout=conn.body_timeout,
                    tool_call_parser=getattr(args, "tool_call_parser", None))
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           http=guarded_protocol(conn), timeout_keep_alive=conn.keep_alive_timeout,
                                           timeout_graceful_shutdown=5, lifespan="off"))
    thread = threading.Thread(target=server.run, name="flashpage-http", daemon=True)
    if on_listen is not None:
        on_listen()
    thread.start()
    grpc_server = None
    if args.grpc_port:
        try:
            from flashpage.serving.grpc_server import start_grpc
        except ImportError:  # built without the gRPC server
            start_grpc = None
        if start_grpc is not None:
            try:
                grpc_server = start_grpc(engine, llm.tokenizer, model_name=name, limits=limits,
                                         host=args.host, port=args.grpc_port, api_key=key)
            except BaseException:
                server.should_exit = True
                engine.shutdown(timeout=1)
                if kv_events is not None:
                    kv_events.shutdown()
                raise
    while not server.started and thread.is_alive():
        thread.join(0.05)
    if not server.started:
        engine.shutdown(timeout=1)
        if kv_events is not None:
            kv_events.shutdown()
        if grpc_server is not None:
            grpc_server.stop(grace=0)
        raise RuntimeError(f"the HTTP server did not start on {args.host}:{args.port}")
    return Servers(engine, server, thread, grpc_server, kv_events)


def serve(args: argparse.Namespace) -> int:
    first, force = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame) -> None:
        if first.is_set():
            force.set()
        first.set()
        if not started.is_set():  # still loading the model: leave at once
            raise SystemExit(0)

    started = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # explicitly: a background job inherits SIGINT ignored
        signal.signal(sig, on_signal)
    # A signal while the model loads leaves at once; from the moment clients can be served (the
    # HTTP server may answer before start() returns), it shuts down cleanly like any other.
    servers = start(args, on_listen=started.set)
    if first.is_set():
        force.set()
    print(f"flashpage: serving {served_name(args)} on http://{args.host}:{args.port}"
          + (f" and grpc {args.host}:{servers.grpc.port}" if servers.grpc is not None else ""), flush=True)
    while not first.is_set() and servers.http_thread.is_alive():
        first.wait(0.5)
    print(f"flashpage: shutting down: new requests get 503; running ones have {args.shutdown_timeout} s "
          "(a second signal: now)", file=sys.stderr, flush=True)
    servers.stop(drain_seconds=args.shutdown_timeout, force=force)
    print("flashpage: stopped", file=sys.stderr, flush=True)
    return 0
