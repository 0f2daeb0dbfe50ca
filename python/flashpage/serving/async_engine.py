"""AsyncLLMEngine: the engine loop in a thread of its own, requests as asyncio streams.

One background thread owns the LLMEngine (which is not thread-safe): it applies the requests
and aborts that callers queue, steps while there is work, and hands each request's new tokens
and text to that request's asyncio queue. The model runs without the GIL (the core releases
it), so event loops serving HTTP and gRPC keep running meanwhile.

- Each `generate()` is an async iterator of deltas: RequestOutputs whose CompletionOutputs hold
  only what is new since the previous one (text, token ids, logprobs), the last one with the
  finish reason. Leaving the iteration early (a client that went away, a cancelled task)
  aborts the request and frees its KV blocks.
- Isolation: a request the engine refuses (bad parameters, a prompt too long) or that fails on
  its own (a raising logits processor) ends with its exception raised from its own iterator;
  the loop and the other requests go on.
- Backpressure: admission counts sequences (a request of n = 8 is 8): with
  `max_waiting_requests` sequences waiting, generate() raises EngineOverloaded at once instead
  of queueing without bound.
- Request ids are the engine's own, random (uuid4): a client's id is a label it gets back,
  never a key another client could reach.
- Shutdown: `drain()` refuses new requests while running ones finish; `shutdown()` ends what is
  left with a final delta (finish_reason "abort"), so every stream ends properly.
- Health: a watchdog marks the engine unhealthy when one step has run for more than
  `watchdog_seconds` (a wedged loop), so an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flashpage.engine import LLMEngine, PromptType
from flashpage.serving.metrics import Metrics
from flashpage.outputs import CompletionOutput, RequestOutput
from flashpage.sampling_params import SamplingParams


class EngineOverloaded(RuntimeError):
    """Too many requests are waiting; retry later (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""


class EngineUnavailable(RuntimeError):
    """The engine is draining or stopped (HTTP 503, gRPC UNAVAILABLE)."""


_DONE = object()  # end of a request's stream


@dataclass(eq=False)
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float
    first_token: float | None = None
    sent_tokens: list[int] = field(default_factory=list)  # per sequence: token ids delivered
    sent_chars: list[int] = field(default_factory=list)  # per sequence: characters delivered
    sent_finished: list[bool] = field(default_factory=list)  # per sequence: finish reason delivered
    sent_prompt_logprobs: bool = False

    def push(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop is closed: nobody is listening
            pass


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for q, item in items:
        q.put_nowait(item)


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, *, model_name: str = "flashpage",
                 max_waiting_requests: int = 1024, metrics: Metrics | None = None,
                 watchdog_seconds: float = 60.0, cpu_workers: int = 2,
                 on_step: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step  # run on the engine thread after every step (KV-cache events)
        self.model_name = model_name
        self.max_waiting_requests = max_waiting_requests
        self.watchdog_seconds = watchdog_seconds
        self.metrics = metrics or Metrics(model_name)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}  # touched by the engine thread only
        self._pending = 0  # sequences of generate() calls the engine thread has not taken yet
        self._waiting = 0  # sequences waiting for their first step after the last step
        self._lock = threading.Lock()
        self._draining = False
        self._stopped = threading.Event()
        self._error: BaseException | None = None
        self._step_started: float | None = None  # when the step in progress began (None: none is)
        # Tokenizing and rendering templates: CPU work kept off the event loops serving requests.
        self._cpu = ThreadPoolExecutor(max_workers=cpu_workers, thread_name_prefix="flashpage-cpu")
        self._thread = threading.Thread(target=self._loop, name="flashpage-engine", daemon=True)
        self._thread.start()

    # ---- callers (any thread / event loop) -------------------------------------------------

    @property
    def is_running(self) -> bool:
        return not self._stopped.is_set() and not self._draining

    @property
    def is_healthy(self) -> bool:
        """Running, and not wedged: a step in progress for at most watchdog_seconds."""
        if self._stopped.is_set():
            return False
        started = self._step_started
        return started is None or time.monotonic() - started <= self.watchdog_seconds

    def num_unfinished(self) -> int:
        return len(self._streams) + self._pending

    async def run_cpu(self, fn: Callable, *args):
        """fn(*args) on the engine's CPU workers (tokenizing, chat templates), off the loop."""
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn, *args)

    def reserve(self, sequences: int) -> None:
        """Admits `sequences` at once (a request of several prompts: all or none), for
        generate(..., reserved=True) calls; raises EngineOverloaded or EngineUnavailable."""
        self._check_open()
        if sequences > self.max_waiting_requests:
            raise ValueError(f"the request has {sequences} sequences (n x prompts); this server admits at most "
                             f"{self.max_waiting_requests} waiting (--max-waiting-requests)")
        with self._lock:
            if self._waiting + self._pending + sequences > self.max_waiting_requests:
                self.metrics.requests_rejected.inc()
                raise EngineOverloaded(f"{self._waiting + self._pending} sequences are waiting "
                                       f"(max_waiting_requests={self.max_waiting_requests}); retry later")
            self._pending += sequences

    def _check_open(self) -> None:
        if self._draining or self._stopped.is_set():
            raise EngineUnavailable("the engine is shutting down" if self._error is None
                                    else f"the engine stopped: {self._error}")

    async def generate(self, prompt: PromptType, params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       reserved: bool = False) -> AsyncIterator[RequestOutput]:
        """Streams the request's deltas; raises its error (ValueError for a refused request).
        request_id is the caller's label only: the engine keys requests by ids of its own."""
        params = params or SamplingParams()
        if not reserved:
            self.reserve(params.n)
        rid = uuid.uuid4().hex
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), time.monotonic())
        self._commands.put(("add", rid, prompt, params, priority, stream))
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if item is _DONE:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:  # the caller stopped listening: free the request's blocks
                self._commands.put(("abort", rid))

    def drain(self) -> None:
        """New requests: EngineUnavailable (503 / UNAVAILABLE); running ones go on."""
        self._draining = True

    def shutdown(self, timeout: float | None = 30.0, drain: bool = True) -> None:
        """Refuses new requests; with drain, lets running ones finish (up to timeout); then
        ends whatever is left with a final delta (finish_reason "abort") and stops the loop."""
        self._draining = True
        self._commands.put(("stop", drain))
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._commands.put(("stop", False))
            self._thread.join()
        self._cpu.shutdown(wait=False, cancel_futures=True)

    # ---- the engine thread ------------------------------------------------------------------

    def _loop(self) -> None:
        draining = False
        try:
            while True:
                idle = not self.engine.has_unfinished_requests()
                try:
                    cmd = self._commands.get(timeout=0.5) if idle and not draining else self._commands.get_nowait()
                except queue.Empty:
                    cmd = None
                applied = cmd is not None
                while cmd is not None:
                    if cmd[0] == "stop":
                        draining = True
                        if not cmd[1]:
                            return
                    else:
                        self._apply(cmd)
                    try:
                        cmd = self._commands.get_nowait()
                    except queue.Empty:
                        cmd = None
                if draining and not self.engine.has_unfinished_requests():
                    return
                if self.engine.has_unfinished_requests():
                    self._step_started = time.monotonic()
                    try:
                        outputs = self.engine.step()
                    except Exception as e:  # noqa: BLE001 - the step's requests were ended with it
                        self._fail_dropped(e)
                        continue
                    finally:
                        self._step_started = None
                        if self.on_step is not None:
                            self.on_step()
                    self._deliver(outputs)
                    self._observe()
                elif applied:  # aborts while idle: the gauges must not wait for the next step
                    self._observe()
        except BaseException as e:  # a fault of the engine itself: every request ends with it
            self._error = e
        finally:
            self._stopped.set()
            self._end_all()

    def _observe(self) -> None:
        stats = self.engine.scheduler.stats()
        # Sequences not yet forked (n > 1 before its prompt ran) count n in admission.
        unforked = sum(r.params.n - 1 for r in self.engine._requests.values() if not r.forked)
        self._waiting = stats["num_waiting"] + unforked
        self.metrics.observe_scheduler(stats)

    def _end_all(self) -> None:
        """The loop stopped: a clean stop ends each stream with a final "abort" delta, a fault
        with its error; requests queued but never taken hear EngineUnavailable."""
        end = EngineUnavailable("the engine stopped" + (f": {self._error}" if self._error else ""))
        for rid, stream in list(self._streams.items()):
            req = self.engine._requests.get(rid)
            try:
                self.engine.abort_request(rid)
            except Exception:  # noqa: BLE001 - a broken engine: the stream still ends
                req = None
            if self._error is None and req is not None:
                self.metrics.finished("abort")
                stream.push(self._delta(req.output, stream))
                stream.push(_DONE)
            else:
                stream.push(end)
        self._streams.clear()
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                cmd[5].push(end)
        try:
            self._observe()
        except Exception:  # noqa: BLE001 - metrics of a broken engine
            pass

    def _fail_dropped(self, error: Exception) -> None:
        """After a failed step: the requests the engine ended hear the error; the rest go on."""
        for rid in [r for r in self._streams if r not in self.engine._requests]:
            self.metrics.finished("error")
            self._streams.pop(rid).push(error)

    def _apply(self, cmd: tuple) -> None:
        if cmd[0] == "abort":
            stream = self._streams.pop(cmd[1], None)
            if self.engine.abort_request(cmd[1]) and stream is not None:
                self.metrics.finished("abort")
            return
        _, rid, prompt, params, priority, stream = cmd
        with self._lock:
            self._pending -= params.n
        try:
            self.engine.add_request(rid, prompt, params, priority=priority)
        except Exception as e:  # refused: only this request hears of it
            self.metrics.requests_rejected.inc()
            stream.push(e)
            return
        self._streams[rid] = stream
        req = self.engine._requests[rid]
        self.metrics.prompt_tokens.inc(len(req.prompt_ids))
        stream.sent_tokens = [0] * params.n
        stream.sent_chars = [0] * params.n
        stream.sent_finished = [False] * params.n

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """A step's deltas, handed to each event loop in one call (one wake-up of its loop a
        step, not one per request)."""
        now = time.monotonic()
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}

        def push(stream: _Stream, item: object) -> None:
            batches.setdefault(stream.loop, []).append((stream.queue, item))
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            delta = self._delta(out, stream)
            new_tokens = sum(len(c.token_ids) for c in delta.outputs)
            self.metrics.generation_tokens.inc(new_tokens)
            if new_tokens and stream.first_token is None:
                stream.first_token = now
                self.metrics.time_to_first_token.observe(now - stream.arrival)
            if out.error is not None:
                del self._streams[out.request_id]
                self.metrics.finished("error")
                push(stream, out.error)
                continue
            push(stream, delta)
            if out.finished:
                del self._streams[out.request_id]
                self._observe_finish(out, stream, now)
                push(stream, _DONE)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop is closed: nobody is listening
                pass

    def _observe_finish(self, out: RequestOutput, stream: _Stream, now: float) -> None:
        self.metrics.e2e_latency.observe(now - stream.arrival)
        n = max(len(c.token_ids) for c in out.outputs) if out.outputs else 0
        if stream.first_token is not None and n > 1:
            self.metrics.time_per_output_token.observe((now - stream.first_token) / (n - 1))
        for c in out.outputs:
            self.metrics.finished(c.finish_reason or "abort")

    @staticmethod
    def _delta(out: RequestOutput, stream: _Stream) -> RequestOutput:
        """What is new in out since the stream's last delta (out is cumulative and mutated in
        place by the engine, so the delta copies what it carries): the sequences with new
        tokens, text or a finish reason not yet sent, each with its index."""
        comps = []
        for c in out.outputs:
            i = c.index
            t0, c0 = stream.sent_tokens[i], stream.sent_chars[i]
            text = c.text[c0:] if len(c.text) > c0 else ""
            if not text and len(c.token_ids) == t0 and (c.finish_reason is None or stream.sent_finished[i]):
                continue
            stream.sent_finished[i] = c.finish_reason is not None
            comps.append(CompletionOutput(
                index=i, text=text, token_ids=list(c.token_ids[t0:]), cumulative_logprob=c.cumulative_logprob,
                logprobs=list(c.logprobs[t0:]) if c.logprobs is not None else None,
                finish_reason=c.finish_reason, stop_reason=c.stop_reason))
            stream.sent_tokens[i] = len(c.token_ids)
            stream.sent_chars[i] = max(c0, len(c.text))
        delta = RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, comps, out.finished)
        prompt_done = out.finished or any(c.token_ids for c in out.outputs)
        if out.prompt_logprobs is not None and prompt_done and not stream.sent_prompt_logprobs:
            delta.prompt_logprobs = list(out.prompt_logprobs)
            stream.sent_prompt_logprobs = True
        return delta
