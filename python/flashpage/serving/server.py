"""`flashpage serve`: one engine behind the OpenAI-compatible HTTP server (and the gRPC server
when it is built in), with a clean shutdown (drain, then stop)."""

from __future__ import annotations

import argparse
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for its flags: keep torch out until serving starts
    from flashpage.serving.async_engine import AsyncLLMEngine


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The LLM(...) options, as command-line flags (vLLM's names)."""
    g = p.add_argument_group("engine")
    g.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model's)")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    g.add_argument("--compute-dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="CPU arithmetic: auto = bf16 for bf16 weights where the CPU has bf16 dot products")
    g.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    g.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default: ~0.1 s of prefill at this machine's measured speed)")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false")
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--kv-cache-memory-fraction", type=float, default=0.25)
    g.add_argument("--seed", type=int, default=0)


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a local Hugging Face model directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (OpenAI API)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: no gRPC server)")
    p.add_argument("--served-model-name", default=None, help="the model name clients send (default: the path)")
    p.add_argument("--api-key", default=os.environ.get("FLASHPAGE_API_KEY"),
                   help="require this key (Authorization: Bearer / gRPC metadata); or FLASHPAGE_API_KEY")
    p.add_argument("--max-waiting-requests", type=int, default=1024,
                   help="beyond this many waiting requests, new ones get 429 / RESOURCE_EXHAUSTED")
    p.add_argument("--max-tokens-limit", type=int, default=None, help="largest max_tokens a request may ask")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="largest HTTP request body")
    add_engine_args(p)


def build_llm(args: argparse.Namespace):
    from flashpage.llm import LLM

    return LLM(args.model, tokenizer=args.tokenizer, dtype=args.dtype, compute_dtype=args.compute_dtype,
               load_format=args.load_format,
               max_model_len=args.max_model_len, block_size=args.block_size, max_num_seqs=args.max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens,
               enable_prefix_caching=args.enable_prefix_caching,
               kv_cache_memory_bytes=args.kv_cache_memory_bytes,
               kv_cache_memory_fraction=args.kv_cache_memory_fraction, seed=args.seed,
               verbose=getattr(args, "verbose", True))


@dataclass
class Servers:
    """What `start` brought up; `stop` takes it down."""
    engine: AsyncLLMEngine
    http: object  # uvicorn.Server
    http_thread: threading.Thread
    grpc: object | None = None

    def stop(self, drain_seconds: float = 10.0) -> None:
        self.engine._draining = True  # new requests: 503 / UNAVAILABLE while running ones finish
        if self.grpc is not None:
            self.grpc.stop(drain_seconds)
        self.http.should_exit = True  # type: ignore[attr-defined]
        self.http_thread.join()
        self.engine.shutdown(timeout=drain_seconds)


def start(args: argparse.Namespace, llm=None) -> Servers:
    """Builds the engine and starts the servers in background threads; returns once HTTP is up."""
    import uvicorn

    from flashpage.serving.async_engine import AsyncLLMEngine
    from flashpage.serving.openai_server import build_app

    llm = llm if llm is not None else build_llm(args)
    name = args.served_model_name or args.model
    engine = AsyncLLMEngine(llm.llm_engine, model_name=name, max_waiting_requests=args.max_waiting_requests)
    max_len = int(llm.model_info["max_model_len"])
    app = build_app(engine, llm.tokenizer, model_name=name, max_model_len=max_len, api_key=args.api_key,
                    max_tokens_limit=args.max_tokens_limit, max_body_bytes=args.max_body_bytes)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, name="flashpage-http", daemon=True)
    thread.start()
    grpc_server = None
    if args.grpc_port:
        try:
            from flashpage.serving.grpc_server import start_grpc
        except ImportError:  # built without the gRPC server
            start_grpc = None
        if start_grpc is not None:
            grpc_server = start_grpc(engine, llm.tokenizer, model_name=name, max_model_len=max_len,
                                     host=args.host, port=args.grpc_port, api_key=args.api_key)
    while not server.started and thread.is_alive():
        thread.join(0.05)
    if not server.started:
        engine.shutdown(timeout=1)
        raise RuntimeError(f"the HTTP server did not start on {args.host}:{args.port}")
    return Servers(engine, server, thread, grpc_server)


def serve(args: argparse.Namespace) -> int:
    servers = start(args)
    print(f"flashpage: serving {args.served_model_name or args.model} on http://{args.host}:{args.port}"
          + (f" and grpc {args.host}:{args.grpc_port}" if servers.grpc is not None else ""), flush=True)
    try:
        servers.http_thread.join()
    except KeyboardInterrupt:
        pass
    finally:
        servers.stop()
    return 0
