"""Scheduler behaviour through the bindings: batching, budgets, chunked prefill, preemption,
priority, aborts, stops, forks, the step's arrays (zero-copy) and errors."""

import numpy as np
import pytest

from fake_model import EOS, expected_output, fork_token, next_token
from flashpage import RequestRejected, Scheduler, SchedulerConfig


def make(num_blocks=64, block_size=4, max_tokens_per_step=64, max_seqs=8, policy="fcfs",
         max_model_len=256):
    return Scheduler(SchedulerConfig(num_blocks=num_blocks, block_size=block_size,
                                     max_num_batched_tokens=max_tokens_per_step,
                                     max_num_seqs=max_seqs, max_model_len=max_model_len,
                                     policy=policy))


def prompt(n, base=1):
    return np.arange(base, base + n, dtype=np.int32) % 50 + 1


def step(s, forks=()):
    """One step with the fake model; returns (step output, {id: (token, reason)})."""
    out = s.schedule()
    if out.num_seqs == 0:
        return out, {}
    sampled = np.zeros(out.num_seqs, dtype=np.int32)
    for i, rid in enumerate(out.request_ids):
        if out.do_sample[i]:
            sampled[i] = next_token(s.tokens(int(rid)))
    ids, toks, reasons = s.update(sampled)
    return out, {int(i): (int(t), r) for i, t, r in zip(ids, toks, reasons)}


def run(s, max_steps=10_000):
    outputs, reasons = {}, {}
    for _ in range(max_steps):
        if not s.has_unfinished:
            break
        _, ups = step(s)
        for rid, (tok, reason) in ups.items():
            outputs.setdefault(rid, []).append(tok)
            if reason:
                reasons[rid] = reason
    assert not s.has_unfinished
    return outputs, reasons


def test_requests_join_and_leave_the_running_batch():
    s = make()
    s.add_request(1, prompt(5), max_tokens=3, ignore_eos=True)
    step(s)
    s.add_request(2, prompt(4, 9), max_tokens=5, ignore_eos=True)  # joins mid-flight
    out, _ = step(s)
    assert sorted(out.request_ids.tolist()) == [1, 2]
    outputs, reasons = run(s)
    assert reasons == {1: "length", 2: "length"}
    assert s.block_manager.num_free_blocks == 64


def test_step_arrays_are_zero_copy_read_only_and_consistent():
    s = make(block_size=4)
    s.add_request(7, prompt(6), max_tokens=2)
    s.add_request(8, prompt(3, 20), max_tokens=2)
    out = s.schedule()
    ids = out.token_ids
    # The same memory every time, owned by the SchedulerOutput (no copy).
    assert ids.__array_interface__["data"][0] == out.token_ids.__array_interface__["data"][0]
    assert not ids.flags.writeable and ids.dtype == np.int32
    assert out.num_seqs == 2 and out.num_tokens == 9
    assert out.query_start_loc.tolist() == [0, 6, 9]
    assert out.logits_indices.tolist() == [5, 8]
    assert out.block_tables.shape == (2, 2)
    for i in range(out.num_seqs):
        for t in range(out.query_start_loc[i], out.query_start_loc[i + 1]):
            pos = out.positions[t]
            assert out.slot_mapping[t] == out.block_tables[i, pos // 4] * 4 + pos % 4
    assert out.block_tables[1, 1] == -1
    del s  # the arrays keep the step alive
    assert out.token_ids[6] == prompt(3, 20)[0]


def test_chunked_prefill_and_decodes_first():
    s = make(num_blocks=256, max_tokens_per_step=16)
    s.add_request(1, prompt(4), max_tokens=40, ignore_eos=True)
    step(s)
    s.add_request(2, prompt(100), max_tokens=2, ignore_eos=True)
    chunks = 0
    while 2 in s and s.num_computed_tokens(2) < 100:
        out, _ = step(s)
        assert out.num_tokens <= 16
        assert out.request_ids[0] == 1 and out.query_start_loc[1] == 1
        chunks += out.num_seqs == 2
    assert chunks >= 7


def test_chunked_equals_unchunked_outputs():
    results = []
    for budget in (8, 512):
        s = make(num_blocks=128, max_tokens_per_step=budget)
        for r in range(4):
            s.add_request(r, prompt(30 + r, r * 3), max_tokens=12)
        results.append(run(s))
    assert results[0] == results[1]


def test_preempted_requests_give_the_same_output():
    s = make(num_blocks=10)
    for r in range(4):
        s.add_request(r, prompt(6, r * 11), max_tokens=12, eos_token_ids=[EOS])
    outputs, reasons = run(s)
    assert s.stats()["num_preemptions"] > 0
    for r in range(4):
        want, why = expected_output(prompt(6, r * 11), 12, 256)
        assert outputs[r] == want and reasons[r] == why
    assert s.block_manager.num_free_blocks == 10


def test_impossible_requests_are_rejected_clearly():
    s = make(num_blocks=4, block_size=4)
    with pytest.raises(RequestRejected, match=r"needs up to 5 KV blocks .* has 4 blocks"):
        s.add_request(1, prompt(17), max_tokens=4)
    with pytest.raises(RequestRejected, match="empty"):
        s.add_request(2, np.array([], dtype=np.int32))
    with pytest.raises(RequestRejected, match="max_model_len"):
        s.add_request(3, prompt(300))
    with pytest.raises(ValueError, match="max_tokens"):
        s.add_request(4, prompt(3), max_tokens=0)
    with pytest.raises(ValueError, match="negative token id"):
        s.add_request(5, np.array([1, -2], dtype=np.int32))
    s.add_request(6, prompt(3), max_tokens=4)
    with pytest.raises(ValueError, match="already"):
        s.add_request(6, prompt(3), max_tokens=4)
    assert issubclass(RequestRejected, ValueError)
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make(max_tokens_per_step=4, max_seqs=8)
    with pytest.raises(ValueError, match="policy"):
        SchedulerConfig(num_blocks=4, policy="lifo")


def test_abort_in_every_state_frees_everything():
    s = make(max_tokens_per_step=8)
    s.add_request(1, prompt(4), max_tokens=8)
    s.add_request(2, prompt(20), max_tokens=8)
    s.add_request(3, prompt(4), max_tokens=8)
    out = s.schedule()
    assert s.abort_request(1)  # between schedule() and update()
    ids, _, _ = s.update(np.ones(out.num_seqs, dtype=np.int32))
    assert 1 not in ids.tolist()
    assert s.status(3) == "waiting" and s.abort_request(3)
    assert s.status(2) == "running" and s.abort_request(2)
    assert not s.abort_request(2)
    with pytest.raises(KeyError):
        s.tokens(2)
    assert not s.has_unfinished and s.block_manager.num_free_blocks == 64
    assert sorted(s.schedule().finished_ids.tolist()) == [1, 2, 3]


def test_update_checks_its_input():
    s = make()
    assert s.schedule().num_seqs == 0
    ids, _, _ = s.update(np.zeros(0, dtype=np.int32))  # an empty step: a no-op
    assert len(ids) == 0
    s.add_request(1, prompt(4))
    with pytest.raises(RuntimeError, match="no step"):
        s.update(np.zeros(1, dtype=np.int32))
    s.schedule()
    with pytest.raises(RuntimeError, match="update"):
        s.schedule()
    with pytest.raises(ValueError, match="got 2 sampled tokens for a step of 1"):
        s.update(np.zeros(2, dtype=np.int32))
    with pytest.raises(ValueError, match="negative"):
        s.update(np.array([-1], dtype=np.int32))
    s.update(np.array([5], dtype=np.int32))


def test_stop_conditions():
    s = make()
    s.add_request(1, prompt(4), max_tokens=10, eos_token_ids=[2], stop_token_ids=[3], min_tokens=2)
    s.schedule()
    assert s.update(np.array([2], dtype=np.int32))[2] == [None]  # eos before min_tokens
    s.schedule()
    assert s.update(np.array([3], dtype=np.int32))[2] == ["stop"]
    s.add_request(2, prompt(4), max_tokens=2, eos_token_ids=[2], ignore_eos=True)
    for want in (None, "length"):
        s.schedule()
        assert s.update(np.array([2], dtype=np.int32))[2] == [want]
    s.add_request(3, prompt(4), max_tokens=10)
    s.schedule()
    s.update(np.array([9], dtype=np.int32))
    assert s.finish_request(3, "stop")  # a stop string found by the caller
    with pytest.raises(ValueError, match="finish reason"):
        s.finish_request(4, "bogus")
    # max_model_len caps generation
    t = make(max_model_len=8)
    t.add_request(1, prompt(6), max_tokens=100, ignore_eos=True)
    outputs, reasons = run(t)
    assert len(outputs[1]) == 2 and reasons[1] == "length"


def test_priority_preemption_without_thrashing():
    s = make(num_blocks=10, policy="priority")
    s.add_request(1, prompt(14), max_tokens=20, priority=5, ignore_eos=True)
    s.add_request(2, prompt(14, 7), max_tokens=20, priority=5, ignore_eos=True)
    step(s)
    s.add_request(3, prompt(10, 3), max_tokens=3, priority=0, ignore_eos=True)
    out, _ = step(s)
    assert out.preempted_ids.tolist() == [2]
    assert s.status(3) == "running" and s.status(2) == "waiting"
    s.add_request(4, prompt(10, 5), max_tokens=3, priority=0, ignore_eos=True)
    preempted_again_without_progress = 0
    while s.has_unfinished:
        outputs_before = len(s.tokens(2)) if 2 in s else None
        out, _ = step(s)
        if 2 in out.preempted_ids.tolist() and outputs_before == 14:
            preempted_again_without_progress += 1
    assert preempted_again_without_progress == 0
    with pytest.raises(ValueError, match="priority"):
        make().add_request(1, prompt(3), priority=1)


def test_fork_shares_blocks_and_copies_on_write():
    s = make(num_blocks=32)
    p = prompt(6)
    s.add_request(1, p, max_tokens=5, ignore_eos=True)
    out = s.schedule()
    s.fork_request(1, 2)
    s.fork_request(1, 3)
    assert s.block_table(2) == s.block_table(1)
    assert s.block_manager.ref_count(s.block_table(1)[1]) == 3
    first = next_token(p.tolist())
    s.update(np.array([first], dtype=np.int32),
             np.array([fork_token(p.tolist(), 1), fork_token(p.tolist(), 2)], dtype=np.int32))
    out, ups = step(s)
    assert out.block_copies.shape == (2, 2)  # two of three copy the shared partial block
    outputs, _ = run(s)
    for rid, k in ((2, 1), (3, 2)):
        want, _ = expected_output(p, 5, 256, stop_ids=(), first=fork_token(p.tolist(), k))
        assert [want[0], ups[rid][0]] + outputs[rid] == want
    assert s.block_manager.num_free_blocks == 32


def test_prefix_cache_hit_gives_the_same_tokens():
    s = make()
    s.add_request(1, prompt(13), max_tokens=6)
    miss, _ = run(s)
    s.add_request(2, prompt(13), max_tokens=6)
    out = s.schedule()
    assert out.num_computed.tolist() == [12] and out.num_tokens == 1
    s.update(np.array([next_token(prompt(13).tolist())], dtype=np.int32))
    hit, _ = run(s)
    assert [next_token(prompt(13).tolist())] + hit[2] == miss[1]
    st = s.stats()
    assert st["prefix_hits"] == 12 and st["cached_blocks"] >= 3
    assert st["used_blocks"] == 0 and st["waste_tokens"] == 0
