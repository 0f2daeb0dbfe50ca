"""LLMEngine: one step of serving, driven from Python (vLLM's LLMEngine).

The C++ core schedules (continuous batching, chunked prefill, prefix caching, preemption,
copy-on-write forks) and runs the model; this layer samples (flashpage.sampler), forks n > 1
sequences after the prompt, detokenizes incrementally, applies stop strings and assembles
RequestOutputs. Not thread-safe: one thread drives it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from flashpage import _core
from flashpage.detokenizer import IncrementalDetokenizer, find_stop
from flashpage.outputs import CompletionOutput, Logprob, RequestOutput
from flashpage.sampler import TokenLogprobs, sample, token_logprobs
from flashpage.sampling_params import SamplingParams
from flashpage.structured_outputs import GrammarError, StructuredOutputs, StructuredOutputsParams
from flashpage.tokenizer import Tokenizer

PromptType = str | dict[str, Any] | Sequence[int]


@dataclass(eq=False)
class _Sequence:
    """One of a request's n sequences: its own id in the core, sampler state and text."""
    core_id: int
    request: _Request
    params: SamplingParams
    output: CompletionOutput
    generator: torch.Generator | None
    detok: IncrementalDetokenizer | None
    finished: bool = False
    matcher: Any = None  # llguidance.LLMatcher of a structured output: what may come next


@dataclass(eq=False)
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output: RequestOutput
    seqs: list[_Sequence] = field(default_factory=list)
    forked: bool = False  # its n > 1 sequences exist in the core (true from the start for n = 1)
    hold: int = 0  # characters of text held back while a stop string may be completing


class LLMEngine:
    """Requests in (add_request), RequestOutputs out (step), over a `_core.Engine`."""

    def __init__(self, core: _core.Engine, tokenizer: Tokenizer | None = None, seed: int = 0,
                 scheduling_policy: str = "fcfs") -> None:
        self.core = core
        self.scheduling_policy = scheduling_policy
        self.scheduler = core.scheduler
        self.tokenizer = tokenizer
        info = core.info
        self.vocab_size = int(info["vocab_size"])
        self.max_model_len = int(info["max_model_len"])
        eos = set(info["eos_token_ids"]) | set(tokenizer.eos_token_ids if tokenizer else [])
        self.eos_token_ids = sorted(eos)
        self._generator = torch.Generator().manual_seed(seed)  # draws of requests without a seed
        self._requests: dict[str, _Request] = {}
        self._seqs: dict[int, _Sequence] = {}
        self._next_core_id = 0
        # Structured-output requests whose grammar is compiling (off this thread): they reach
        # the scheduler once it has, so a slow grammar never holds up other requests' steps.
        self._pending: dict[str, tuple[Future, Callable[[], None]]] = {}
        self._structured: StructuredOutputs | None = None
        self._structured_lock = threading.Lock()

    @property
    def structured_outputs(self) -> StructuredOutputs:
        with self._structured_lock:  # servers compile from their own threads
            if self._structured is None:
                if self.tokenizer is None:
                    raise ValueError("structured outputs need a tokenizer (this engine has none)")
                self._structured = StructuredOutputs(self.tokenizer.to_json(), self.vocab_size, self.eos_token_ids)
            return self._structured

    def compile_structured(self, params: StructuredOutputsParams) -> Future:
        """A future that raises GrammarError where the constraint does not compile (servers
        await it to answer 400 before accepting the request); compiled grammars are cached."""
        return self.structured_outputs.compile(params)

    # ---- requests ----------------------------------------------------------------------

    def prompt_ids(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        """A prompt as (text, token ids): a string, token ids, or vLLM's dict forms."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompts need a tokenizer; pass {'prompt_token_ids': [...]} instead")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), [int(t) for t in prompt["prompt_token_ids"]]
            if "prompt" in prompt:
                return self.prompt_ids(str(prompt["prompt"]))
            raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        return None, [int(t) for t in prompt]

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        """Queues a request. Raises ValueError for a duplicate id, an empty or over-long
        prompt, token ids outside the vocabulary, or parameters this engine cannot honour."""
        params = params or SamplingParams()
        if priority != 0 and self.scheduling_policy != "priority":
            raise ValueError(f"priority={priority} needs the priority scheduling policy (LLM(..., "
                             "scheduling_policy='priority'), flashpage serve --scheduling-policy priority)")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text, ids = self.prompt_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty")
        bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt token id {ids[bad]} at position {bad} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        self._check_vocab(params)
        detokenize = params.detokenize and self.tokenizer is not None
        if params.stop and not detokenize:
            raise ValueError("stop strings need detokenization (a tokenizer and detokenize=True)")
        max_tokens = params.max_tokens if params.max_tokens is not None else self.max_model_len - len(ids)
        req = _Request(request_id, ids, params, RequestOutput(request_id, text, ids), forked=params.n == 1)
        if params.stop and not params.include_stop_str_in_output:
            req.hold = max(len(s) for s in params.stop) - 1
        if params.prompt_logprobs is not None:
            req.output.prompt_logprobs = [None]
        for index in range(params.n):
            seed = None if params.seed is None else params.seed + index  # as vLLM's n > 1
            gen = torch.Generator().manual_seed(seed) if seed is not None else None
            detok = (IncrementalDetokenizer.after_prompt(self.tokenizer, ids, params.skip_special_tokens)
                     if detokenize else None)
            comp = CompletionOutput(index=index, text="", token_ids=[],
                                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                                    logprobs=[] if params.logprobs is not None else None)
            seq = _Sequence(self._next_core_id, req, params, comp, gen, detok)
            self._next_core_id += 1
            req.seqs.append(seq)
            req.output.outputs.append(comp)
        first = req.seqs[0]
        # Prompt logprobs need every prompt token computed: no prefix-cache hits (a key of its own).
        cache_key = (first.core_id + 1) if params.prompt_logprobs is not None else 0

        def admit() -> None:
            self.scheduler.add_request(
                first.core_id, np.asarray(ids, dtype=np.int32), max_tokens=max(1, max_tokens),
                min_tokens=params.min_tokens, stop_token_ids=params.stop_token_ids,
                eos_token_ids=self.eos_token_ids, ignore_eos=params.ignore_eos, priority=priority,
                cache_key=cache_key)
            self._seqs[first.core_id] = first

        if params.structured_outputs is not None:
            self._pending[request_id] = (self.compile_structured(params.structured_outputs), admit)
        else:
            admit()
        self._requests[request_id] = req

    def _check_vocab(self, params: SamplingParams) -> None:
        """Token ids in the parameters must be in the vocabulary; top_k at most its size."""
        V = self.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or ())):
            bad = next((t for t in ids if not 0 <= t < V), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {V})")
        if params.top_k > V:
            raise ValueError(f"top_k={params.top_k} exceeds the vocabulary size {V} (use -1 or 0 for all tokens)")

    def abort_request(self, request_id: str, error: BaseException | None = None) -> bool:
        """Ends a request (finish_reason "abort") and frees its KV blocks; False if unknown.
        `error`: what ended it, kept in its RequestOutput."""
        req = self._requests.pop(request_id, None)
        if req is None:
            return False
        self._pending.pop(request_id, None)
        req.output.error = error
        for seq in req.seqs:
            self.scheduler.abort_request(seq.core_id)
            self._seqs.pop(seq.core_id, None)
            if not seq.finished:
                seq.output.finish_reason = "abort"
                seq.finished = True
        req.output.finished = True
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    def get_num_unfinished_requests(self) -> int:
        return len(self._requests)

    # ---- one step ----------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Schedules, runs the model, samples and updates; returns the outputs of the requests
        that changed (text and token ids so far; finished=True once all n sequences are done)."""
        ended = self._admit_compiled() if self._pending else []
        st = self.scheduler.schedule()
        S = st.num_seqs
        if S == 0:
            if self._pending and not ended:  # only grammars compiling: wait a little, not spin
                wait([f for f, _ in self._pending.values()], timeout=0.01, return_when=FIRST_COMPLETED)
            return ended
        seqs = [self._seqs[i] for i in np.asarray(st.request_ids).tolist()]
        forked: list[int] = []
        try:
            sampled, fork_tokens, lp, by_seq, failed = self._forward_and_sample(st, seqs, forked)
        except BaseException as e:
            # Leave the scheduler consistent: end every request of this step, then close it.
            for seq in seqs:
                self.abort_request(seq.request.request_id, error=e)
            self.scheduler.update(np.zeros(S, dtype=np.int32), np.zeros(len(forked), dtype=np.int32))
            raise
        return ended + self._process_updates(sampled, fork_tokens, lp, by_seq, failed)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Schedules the requests whose grammar has compiled; ends those whose grammar failed."""
        ended = []
        for rid, (fut, admit) in list(self._pending.items()):
            if not fut.done():
                continue
            del self._pending[rid]
            req = self._requests[rid]
            try:
                template = fut.result()
            except Exception as e:  # noqa: BLE001 - GrammarError, or the compiler's own fault: this request's
                self.abort_request(rid, error=e)
                ended.append(req.output)
                continue
            for seq in req.seqs:
                seq.matcher = template.deep_copy()
            admit()
        return ended

    def _forward_and_sample(self, st, seqs: list[_Sequence], forked: list[int]):
        S = len(seqs)
        qsl = np.asarray(st.query_start_loc)
        computed = np.asarray(st.num_computed)
        do_sample = np.asarray(st.do_sample).astype(bool)

        # Rows of logits: each sequence's last token, or every token of a prompt chunk whose
        # prompt logprobs are wanted.
        wants_prompt_lp = [seq.request.params.prompt_logprobs is not None
                           and computed[s] < len(seq.request.prompt_ids) for s, seq in enumerate(seqs)]
        if any(wants_prompt_lp):
            spans = [np.arange(qsl[s], qsl[s + 1]) if wants_prompt_lp[s] else np.asarray(st.logits_indices)[s:s + 1]
                     for s in range(S)]
            indices = np.concatenate(spans).astype(np.int32)
            last_row = np.cumsum([len(x) for x in spans]) - 1
        else:
            indices = np.empty(0, dtype=np.int32)
            last_row = np.arange(S)
        rows = len(indices) or S
        # Grammar masks of the constrained sequences, computed while the model runs.
        constrained = [seq for s, seq in enumerate(seqs) if do_sample[s] and seq.matcher is not None]
        masks = self.structured_outputs.submit_masks([q.matcher for q in constrained]) if constrained else None
        # The logits where the backend computed them (no copy; on a GPU the sampler runs there),
        # valid until the next step.
        logits = torch.from_dlpack(self.core.execute(st, indices))
        if any(wants_prompt_lp):
            self._record_prompt_logprobs(seqs, logits, wants_prompt_lp, qsl, computed, last_row)

        # Sample: one row per sequence that yields a token, plus one per new fork (n > 1 after
        # its prompt: each fork draws its own first token from the parent's logits).
        plan: list[tuple[int, _Sequence]] = []  # (logits row, sequence)
        forks: list[_Sequence] = []
        for s in np.flatnonzero(do_sample).tolist():
            seq = seqs[s]
            plan.append((int(last_row[s]), seq))
            if not seq.request.forked:
                seq.request.forked = True
                for child in seq.request.seqs[1:]:
                    plan.append((int(last_row[s]), child))
                    forks.append(child)
        tokens: list[int] = []
        lp: TokenLogprobs | None = None
        failed: dict[str, BaseException] = {}
        if plan:
            picked = [r for r, _ in plan]
            x = logits if picked == list(range(rows)) else logits[torch.tensor(picked)]
            if masks is not None:  # a new fork's first token: its parent's mask (the same fresh grammar)
                row_of = {q.core_id: i for i, q in enumerate(constrained)}
                pairs = [(j, row_of.get(q.core_id, row_of.get(q.request.seqs[0].core_id)))
                         for j, (_, q) in enumerate(plan) if q.matcher is not None]
                bits = masks.result()
                order = [r for _, r in pairs]
                self.structured_outputs.apply(x, [j for j, _ in pairs],
                                              bits if order == list(range(len(bits))) else bits[order])
            res = sample(x, [q.params for _, q in plan], [q.generator for _, q in plan],
                         [q.request.prompt_ids for _, q in plan], [q.output.token_ids for _, q in plan],
                         default_generator=self._generator)
            tokens = res.tokens.tolist()
            lp = res.logprobs
            for j, err in res.errors.items():
                failed[plan[j][1].request.request_id] = err
        sampled = np.zeros(S, dtype=np.int32)
        by_seq: dict[int, int] = {}  # core id -> index into plan
        for j, (_, q) in enumerate(plan):
            by_seq[q.core_id] = j
        for s in np.flatnonzero(do_sample).tolist():
            sampled[s] = tokens[by_seq[seqs[s].core_id]]
        fork_tokens = []
        for child in forks:
            self.scheduler.fork_request(child.request.seqs[0].core_id, child.core_id)
            self._seqs[child.core_id] = child
            forked.append(child.core_id)
            fork_tokens.append(tokens[by_seq[child.core_id]])
        return sampled, fork_tokens, lp, by_seq, failed

    def _process_updates(self, sampled: np.ndarray, fork_tokens: list[int], lp: TokenLogprobs | None,
                         by_seq: dict[int, int], failed: dict[str, BaseException]) -> list[RequestOutput]:
        changed: dict[str, _Request] = {}
        ids, toks, reasons = self.scheduler.update(sampled, np.asarray(fork_tokens, dtype=np.int32))
        for cid, tok, reason in zip(ids.tolist(), toks.tolist(), reasons):
            seq = self._seqs.get(cid)
            if seq is None or seq.request.request_id in failed:
                continue
            changed[seq.request.request_id] = seq.request
            try:
                self._apply_update(seq, cid, tok, reason, lp, by_seq.get(cid))
            except Exception as e:  # noqa: BLE001 - this request's text (a tokenizer error): end it alone
                failed[seq.request.request_id] = e
        for rid, err in failed.items():  # a request's own fault (processor, detokenization): end it alone
            req = self._requests.get(rid)
            if req is not None:
                self.abort_request(rid, error=err)
                changed[rid] = req
        outputs = []
        for req in changed.values():
            if all(q.finished for q in req.seqs):
                req.output.finished = True
                self._requests.pop(req.request_id, None)
            outputs.append(req.output)
        return outputs

    # ---- per token ---------------------------------------------------------------------

    def _apply_update(self, seq: _Sequence, cid: int, tok: int, reason: str | None, lp: TokenLogprobs | None,
                      j: int | None) -> None:
        stop = None
        if tok >= 0:
            if seq.matcher is not None and not seq.matcher.consume_token(tok):
                raise GrammarError(f"structured output: {seq.matcher.get_error().strip()}")
            # A stop id or eos ends the sequence: its text is left out unless asked for (as vLLM).
            text = reason != "stop" or seq.params.include_stop_str_in_output
            stop = self._append(seq, tok, lp, j, text)
        grammar_done = seq.matcher is not None and seq.matcher.is_stopped()  # nothing but eos may follow
        if reason is None and (stop is not None or grammar_done):
            self.scheduler.finish_request(cid, "stop")
            reason = "stop"
        if reason is not None:
            self._finish(seq, reason, stop)

    def _append(self, seq: _Sequence, token: int, lp: TokenLogprobs | None, j: int | None,
                text: bool = True) -> str | None:
        """Adds a sampled token to the sequence's output (and to its text unless text=False);
        returns a stop string it completed."""
        out, params = seq.output, seq.params
        out.token_ids.append(token)
        if out.logprobs is not None and lp is not None and j is not None:
            entry = self._logprob_entry(lp, j, token, params.logprobs or 0)
            out.logprobs.append(entry)
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + entry[token].logprob
        if seq.detok is None or not text:
            return None
        delta = seq.detok.add(token)
        return self._show(seq, len(delta))

    def _show(self, seq: _Sequence, new_chars: int) -> str | None:
        """Updates the visible text; returns the stop string found in it, if any."""
        params, text = seq.params, seq.detok.text
        if params.stop and len(seq.output.token_ids) >= params.min_tokens and new_chars > 0:
            hit = find_stop(text, new_chars, params.stop, params.include_stop_str_in_output)
            if hit is not None:
                seq.output.text = text[:hit[1]]
                return hit[0]
        hold = seq.request.hold
        seq.output.text = text[:len(text) - hold] if hold else text
        return None

    def _finish(self, seq: _Sequence, reason: str, stop: str | None) -> None:
        out = seq.output
        if stop is None and seq.detok is not None:
            tail = seq.detok.flush()
            stop = self._show(seq, len(tail)) if tail else None
            if stop is None:
                out.text = seq.detok.text
        out.finish_reason = reason
        if stop is not None:
            out.stop_reason = stop
            out.finish_reason = "stop"
        elif reason == "stop" and out.token_ids and out.token_ids[-1] in seq.params.stop_token_ids:
            out.stop_reason = out.token_ids[-1]
        seq.finished = True
        self._seqs.pop(seq.core_id, None)

    def _decoded(self, token: int) -> str | None:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else None

    def _logprob_entry(self, lp: TokenLogprobs, j: int, token: int, k: int) -> dict[int, Logprob]:
        entry = {token: Logprob(float(lp.logprobs[j]), int(lp.ranks[j]), self._decoded(token))}
        if k > 0 and lp.top_ids is not None:
            for r, (t, v) in enumerate(zip(lp.top_ids[j, :k].tolist(), lp.top_logprobs[j, :k].tolist())):
                entry.setdefault(t, Logprob(v, r + 1, self._decoded(t)))
        return entry

    def _record_prompt_logprobs(self, seqs: list[_Sequence], logits: torch.Tensor, wants: list[bool],
                                qsl: np.ndarray, computed: np.ndarray, last_row: np.ndarray) -> None:
        """Logits at position p score the prompt token at p + 1; positions already recorded
        (recomputed after a preemption) are skipped."""
        for s, seq in enumerate(seqs):
            if not wants[s]:
                continue
            req = seq.request
            n = int(qsl[s + 1] - qsl[s])
            first_row = int(last_row[s]) - n + 1
            start = len(req.output.prompt_logprobs) - 1  # scores the first prompt token not yet recorded
            targets = [(first_row + i, p + 1) for i, p in enumerate(range(int(computed[s]), int(computed[s]) + n))
                       if start <= p and p + 1 < len(req.prompt_ids)]
            if not targets:
                continue
            rows = torch.tensor([r for r, _ in targets])
            ids = torch.tensor([req.prompt_ids[p] for _, p in targets])
            lp = token_logprobs(torch.log_softmax(logits[rows], -1), ids, req.params.prompt_logprobs)
            for j, (_, p) in enumerate(targets):
                req.output.prompt_logprobs.append(
                    self._logprob_entry(lp, j, req.prompt_ids[p], req.params.prompt_logprobs))
