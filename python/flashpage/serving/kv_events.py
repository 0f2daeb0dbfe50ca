"""KV-cache events for prefix-aware routers (llm-d's KV-cache indexer, NVIDIA Dynamo).

`flashpage serve --kv-events-config '{"enable_kv_cache_events": true}'` publishes every change
to the prefix cache -- blocks stored, blocks removed (evicted), all blocks cleared -- in vLLM's
format (vllm/distributed/kv_events.py), so a router that follows vLLM replicas follows
flashpage replicas unchanged:

- transport: a ZMQ PUB socket (`endpoint`, default tcp://*:5557: bound when it names a
  wildcard, ipc:// or inproc://, else connected); each message is three frames: `topic`, an
  8-byte big-endian sequence number (0, 1, 2, ... one per step that changed the cache; a gap
  means batches were dropped) and the msgpack payload. With `replay_endpoint`, a ROUTER socket
  answers a request [b"", 8-byte start sequence] with every kept batch from there on (the last
  `buffer_steps`), each as [b"", seq, payload], then [b"", seq -1, b""].
- payload: msgspec's array encoding of vLLM's structs (array_like, tagged), the layout vLLM
  released up to 0.23 and that llm-d and Dynamo decode: [ts, [event, ...], 0], an event being
  ["BlockStored", block_hashes, parent_block_hash | None, token_ids, block_size, lora_id (None),
  medium, lora_name (None)], ["BlockRemoved", block_hashes, medium] or ["AllBlocksCleared"].
  (vLLM after 0.23 sends its events as maps; routers decode both.)
- hashes: flashpage's own prefix-cache block hashes (64-bit, chained from the parent block's
  hash and the block's token ids), not vLLM's SHA-256 ones. Routers that recompute a block's
  key from `token_ids` and keep the engine's hash only as the block's name -- llm-d's indexer
  (llm-d-kv-cache; not the older llm-d-kv-cache-manager, which indexes the engine hash itself)
  and Dynamo's KV router -- route on them as they are; such a router must be told flashpage's
  block size (--block-size, default 16).
- medium: "GPU" when the cache is in GPU memory (as vLLM), else None: the router's default,
  device tier. "CPU" would tell it the blocks sit in an offload tier, which a CPU replica's
  only cache is not.
- left out: blocks cached under a key of their own (requests with prompt_logprobs, which
  recompute their prompt) -- no other request can hit them.

The block manager records the events in C++ (one flag check per cached or evicted block when
off); the engine thread drains them after each step (`collect`), a thread of this module
encodes and sends them, so the step loop never waits on the network.
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

log = logging.getLogger("flashpage.serving")

INSTALL_HINT = "pip install 'flashpage[kv-events]'"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


@dataclass(frozen=True)
class KVEventsConfig:
    """vLLM's --kv-events-config, same keys and defaults."""
    enable_kv_cache_events: bool = False
    publisher: str | None = None  # "zmq" or "null"; default: "zmq" when events are enabled
    endpoint: str = "tcp://*:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000  # batches kept for replay
    hwm: int = 100_000  # ZMQ send high-water mark (messages)
    max_queue_size: int = 100_000  # batches waiting to be sent; beyond it batches are dropped
    topic: str = ""

    @property
    def active(self) -> bool:
        return self.enable_kv_cache_events and self.publisher == "zmq"

    @classmethod
    def from_json(cls, text: str) -> KVEventsConfig:
        """Parses the flag's JSON; ValueError naming what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"--kv-events-config: not valid JSON ({e.msg}): {text!r}") from None
        if not isinstance(data, dict):
            raise ValueError("--kv-events-config: not a JSON object; e.g. '{\"enable_kv_cache_events\": true}'")
        types = {"enable_kv_cache_events": bool, "publisher": (str, type(None)), "endpoint": str,
                 "replay_endpoint": (str, type(None)), "buffer_steps": int, "hwm": int, "max_queue_size": int,
                 "topic": str}
        known = [f.name for f in fields(cls)]
        for key, value in data.items():
            if key not in types:
                raise ValueError(f"--kv-events-config: unknown key {key!r} (keys: {', '.join(known)})")
            if not isinstance(value, types[key]) or (types[key] is int and isinstance(value, bool)):
                raise ValueError(f"--kv-events-config: {key} has the wrong type: {value!r}")
            if types[key] is int and value <= 0:
                raise ValueError(f"--kv-events-config: {key} must be positive, got {value}")
        publisher = data.get("publisher") or ("zmq" if data.get("enable_kv_cache_events") else "null")
        if publisher not in ("zmq", "null"):
            raise ValueError(f"--kv-events-config: publisher must be 'zmq' or 'null', got {publisher!r}")
        return cls(**{**data, "publisher": publisher})


def parse_kv_events_config(text: str) -> KVEventsConfig:
    """argparse `type=`: the message names the problem instead of argparse's generic one."""
    try:
        return KVEventsConfig.from_json(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--kv-events-config: ")) from None


def _import_deps():
    try:
        import msgspec
        import zmq
    except ImportError:
        raise RuntimeError(f"--kv-events-config needs pyzmq and msgspec: {INSTALL_HINT}") from None
    return zmq, msgspec


def _event_types(msgspec) -> dict[str, Any]:
    """vLLM's event structs (array-like encoding), declared once msgspec is known to be there."""

    class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
        ts: float
        events: list[Any]
        data_parallel_rank: int | None = None

    class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
        pass

    class BlockStored(KVCacheEvent):
        block_hashes: list[int]
        parent_block_hash: int | None
        token_ids: list[int]
        block_size: int
        lora_id: int | None
        medium: str | None
        lora_name: str | None

    class BlockRemoved(KVCacheEvent):
        block_hashes: list[int]
        medium: str | None

    class AllBlocksCleared(KVCacheEvent):
        pass

    class KVEventBatch(EventBatch):
        events: list[BlockStored | BlockRemoved | AllBlocksCleared]

    return {"KVEventBatch": KVEventBatch, "BlockStored": BlockStored, "BlockRemoved": BlockRemoved,
            "AllBlocksCleared": AllBlocksCleared}


class ZmqEventPublisher:
    """Publishes the block manager's events (see the module's docstring). `collect` runs on the
    engine thread; one thread of its own owns the sockets (ZMQ sockets are not thread-safe)."""

    def __init__(self, config: KVEventsConfig, block_size: int, medium: str | None = None) -> None:
        zmq, msgspec = _import_deps()
        self._zmq = zmq
        self._types = _event_types(msgspec)
        self._encoder = msgspec.msgpack.Encoder()
        self.block_size = block_size
        self.medium = medium
        self.topic = config.topic.encode()
        self.dropped = 0  # batches dropped because the send queue was full
        self._queue: queue.Queue = queue.Queue(maxsize=config.max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._next_seq = 0
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._replay = None
        try:
            self._pub.set_hwm(config.hwm)
            self._pub.setsockopt(zmq.LINGER, 1000)  # shutdown: the last batches still go out
            ep = config.endpoint
            # vLLM's convention: a stable side binds (wildcard, ipc, inproc), else connect to a collector.
            if "*" in ep or "::" in ep or ep.startswith(("ipc://", "inproc://")):
                self._pub.bind(ep)
            else:
                self._pub.connect(ep)
            if config.replay_endpoint:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.LINGER, 0)
                self._replay.bind(config.replay_endpoint)
        except zmq.ZMQError as e:
            self._close_sockets()
            raise RuntimeError(f"--kv-events-config: cannot open {config.endpoint!r}"
                               + (f" / {config.replay_endpoint!r}" if config.replay_endpoint else "")
                               + f": {e}") from None
        # Sockets move to the sender thread here; Thread.start() is the memory barrier ZMQ asks for.
        self._thread = threading.Thread(target=self._run, name="flashpage-kv-events", daemon=True)
        self._thread.start()

    # ---- the engine thread -----------------------------------------------------------------

    def collect(self, block_manager) -> None:
        """Drains the block manager's event log into one batch (none if nothing changed)."""
        try:
            raw = block_manager.take_kv_events()
            if raw:
                self._publish(raw)
        except Exception:  # noqa: BLE001 - routing hints must never stop the engine
            log.exception("kv events: a batch was lost")

    def _publish(self, raw: list[tuple]) -> None:
        t = self._types
        events = []
        for kind, hashes, parent, tokens, extra_key in raw:
            if extra_key:  # a private cache (prompt_logprobs): no other request can hit these blocks
                continue
            if kind == "BlockStored":
                events.append(t["BlockStored"](hashes, parent, tokens, self.block_size, None, self.medium, None))
            elif kind == "BlockRemoved":
                events.append(t["BlockRemoved"](hashes, self.medium))
            else:
                events.append(t["AllBlocksCleared"]())
        if not events:
            return
        batch = t["KVEventBatch"](ts=time.time(), events=events, data_parallel_rank=0)
        # The number is taken here, so a batch dropped on a full queue leaves a gap a subscriber sees.
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        try:
            self._queue.put_nowait((seq, batch))
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("kv events: the send queue is full; %d batches dropped", self.dropped)

    # ---- the sender thread -----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            if self._replay is not None and self._replay.poll(0):
                try:
                    self._serve_replay()
                except Exception:  # noqa: BLE001 - a bad replay request ends only itself
                    log.exception("kv events: replay request failed")
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is None:
                return
            seq, batch = item
            try:
                payload = self._encoder.encode(batch)
                self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
                self._buffer.append((seq, payload))
            except Exception:  # noqa: BLE001 - one batch lost (a gap), the stream goes on
                log.exception("kv events: batch %d was not sent", seq)

    def _serve_replay(self) -> None:
        frames = self._replay.recv_multipart()
        if len(frames) != 3 or len(frames[2]) != 8:
            log.warning("kv events: malformed replay request (%d frames)", len(frames))
            return
        client, start = frames[0], int.from_bytes(frames[2], "big")
        for seq, payload in list(self._buffer):
            if seq >= start:
                self._replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        self._replay.send_multipart((client, b"", END_SEQ, b""))

    # ---- shutdown --------------------------------------------------------------------------

    def shutdown(self, timeout: float = 2.0) -> None:
        """Sends what is queued (up to timeout), then closes the sockets."""
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._close_sockets()

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close()
        self._ctx.term()


def start_publisher(config: KVEventsConfig | str | None, llm) -> ZmqEventPublisher | None:
    """The publisher `flashpage serve` runs for --kv-events-config (None when it is off), its
    block manager's event log switched on. Raises RuntimeError (missing packages, a busy port)."""
    if isinstance(config, str):
        config = KVEventsConfig.from_json(config)
    if config is None or not config.active:
        return None
    core = llm.llm_engine.core
    medium = "GPU" if str(core.info.get("backend", "")).startswith("cuda") else None
    bm = core.scheduler.block_manager
    publisher = ZmqEventPublisher(config, block_size=bm.block_size, medium=medium)
    bm.kv_events_enabled = True
    log.info("kv events: publishing on %s (topic %r)", config.endpoint, config.topic)
    return publisher
