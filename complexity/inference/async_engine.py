"""Run an Engine in one background thread and talk to it from asyncio.

The thread owns the model: it drains a command inbox (add / abort), runs `engine.step()` while
there is work and sleeps on an event otherwise. Outputs go to per-request asyncio queues through
`loop.call_soon_threadsafe`, so coroutines `async for` over a request's outputs. Admission limits
(in-flight requests, prompt tokens waiting for a slot) are checked at `submit` and raise
`EngineOverloaded` (the server answers 429).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .engine import Engine, StepOutput
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloaded(Exception):
    """Too many requests in flight or too many prompt tokens queued."""


class EngineStopped(Exception):
    """The engine is shutting down."""


class Histogram:
    """A Prometheus-style cumulative histogram."""

    def __init__(self, buckets):
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0
        self._values: deque[float] = deque(maxlen=10000)

    def observe(self, value: float) -> None:
        for i, b in enumerate(self.buckets):
            if value <= b:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1
        self._values.append(value)

    def quantile(self, q: float) -> float | None:
        vals = sorted(self._values)
        if not vals:
            return None
        return vals[min(len(vals) - 1, int(q * len(vals)))]


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class RequestStream:
    request_id: str
    num_prompt_tokens: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    queued: bool = True  # still counted in queued tokens
    finished: bool = False

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        while True:
            out: StepOutput = await self.queue.get()
            yield out
            if out.finished:
                return


class AsyncEngine:
    def __init__(self, engine: Engine, *, max_concurrent: int | None = None, max_queued_tokens: int | None = None):
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.max_queued_tokens = max_queued_tokens
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._draining = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._streams: dict[str, RequestStream] = {}
        self._counter = 0
        self.inflight = 0
        self.queued_tokens = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.finish_reasons: dict[str, int] = {}
        self.rejected = 0
        self.errors = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="complexity-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever is still queued or running (clients get finish_reason "abort") and join."""
        if self._thread is None:
            return
        with self._lock:
            self._inbox.append(("shutdown",))
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout)
        self._thread = None

    def drain(self, timeout: float) -> None:
        """Begin a graceful shutdown (thread safe, e.g. from a signal handler): refuse new requests
        (EngineStopped -> 503), let the in-flight ones finish for up to `timeout` seconds, then
        cancel the rest (their streams end normally with finish_reason "abort")."""
        self._draining = True
        self._drain_deadline = time.monotonic() + max(0.0, timeout)
        self._wake.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping and not self._draining

    # ------------------------------------------------------------------ requests (event loop side)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None) -> RequestStream:
        """Queue one request (validated by the caller); returns its output stream."""
        return self.submit_many([(prompt_ids, params)], [request_id] if request_id else None)[0]

    def submit_many(self, items: list[tuple[list[int], SamplingParams]], request_ids: list[str] | None = None) -> list[RequestStream]:
        """Queue several requests at once: all are admitted or none (EngineOverloaded)."""
        if not self.running:
            raise EngineStopped("the engine is not running (shutting down)")
        loop = asyncio.get_running_loop()
        tokens = sum(len(ids) for ids, _ in items)
        with self._lock:
            if self.max_concurrent is not None and self.inflight + len(items) > self.max_concurrent:
                self.rejected += 1
                raise EngineOverloaded(
                    f"too many concurrent requests ({self.inflight} in flight + {len(items)} > limit {self.max_concurrent}); retry later")
            if self.max_queued_tokens is not None and self.queued_tokens + tokens > self.max_queued_tokens:
                self.rejected += 1
                raise EngineOverloaded(
                    f"too many queued prompt tokens ({self.queued_tokens} queued + {tokens} > limit {self.max_queued_tokens}); retry later")
            streams = []
            queue: asyncio.Queue = asyncio.Queue()  # one queue: a multi-choice request reads all its outputs in order
            for i, (ids, params) in enumerate(items):
                self._counter += 1
                rid = request_ids[i] if request_ids else f"r{self._counter}"
                stream = RequestStream(rid, len(ids), loop, queue)
                self._streams[rid] = stream
                self.inflight += 1
                self.queued_tokens += len(ids)
                self._inbox.append(("add", list(ids), params, rid, stream))
                streams.append(stream)
        self._wake.set()
        return streams

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict:
        e = self.engine
        return {
            "running": e.num_running,
            "waiting": e.num_waiting,
            "inflight": self.inflight,
            "queued_tokens": self.queued_tokens,
            "free_slots": len(e.free_slots),
            "max_batch": e.max_batch,
            **e.stats,
        }

    # ------------------------------------------------------------------ the engine thread

    def _deliver(self, stream: RequestStream, out: StepOutput) -> None:
        now = time.perf_counter()
        with self._lock:
            if stream.queued and (out.new_token_ids or out.prompt_logprobs is not None or out.finished):
                stream.queued = False
                self.queued_tokens -= stream.num_prompt_tokens
            if out.finished and not stream.finished:
                stream.finished = True
                self.inflight -= 1
                self._streams.pop(stream.request_id, None)
        if out.new_token_ids and stream.first_token is None:
            stream.first_token = now
            self.ttft.observe(now - stream.submitted)
        if out.finished:
            self.latency.observe(now - stream.submitted)
            reason = out.finish_reason or "unknown"
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
            if reason == "error":
                self.errors += 1
            self.engine.release(stream.request_id)
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)
        except RuntimeError:  # the loop is closed (shutdown)
            pass

    def _handle(self, cmd) -> bool:
        kind = cmd[0]
        if kind == "add":
            _, ids, params, rid, stream = cmd
            try:
                self.engine.add_request(ids, params, request_id=rid, callback=lambda o, s=stream: self._deliver(s, o))
            except Exception as err:  # validated before, but never let one request kill the loop
                self._deliver(stream, StepOutput(rid, [], "", None, None, True, "error", len(ids), 0, error=str(err)))
        elif kind == "abort":
            self.engine.abort(cmd[1])
        elif kind == "shutdown":
            return False
        return True

    def _run(self) -> None:
        alive = True
        while alive:
            self._wake.clear()
            while True:
                with self._lock:
                    cmd = self._inbox.popleft() if self._inbox else None
                if cmd is None:
                    break
                alive = self._handle(cmd) and alive
            if not alive:
                break
            if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline:
                self._drain_deadline = None
                for rid in [r.request_id for r in list(self.engine.waiting) + list(self.engine.running.values())]:
                    self.engine.abort(rid)
            if self.engine.has_unfinished():
                try:
                    self.engine.step()
                except Exception:  # step already fails the affected requests; keep serving
                    logger.exception("engine step failed")
            else:
                self._wake.wait(0.1)
        # shutdown: cancel everything still queued or running
        for rid in [r.request_id for r in list(self.engine.waiting) + list(self.engine.running.values())]:
            self.engine.abort(rid)
        with self._lock:
            pending = [c for c in self._inbox if c[0] == "add"]
            self._inbox.clear()
        for _, ids, _, rid, stream in pending:
            self._deliver(stream, StepOutput(rid, [], "", None, None, True, "abort", len(ids), 0))


__all__ = ["AsyncEngine", "EngineOverloaded", "EngineStopped", "Histogram", "RequestStream"]
