"""KV-cache events (flashpage serve --kv-events-config): the block manager's event log through
the bindings, the exact wire layout, and a real server on stories260K whose events a ZMQ
subscriber decodes with vLLM's own struct definitions (re-declared here): stored blocks carry
the prompt's token ids, a shared prefix is announced once, eviction announces removals, the
replay socket returns what was sent."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from typing import Any

import pytest

msgspec = pytest.importorskip("msgspec")
zmq = pytest.importorskip("zmq")
httpx = pytest.importorskip("httpx")

from flashpage import _core  # noqa: E402
from flashpage.serving.kv_events import KVEventsConfig, ZmqEventPublisher, parse_kv_events_config  # noqa: E402
from model_fixtures import STORIES  # noqa: E402


# vLLM's structs (vllm/distributed/kv_events.py, array-like releases), as a router declares them.
class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base class for all KV cache-related events"""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


DECODER = msgspec.msgpack.Decoder(KVEventBatch)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _recv_all(sub, until: float, want=lambda msgs: False) -> list[list[bytes]]:
    msgs = []
    while time.time() < until and not want(msgs):
        if sub.poll(100):
            msgs.append(sub.recv_multipart())
    return msgs


# ---- the block manager's log through the bindings ----------------------------------------------

def test_block_manager_event_log():
    bm = _core.BlockManager(num_blocks=4, block_size=4)
    assert not bm.kv_events_enabled
    bm.kv_events_enabled = True
    tokens = list(range(10, 19))  # two full blocks and one token
    t = _core.BlockTable()
    bm.allocate_prefix(t, tokens)
    assert bm.allocate_slots(t, 0, 9)
    bm.cache_blocks(t, tokens, 9)
    h = [bm.block_hash(b) for b in t.blocks[:2]]
    assert bm.take_kv_events() == [("BlockStored", h, None, tokens[:8], 0)]
    assert bm.take_kv_events() == []  # drained
    bm.free(t)
    assert bm.reset_prefix_cache()
    assert bm.take_kv_events() == [("AllBlocksCleared", [], None, [], 0)]


# ---- the wire layout -------------------------------------------------------------------------

class _FakeBlockManager:
    def __init__(self, events):
        self.events = events

    def take_kv_events(self):
        events, self.events = self.events, []
        return events


def test_wire_layout_is_vllms(tmp_path):
    pub_ep, replay_ep = f"ipc://{tmp_path}/pub", f"ipc://{tmp_path}/replay"
    publisher = ZmqEventPublisher(KVEventsConfig(True, "zmq", pub_ep, replay_ep, topic="kv@pod@m"), block_size=2)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub_ep)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv@")
    try:
        time.sleep(0.3)  # a SUB socket hears only what is sent after it joined
        big = 2**64 - 1  # hashes are unsigned 64-bit
        publisher.collect(_FakeBlockManager([
            ("BlockStored", [big, 7], None, [1, 2, 3, 4], 0),
            ("BlockStored", [9], 5, [8, 8], 3),  # keyed (prompt_logprobs): left out
            ("BlockRemoved", [7], None, [], 0),
            ("AllBlocksCleared", [], None, [], 0)]))
        publisher.collect(_FakeBlockManager([("BlockRemoved", [9], None, [], 3)]))  # all left out: no batch
        publisher.collect(_FakeBlockManager([("BlockRemoved", [big], None, [], 0)]))
        msgs = _recv_all(sub, time.time() + 10, lambda m: len(m) >= 2)
        assert [m[:2] for m in msgs] == [[b"kv@pod@m", (0).to_bytes(8, "big")], [b"kv@pod@m", (1).to_bytes(8, "big")]]
        raw = msgspec.msgpack.decode(msgs[0][2])
        assert isinstance(raw[0], float) and raw[2] == 0
        assert raw[1] == [["BlockStored", [big, 7], None, [1, 2, 3, 4], 2, None, None, None],
                          ["BlockRemoved", [7], None], ["AllBlocksCleared"]]
        batch = DECODER.decode(msgs[1][2])
        assert batch.events == [BlockRemoved([big], None)]

        # Replay from sequence 1: that batch, then the end marker.
        req = ctx.socket(zmq.DEALER)
        req.connect(replay_ep)
        req.send_multipart([b"", (1).to_bytes(8, "big")])
        assert req.poll(5000)
        assert req.recv_multipart() == [b"", (1).to_bytes(8, "big"), msgs[1][2]]
        assert req.poll(5000)
        assert req.recv_multipart() == [b"", (-1).to_bytes(8, "big", signed=True), b""]
        req.close(0)
    finally:
        sub.close(0)
        ctx.term()
        publisher.shutdown()


def test_config_parsing():
    cfg = parse_kv_events_config('{"enable_kv_cache_events": true, "topic": "kv-events"}')
    assert cfg.active and cfg.publisher == "zmq" and cfg.endpoint == "tcp://*:5557" and cfg.topic == "kv-events"
    assert not parse_kv_events_config('{"enable_kv_cache_events": false}').active
    assert not parse_kv_events_config('{"enable_kv_cache_events": true, "publisher": "null"}').active
    for bad, needle in [("{", "not valid JSON"), ("[1]", "JSON object"), ('{"endpont": "x"}', "unknown key 'endpont'"),
                        ('{"hwm": 0}', "hwm must be positive"), ('{"publisher": "nats"}', "publisher must be"),
                        ('{"enable_kv_cache_events": "yes"}', "wrong type")]:
        with pytest.raises(argparse.ArgumentTypeError, match=needle):
            parse_kv_events_config(bad)


def test_busy_endpoint_is_a_clear_error():
    port = _free_port()
    with socket.socket() as s:
        s.bind(("0.0.0.0", port))
        s.listen()
        with pytest.raises(RuntimeError, match=f"cannot open 'tcp://\\*:{port}'"):
            ZmqEventPublisher(KVEventsConfig(True, "zmq", f"tcp://*:{port}"), block_size=16)


def test_missing_packages_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "zmq", None)  # as if pyzmq were not installed
    with pytest.raises(RuntimeError, match=r"pip install 'flashpage\[kv-events\]'"):
        ZmqEventPublisher(KVEventsConfig(True, "zmq"), block_size=16)


# ---- a real server ---------------------------------------------------------------------------

@pytest.mark.skipif(not os.path.isdir(STORIES), reason="../shared/models/stories260K is not present")
def test_server_publishes_stored_and_removed_blocks(tmp_path):
    from flashpage import LLM
    from flashpage.serving.server import start

    bs = 16
    # 10 blocks of 16 tokens: two short requests leave 3 blocks cached; a long one then evicts.
    llm = LLM(STORIES, kv_cache_memory_bytes=10 * bs * 1280, max_model_len=128, block_size=bs, verbose=False)
    assert llm.model_info["num_kv_blocks"] == 10
    pub_ep, replay_ep = f"tcp://*:{_free_port()}", f"ipc://{tmp_path}/replay"
    config = ('{"enable_kv_cache_events": true, "publisher": "zmq", "endpoint": "%s", "replay_endpoint": "%s", '
              '"topic": "kv-events"}' % (pub_ep, replay_ep))
    port = _free_port()
    args = argparse.Namespace(model=STORIES, host="127.0.0.1", port=port, grpc_port=0, served_model_name="stories",
                              max_waiting_requests=64, max_tokens_limit=None, max_body_bytes=1 << 20,
                              kv_events_config=parse_kv_events_config(config))
    servers = start(args, llm)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.connect(pub_ep.replace("*", "127.0.0.1"))
    sub.setsockopt(zmq.SUBSCRIBE, b"kv-events")
    try:
        time.sleep(0.3)
        prompt_a = llm.llm_engine.prompt_ids(
            "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her friends.")[1]
        assert len(prompt_a) >= 2 * bs + 1
        prompt_b = prompt_a[:2 * bs] + list(range(300, 300 + bs + 4))  # shares A's two full blocks
        prompt_c = list(range(100, 100 + 120))  # 8 blocks with its output: evicts cached ones

        def complete(prompt: list[int], max_tokens: int) -> None:
            r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                           json={"model": "stories", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                                 "ignore_eos": True})
            assert r.status_code == 200, r.text

        complete(prompt_a, 4)
        complete(prompt_b, 4)
        complete(prompt_c, 8)
        msgs = _recv_all(sub, time.time() + 10, lambda m: any(
            isinstance(e, BlockRemoved) for x in m for e in DECODER.decode(x[2]).events))
    finally:
        sub.close(0)
        ctx.term()
        servers.stop(drain_seconds=2)

    assert msgs, "no KV events arrived"
    assert all(m[0] == b"kv-events" and len(m) == 3 for m in msgs)
    seqs = [int.from_bytes(m[1], "big") for m in msgs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # consecutive, one per step with events
    events = [e for m in msgs for e in DECODER.decode(m[2]).events]

    # Every stored block, by hash: (parent hash, its tokens).
    blocks: dict[int, tuple[int | None, list[int]]] = {}
    for e in events:
        if isinstance(e, BlockStored):
            assert e.block_size == bs and e.lora_id is None and e.medium is None  # the CPU backend
            assert len(e.token_ids) == bs * len(e.block_hashes)
            parent = e.parent_block_hash
            for i, h in enumerate(e.block_hashes):
                assert h not in blocks, "a block was announced twice"
                blocks[h] = (parent, e.token_ids[i * bs:(i + 1) * bs])
                parent = h

    def chain(prompt: list[int]) -> list[int]:
        """The hashes of the prompt's full blocks, found by (parent, tokens) as a router does."""
        by_content = {(p, tuple(t)): h for h, (p, t) in blocks.items()}
        parent, out = None, []
        for j in range(len(prompt) // bs):
            h = by_content.get((parent, tuple(prompt[j * bs:(j + 1) * bs])))
            assert h is not None, f"block {j} of the prompt was not announced"
            out.append(h)
            parent = h
        return out

    a, b = chain(prompt_a), chain(prompt_b)
    assert a == b[:2] and len(b) == 3  # the shared prefix is one set of blocks
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert removed and set(removed) <= set(blocks)
    assert all(e.medium is None for e in events if isinstance(e, BlockRemoved))
    assert not any(isinstance(e, AllBlocksCleared) for e in events)
