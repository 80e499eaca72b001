"""Run an Engine in one background thread and talk to it from asyncio.

The thread owns the model: it drains a command inbox (add / abort), runs `engine.step()` while
there is work and sleeps on an event otherwise. Each request's outputs are merged into its
`RequestGroup` on the event loop; a consumer wakes once per engine step at most, and only at
the end for a non-streaming request. Admission limits (in-flight requests, prompt tokens waiting
for a slot) are checked at `add_request` and raise `EngineOverloaded` (the server answers 429).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from .engine import Engine, StepOutput, TokenLogprob
from .errors import EngineOverloaded, EngineStopped, InvalidRequest
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class RequestOutput:
    """What one sequence of a request gained since its consumer last looked (or, from
    `RequestGroup.result`, everything it produced)."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    finished: bool = False
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    error: str | None = None

    def add(self, out: StepOutput) -> None:
        self.text += out.new_text
        self.token_ids.extend(out.new_token_ids)
        if out.new_logprobs:
            self.logprobs = (self.logprobs or []) + list(out.new_logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.finished, self.finish_reason = out.finished, out.finish_reason
        self.num_prompt_tokens, self.num_generated_tokens = out.num_prompt_tokens, out.num_generated_tokens
        self.error = out.error


class RequestGroup:
    """The sequences of one API request (n choices x prompts), read from the event loop.

    `stream=True`: `async for outs in group` yields, per wake-up, the merged deltas of every
    sequence that produced something (one wake-up per engine step at most: a slow consumer gets
    bigger deltas, never a backlog). `stream=False`: `await group.result()` wakes once, at the end.
    """

    def __init__(self, request_ids: list[str], num_prompt_tokens: list[int], stream: bool):
        self.request_ids = request_ids
        self.index = {rid: i for i, rid in enumerate(request_ids)}
        self.num_prompt_tokens = num_prompt_tokens
        self.stream = stream
        self.arrival = time.perf_counter()
        self.first_token_time: list[float | None] = [None] * len(request_ids)
        self.finish_time: list[float | None] = [None] * len(request_ids)
        self.remaining = len(request_ids)
        self._pending: dict[int, RequestOutput] = {}
        self._totals = [RequestOutput(i, num_prompt_tokens=n) for i, n in enumerate(num_prompt_tokens)]
        self._event = asyncio.Event()

    @property
    def finished(self) -> bool:
        return self.remaining == 0

    def put(self, out: StepOutput, now: float) -> None:
        """Merge one engine output (event loop thread)."""
        i = self.index[out.request_id]
        total = self._totals[i]
        if total.finished:
            return
        if out.new_token_ids and self.first_token_time[i] is None:
            self.first_token_time[i] = now
        total.add(out)
        if self.stream:
            self._pending.setdefault(i, RequestOutput(i)).add(out)
        if out.finished:
            self.finish_time[i] = now
            self.remaining -= 1
        if self.stream or self.remaining == 0:
            self._event.set()

    def __aiter__(self):
        return self._iter()

    async def _iter(self):
        while True:
            await self._event.wait()
            self._event.clear()
            outs = [self._pending[i] for i in sorted(self._pending)]
            self._pending.clear()
            if outs:
                yield outs
            if self.remaining == 0 and not self._pending:
                return

    async def result(self) -> list[RequestOutput]:
        while self.remaining:
            await self._event.wait()
            self._event.clear()
        return self._totals


class AsyncEngine:
    """The server's view of an Engine: validated requests in, merged outputs out, limits, stats."""

    def __init__(self, engine: Engine, *, max_concurrent: int | None = None, max_queued_tokens: int | None = None):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.vocab_size, self.max_seq_len, self.max_batch = engine.vocab_size, engine.max_seq_len, engine.max_batch
        self.max_concurrent = max_concurrent
        self.max_queued_tokens = max_queued_tokens
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._draining = False
        self._drain_deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._groups: dict[str, RequestGroup] = {}
        self._step_outs: list[StepOutput] = []  # the engine thread's outputs of the current step
        self._queued: dict[str, int] = {}  # prompt tokens of requests not yet prefilled
        self._counter = 0
        self.queued_tokens = 0
        self.finish_reasons: dict[str, int] = {}
        self.rejected = 0

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

    # ------------------------------------------------------------------ inputs

    async def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt."""
        return self.engine.encode(text)

    async def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template (generation
        prompt added). A template that rejects the messages is the caller's error."""
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # template errors (e.g. unsupported roles) are the caller's
            raise InvalidRequest("messages", f"the chat template rejected them: {err}") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    # ------------------------------------------------------------------ requests (event loop side)

    def add_request(self, prompts: list[list[int]], params: list[SamplingParams], *, stream: bool) -> RequestGroup:
        """Queue the sequences of one API request (all admitted or none); returns their group.
        Prompts and params are checked against the model first (InvalidRequest)."""
        if not self.running:
            raise EngineStopped("the engine is not running (shutting down)")
        for ids, p in zip(prompts, params):
            self.engine.check_request(ids, p, require_fit=True)
        self._loop = asyncio.get_running_loop()
        tokens = sum(len(ids) for ids in prompts)
        with self._lock:
            inflight = len(self._groups)
            if self.max_concurrent is not None and inflight + len(prompts) > self.max_concurrent:
                self.rejected += 1
                raise EngineOverloaded(f"too many concurrent requests ({inflight} in flight + {len(prompts)} > "
                                       f"limit {self.max_concurrent}); retry later")
            if self.max_queued_tokens is not None and self.queued_tokens + tokens > self.max_queued_tokens:
                self.rejected += 1
                raise EngineOverloaded(f"too many queued prompt tokens ({self.queued_tokens} queued + {tokens} > "
                                       f"limit {self.max_queued_tokens}); retry later")
            rids = []
            for _ in prompts:
                self._counter += 1
                rids.append(f"r{self._counter}")
            group = RequestGroup(rids, [len(ids) for ids in prompts], stream)
            for rid, ids, p in zip(rids, prompts, params):
                self._groups[rid] = group
                self._queued[rid] = len(ids)
                self.queued_tokens += len(ids)
                self._inbox.append(("add", list(ids), p, rid))
        self._wake.set()
        return group

    def abort(self, group: RequestGroup) -> None:
        """Cancel what is left of a group (its slots are free at the next step)."""
        if group.finished:
            return
        with self._lock:
            self._inbox.extend(("abort", rid) for rid in group.request_ids)
        self._wake.set()

    def stats(self) -> dict:
        e = self.engine
        return {
            "running": e.num_running,
            "waiting": e.num_waiting,
            "inflight": len(self._groups),
            "queued_tokens": self.queued_tokens,
            "free_slots": len(e.free_slots),
            "max_batch": e.max_batch,
            "rejected": self.rejected,
            "finish_reasons": dict(self.finish_reasons),
            **e.stats,
        }

    # ------------------------------------------------------------------ the engine thread

    def _deliver(self, outs: list[StepOutput]) -> None:
        """Hand one step's outputs to the event loop (one call per step, not one per token)."""
        with self._lock:
            for out in outs:
                n = self._queued.pop(out.request_id, None) if (out.new_token_ids or out.finished
                                                               or out.prompt_logprobs is not None) else None
                if n is not None:
                    self.queued_tokens -= n
        if self._loop is None:
            return
        try:
            self._loop.call_soon_threadsafe(self._dispatch, outs)
        except RuntimeError:  # the loop is closed (shutdown)
            pass

    def _dispatch(self, outs: list[StepOutput]) -> None:
        now = time.perf_counter()
        for out in outs:
            group = self._groups.get(out.request_id)
            if group is None:
                continue
            group.put(out, now)
            if out.finished:
                with self._lock:
                    self._groups.pop(out.request_id, None)
                reason = out.finish_reason or "unknown"
                self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1

    def _handle(self, cmd) -> bool:
        kind = cmd[0]
        if kind == "add":
            _, ids, params, rid = cmd
            try:
                self.engine.add_request(ids, params, request_id=rid, callback=self._step_outs.append)
            except Exception as err:  # checked before, but never let one request kill the loop
                self._step_outs.append(StepOutput(rid, [], "", None, None, True, "error", len(ids), 0, error=str(err)))
        elif kind == "abort":
            self.engine.abort(cmd[1])
        elif kind == "shutdown":
            return False
        return True

    def _abort_all(self) -> None:
        for rid in [r.request_id for r in list(self.engine.waiting) + list(self.engine.running.values())]:
            self.engine.abort(rid)

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
                self._abort_all()
            if self.engine.has_unfinished():
                try:
                    self.engine.step()
                except Exception:  # step already fails the affected requests; keep serving
                    logger.exception("engine step failed")
            outs, self._step_outs[:] = list(self._step_outs), []
            for rid in [o.request_id for o in outs if o.finished]:
                self.engine.release(rid)
            if outs:
                self._deliver(outs)
            elif not self.engine.has_unfinished():
                self._wake.wait(0.1)
        # shutdown: cancel everything still queued or running
        self._abort_all()
        outs, self._step_outs[:] = list(self._step_outs), []
        with self._lock:
            pending = [c for c in self._inbox if c[0] == "add"]
            self._inbox.clear()
        for _, ids, _, rid in pending:
            outs.append(StepOutput(rid, [], "", None, None, True, "abort", len(ids), 0))
        if outs:
            self._deliver(outs)


__all__ = ["AsyncEngine", "RequestGroup", "RequestOutput"]
