"""Property-based tests: random workloads (prompt lengths, shared prefixes, forks, aborts,
tiny pools that force preemption, both policies) driven through the scheduler, with the
invariants checked after every schedule() and update()."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fake_model import EOS, VOCAB, expected_output, fork_token, next_token
from flashpage import RequestRejected, Scheduler, SchedulerConfig

# CI runs at least 2,000 random workloads; FLASHPAGE_HYPOTHESIS_EXAMPLES raises it locally.
EXAMPLES = int(os.environ.get("FLASHPAGE_HYPOTHESIS_EXAMPLES", "2000"))
MAX_STEPS = 3000


@dataclass
class Spec:
    rid: int
    arrive: int  # step at which it is added
    prompt: list[int]
    max_tokens: int
    min_tokens: int
    priority: int
    n: int  # 1 + number of forks after the prompt
    abort_at: int | None  # step at which it is aborted (None: never)
    abort_mid_step: bool  # abort between schedule() and update()


@dataclass
class Workload:
    num_blocks: int
    block_size: int
    max_seqs: int
    budget: int
    max_model_len: int
    policy: str
    specs: list[Spec] = field(default_factory=list)


@st.composite
def workloads(draw) -> Workload:
    block_size = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    num_blocks = draw(st.integers(2, 40))
    max_seqs = draw(st.integers(1, 8))
    w = Workload(
        num_blocks=num_blocks,
        block_size=block_size,
        max_seqs=max_seqs,
        budget=draw(st.integers(max_seqs, 64)),
        max_model_len=draw(st.integers(8, 96)),
        policy=draw(st.sampled_from(["fcfs", "priority"])),
    )
    prefixes = draw(st.lists(st.lists(st.integers(1, VOCAB - 1), max_size=40), min_size=1, max_size=3))
    for rid in range(draw(st.integers(1, 10))):
        prefix = draw(st.sampled_from(prefixes))
        suffix = draw(st.lists(st.integers(1, VOCAB - 1), max_size=12))
        prompt = (prefix + suffix) or [1]
        max_tokens = draw(st.integers(1, 40))
        aborted = draw(st.integers(0, 5)) == 0
        w.specs.append(Spec(
            rid=rid * 10,  # room for fork ids rid*10+k
            arrive=draw(st.integers(0, 12)),
            prompt=prompt,
            max_tokens=max_tokens,
            min_tokens=draw(st.integers(0, max_tokens)),
            priority=draw(st.integers(0, 3)) if w.policy == "priority" else 0,
            n=draw(st.sampled_from([1, 1, 1, 2, 3])),
            abort_at=draw(st.integers(0, 40)) if aborted else None,
            abort_mid_step=draw(st.booleans()),
        ))
    return w


class Checker:
    """Runs a workload and checks the invariants; the fake model supplies the tokens."""

    def __init__(self, w: Workload):
        self.w = w
        self.s = Scheduler(SchedulerConfig(
            num_blocks=w.num_blocks, block_size=w.block_size, max_num_batched_tokens=w.budget,
            max_num_seqs=w.max_seqs, max_model_len=w.max_model_len, policy=w.policy))
        self.bm = self.s.block_manager
        self.live: set[int] = set()  # ids known to the scheduler
        self.outputs: dict[int, list[int]] = {}
        self.reasons: dict[int, str] = {}
        self.aborted: set[int] = set()
        self.rejected: set[int] = set()
        self.spec_of: dict[int, Spec] = {}
        self.fork_index: dict[int, int] = {}  # child id -> k
        self.parent_of: dict[int, int] = {}
        # Each live request's tokens as the test saw them go in and come out. The scheduler's
        # own view (tokens(), which flushes its recent-token buffer) is compared with it only
        # every few steps, so that buffer fills up as it does in a real engine loop.
        self.hist: dict[int, list[int]] = {}

    # --- invariants -------------------------------------------------------------------------
    def check_pool(self) -> None:
        bs, bm = self.w.block_size, self.bm
        owners: dict[int, list[tuple[int, int]]] = {}
        for rid in self.live:
            table = self.s.block_table(rid)
            assert len(set(table)) == len(table), "a table holds a block twice"
            for idx, b in enumerate(table):
                owners.setdefault(b, []).append((rid, idx))
        used = 0
        for b in range(self.w.num_blocks):
            ref = bm.ref_count(b)
            assert ref == len(owners.get(b, [])), f"block {b}: ref {ref} != owners {owners.get(b)}"
            used += ref > 0
        assert bm.num_free_blocks == self.w.num_blocks - used
        # Shared blocks are shared by design: same position in every owner, same content in
        # the part each owner has computed.
        for b, holders in owners.items():
            if len(holders) < 2:
                continue
            idxs = {idx for _, idx in holders}
            assert len(idxs) == 1, f"block {b} shared at different positions {holders}"
            (idx,) = idxs
            contents = []
            for rid, _ in holders:
                computed = self.s.num_computed_tokens(rid)
                contents.append(self.hist[rid][idx * bs:min((idx + 1) * bs, computed)])
            longest = max(contents, key=len)
            for c in contents:
                assert c == longest[:len(c)], f"block {b} shared by owners with different tokens"
        # Identical prefixes map to identical cached blocks: one cached block per content.
        seen: dict[tuple[int, ...], int] = {}
        hashes: dict[int, int] = {}
        for b, holders in owners.items():
            if not bm.is_cached(b):
                continue
            h = bm.block_hash(b)
            assert hashes.setdefault(h, b) == b, "two cached blocks with one hash"
            rid, idx = holders[0]
            key = tuple(self.hist[rid][:(idx + 1) * bs])
            assert seen.setdefault(key, b) == b, f"prefix {key} cached in two blocks"

    def check_step(self, out) -> None:
        assert out.num_tokens <= self.w.budget
        assert out.num_seqs <= self.w.max_seqs
        assert out.query_start_loc[-1] == out.num_tokens if out.num_seqs else True
        bs = self.w.block_size
        for i in range(out.num_seqs):
            rid = int(out.request_ids[i])
            table = self.s.block_table(rid)
            lo, hi = out.query_start_loc[i], out.query_start_loc[i + 1]
            assert hi > lo
            assert out.context_lens[i] == out.num_computed[i] + (hi - lo)
            toks = self.hist[rid]
            for t in range(lo, hi):
                pos = int(out.positions[t])
                assert out.token_ids[t] == toks[pos]
                block = table[pos // bs]
                assert out.slot_mapping[t] == block * bs + pos % bs
                assert self.bm.ref_count(block) == 1, "a write into a shared block (no CoW)"
        for src, dst in out.block_copies.tolist():
            assert src != dst

    # --- driving ----------------------------------------------------------------------------
    def add_arrivals(self, step_no: int) -> None:
        for sp in self.w.specs:
            if sp.arrive != step_no:
                continue
            self.spec_of[sp.rid] = sp
            try:
                self.s.add_request(sp.rid, np.array(sp.prompt, dtype=np.int32),
                                   max_tokens=sp.max_tokens, min_tokens=sp.min_tokens,
                                   eos_token_ids=[EOS], priority=sp.priority)
            except RequestRejected:
                kv = min(len(sp.prompt) + sp.max_tokens - 1,
                         max(len(sp.prompt), self.w.max_model_len - 1))
                assert len(sp.prompt) > self.w.max_model_len or \
                    -(-kv // self.w.block_size) > self.w.num_blocks
                self.rejected.add(sp.rid)
                continue
            self.live.add(sp.rid)
            self.hist[sp.rid] = list(sp.prompt)

    def abort(self, step_no: int, mid_step: bool) -> None:
        for sp in self.w.specs:
            if sp.abort_at == step_no and sp.abort_mid_step == mid_step:
                for rid in [sp.rid] + [sp.rid + k for k in range(1, sp.n)]:
                    if rid in self.live:
                        assert self.s.abort_request(rid)
                        self.live.discard(rid)
                        self.aborted.add(rid)

    def run(self) -> None:
        last_arrival = max(sp.arrive for sp in self.w.specs)
        for step_no in range(MAX_STEPS):
            self.add_arrivals(step_no)
            self.abort(step_no, mid_step=False)
            if not self.s.has_unfinished and step_no > last_arrival:
                break
            out = self.s.schedule()
            self.check_step(out)
            self.check_pool()
            self.abort(step_no, mid_step=True)
            if out.num_seqs == 0:
                continue
            sampled = np.zeros(out.num_seqs, dtype=np.int32)
            fork_tokens = []
            for i in range(out.num_seqs):
                rid = int(out.request_ids[i])
                if not out.do_sample[i] or rid not in self.live:
                    continue
                toks = self.hist[rid]
                sampled[i] = next_token(toks)
                sp = self.spec_of.get(rid)
                # Fork after the prompt, on the step that samples the first token.
                if sp is not None and sp.n > 1 and len(toks) == len(sp.prompt) and \
                        rid not in self.outputs:
                    for k in range(1, sp.n):
                        child = rid + k
                        if child in self.live or child in self.reasons or child in self.aborted:
                            continue
                        self.s.fork_request(rid, child)
                        self.live.add(child)
                        self.fork_index[child] = k
                        self.parent_of[child] = rid
                        self.hist[child] = list(toks)
                        fork_tokens.append(fork_token(toks, k))
            ids, toks, reasons = self.s.update(sampled, np.array(fork_tokens, dtype=np.int32))
            for rid, tok, reason in zip(ids.tolist(), toks.tolist(), reasons):
                self.outputs.setdefault(rid, []).append(tok)
                self.hist[rid].append(tok)
                if reason is not None:
                    self.reasons[rid] = reason
                    self.live.discard(rid)
            self.check_pool()
            if step_no % 7 == 6:
                for rid in self.live:
                    assert self.s.tokens(rid) == self.hist[rid], f"request {rid}: tokens differ"
        else:
            raise AssertionError(f"not finished after {MAX_STEPS} steps: starvation or livelock")

    def check_final(self) -> None:
        assert not self.s.has_unfinished and not self.live
        stats = self.s.stats()
        assert stats["used_blocks"] == 0 and stats["free_blocks"] == self.w.num_blocks
        for sp in self.w.specs:
            if sp.rid in self.rejected:
                continue
            for k in range(sp.n):
                rid = sp.rid + k
                if rid in self.aborted or (k > 0 and rid not in self.fork_index):
                    continue
                first = fork_token(sp.prompt, k) if k else None
                want, why = expected_output(sp.prompt, sp.max_tokens, self.w.max_model_len,
                                            min_tokens=sp.min_tokens, first=first)
                assert self.outputs.get(rid) == want, f"request {rid}: wrong output"
                assert self.reasons.get(rid) == why


def workload_settings(examples: int):
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def check_workload(w: Workload) -> Checker:
    c = Checker(w)
    c.run()
    c.check_final()
    return c


@workload_settings(EXAMPLES)
@given(workloads())
def test_random_workloads_keep_every_invariant(w: Workload):
    check_workload(w)


def test_the_workloads_exercise_preemption_forks_aborts_and_prefix_hits():
    """Guards the generator: the random workloads must reach the paths they are meant to test."""
    seen = {"preemptions": 0, "priority_preemptions": 0, "forks": 0, "aborts": 0,
            "prefix_hits": 0, "rejected": 0}

    @workload_settings(300)
    @given(workloads())
    def run_one(w: Workload):
        c = check_workload(w)
        stats = c.s.stats()
        preempted = stats["num_preemptions"] > 0
        seen["preemptions"] += preempted
        seen["priority_preemptions"] += preempted and w.policy == "priority"
        seen["forks"] += bool(c.fork_index)
        seen["aborts"] += bool(c.aborted)
        seen["prefix_hits"] += stats["prefix_hits"] > 0
        seen["rejected"] += bool(c.rejected)

    run_one()
    assert all(v >= 10 for v in seen.values()), seen
