"""The server's engine client: validated requests in, merged text outputs out, limits, stats.

    aengine = AsyncEngine.spawn("runs/ckpt", {"max_seq_len": 2048})   # core in its own process
    aengine = AsyncEngine(Engine.from_pretrained(...))                # core in a thread (tests)
    aengine.start()
    group = aengine.add_request([ids], [params], stream=True)
    async for outs in group: ...

This side (the API process) tokenizes (in a worker thread, never on the event loop), checks
every request against the model before it reaches the core, detokenizes the core's token outputs
(one batched decode per step, see detokenize.py) and merges them into each request's
`RequestGroup`: a consumer wakes once per step at most, a non-streaming one only at the end.
Admission limits (in-flight sequences, prompt tokens waiting for a slot) raise EngineOverloaded.
If the core dies, every request in flight ends with an error, new ones get EngineStopped, and the
`on_dead` callbacks run (the server exits non-zero).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from .core import ProcessCore, ThreadCore, engine_stats
from .detokenize import OutputProcessor
from .engine import Engine, check_params, check_request, encode_prompt
from .errors import EngineOverloaded, EngineStopped, InvalidRequest
from .outputs import RequestOutput, StepOutput
from .sampling import SamplingParams

logger = logging.getLogger(__name__)


class RequestGroup:
    """The sequences of one API request (n choices x prompts), read from the event loop.

    `stream=True`: `async for outs in group` yields, per wake-up, the merged deltas of every
    sequence that produced something (one wake-up per engine step at most: a slow consumer gets
    bigger deltas, never a backlog). `stream=False`: `await group.result()` wakes once, at the end.
    """

    def __init__(self, request_ids: list[str], num_prompt_tokens: list[int], stream: bool):
        self.request_ids = request_ids
        self.index = {rid: i for i, rid in enumerate(request_ids)}
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
        """Merge one output (event loop thread)."""
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
    def __init__(
        self,
        engine: Engine | None = None,
        *,
        core=None,
        tokenizer=None,
        max_concurrent: int | None = None,
        max_queued_tokens: int | None = None,
    ):
        """Over an Engine object (its core runs in a thread), or over a started `core` (see
        `spawn`) with the checkpoint's tokenizer."""
        if (engine is None) == (core is None):
            raise ValueError("AsyncEngine: pass exactly one of engine or core")
        if engine is not None:
            core = ThreadCore(engine, self._on_message)
            tokenizer = engine.tokenizer
            self._stats = engine_stats(engine)
        else:
            core.on_message = self._on_message
            self._stats = {
                "running": 0,
                "waiting": 0,
                "free_slots": core.info["max_batch"],
                "max_batch": core.info["max_batch"],
            }
        self.core = core
        info = core.info
        self.info = info
        self.tokenizer = tokenizer
        self.vocab_size, self.max_seq_len, self.max_batch = info["vocab_size"], info["max_seq_len"], info["max_batch"]
        self.max_concurrent = max_concurrent
        self.max_queued_tokens = max_queued_tokens
        self._processor = OutputProcessor(tokenizer)
        self._lock = threading.Lock()
        self._groups: dict[str, RequestGroup] = {}
        self._queued: dict[str, int] = {}  # prompt tokens of requests not yet prefilled
        self._counter = 0
        self.queued_tokens = 0
        self.finish_reasons: dict[str, int] = {}
        self.rejected = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = self._stopping = self._draining = False
        self.dead: str | None = None
        self.on_dead: list = []
        # tokenization and chat templates run here, off the event loop (one worker: a huge prompt
        # delays other prompts' tokenization, never /health or the streams)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="complexity-tokenize")

    @classmethod
    def spawn(
        cls, checkpoint: str, engine_kwargs: dict | None = None, *, threads: int | None = None, **kwargs
    ) -> AsyncEngine:
        """Start the engine core in its own process (loads the checkpoint there) and return the
        client; the API process loads only the tokenizer. Raises ValueError if the core could not
        start (bad checkpoint, flags, memory), with its message."""
        import os

        path = str(checkpoint)
        core = ProcessCore(path, dict(engine_kwargs or {}), on_message=None, threads=threads)
        core.launch()  # first: its imports and load overlap the tokenizer's here
        try:
            from transformers import AutoTokenizer

            has_tok = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
            tokenizer = AutoTokenizer.from_pretrained(path) if has_tok else None
            core.wait_ready()
        except BaseException:
            core.kill()  # a start that failed here leaves no process holding the model
            raise
        return cls(core=core, tokenizer=tokenizer, **kwargs)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._started:
            return
        self._started = True
        if isinstance(self.core, ThreadCore):
            self.core.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel whatever is still queued or running (clients get finish_reason "abort") and stop
        the core (also one spawned but never started: its process holds the model)."""
        if self._stopping:
            return
        self._stopping = True
        self.core.close(timeout)
        self._executor.shutdown(wait=False, cancel_futures=True)

    def drain(self, timeout: float) -> None:
        """Begin a graceful shutdown (thread safe, e.g. from a signal handler): refuse new requests
        (EngineStopped -> 503), let the in-flight ones finish for up to `timeout` seconds, then
        cancel the rest (their streams end normally with finish_reason "abort")."""
        if self._draining:
            return
        self._draining = True
        timer = threading.Timer(max(0.0, timeout), self._abort_everything)
        timer.daemon = True
        timer.start()

    @property
    def running(self) -> bool:
        return self._started and self.dead is None and not self._stopping and not self._draining and self.core.alive()

    # ------------------------------------------------------------------ inputs (off the event loop)

    async def _off_loop(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def encode(self, text: str) -> list[int]:
        """Token ids of a text prompt."""
        return await self._off_loop(encode_prompt, text, self.tokenizer, self.max_seq_len)

    async def decode(self, ids: list[int]) -> str:
        """Text of token ids (special tokens kept)."""
        return await self._off_loop(lambda: self.tokenizer.decode(ids, skip_special_tokens=False))

    def _render_chat(self, messages: list[dict]) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # template errors (e.g. unsupported roles) are the caller's
            raise InvalidRequest("messages", f"the chat template rejected them: {err}") from None
        return self.tokenizer(text, add_special_tokens=False).input_ids

    async def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template (generation
        prompt added)."""
        return await self._off_loop(self._render_chat, messages)

    def check_params(self, params: SamplingParams) -> None:
        """The engine's check of a request's sampling values (no prompt needed)."""
        check_params(params, vocab_size=self.vocab_size, has_tokenizer=self.tokenizer is not None)

    def check_request(self, ids: list[int], params: SamplingParams) -> None:
        """The engine's check of one sequence (the API's rule: the new tokens must fit too)."""
        check_request(
            ids,
            params,
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            has_tokenizer=self.tokenizer is not None,
            require_fit=True,
        )

    # ------------------------------------------------------------------ requests (event loop side)

    def add_request(self, prompts: list[list[int]], params: list[SamplingParams], *, stream: bool) -> RequestGroup:
        """Queue the sequences of one API request (all admitted or none); returns their group."""
        if not self.running:
            raise EngineStopped(f"the engine is not running ({self.dead or 'shutting down'})")
        for ids, p in zip(prompts, params):
            self.check_request(ids, p)
        self._loop = asyncio.get_running_loop()
        tokens = sum(len(ids) for ids in prompts)
        with self._lock:
            inflight = len(self._groups)
            if self.max_concurrent is not None and inflight + len(prompts) > self.max_concurrent:
                self.rejected += 1
                raise EngineOverloaded(
                    f"too many concurrent requests ({inflight} in flight + {len(prompts)} > "
                    f"limit {self.max_concurrent}); retry later"
                )
            if self.max_queued_tokens is not None and self.queued_tokens + tokens > self.max_queued_tokens:
                self.rejected += 1
                raise EngineOverloaded(
                    f"too many queued prompt tokens ({self.queued_tokens} queued + {tokens} > "
                    f"limit {self.max_queued_tokens}); retry later"
                )
            rids = []
            for _ in prompts:
                self._counter += 1
                rids.append(f"r{self._counter}")
            group = RequestGroup(rids, [len(ids) for ids in prompts], stream)
            for rid, ids, p in zip(rids, prompts, params):
                self._groups[rid] = group
                self._queued[rid] = len(ids)
                self.queued_tokens += len(ids)
                self._processor.add_request(rid, ids, p, incremental=stream)
        self.core.send(("add", [(rid, list(ids), p) for rid, ids, p in zip(rids, prompts, params)]))
        return group

    def abort(self, group: RequestGroup) -> None:
        """Cancel what is left of a group (its slots are free at the next step)."""
        if not group.finished:
            self.core.send(("abort", list(group.request_ids)))

    def _abort_everything(self) -> None:
        with self._lock:
            rids = list(self._groups)
        if rids:
            self.core.send(("abort", rids))

    def stats(self) -> dict:
        return {
            **self._stats,
            "inflight": len(self._groups),
            "queued_tokens": self.queued_tokens,
            "rejected": self.rejected,
            "finish_reasons": dict(self.finish_reasons),
        }

    # ------------------------------------------------------------------ the core's messages (reader thread)

    def _on_message(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "outputs":
            self._stats = msg[2]
            self._on_outputs(msg[1])
        elif kind in ("fatal", "dead"):
            if not self._stopping:
                self._on_dead(msg[1])

    def _on_outputs(self, outs: list[StepOutput]) -> None:
        """One step's outputs: text, stop strings, accounting, then one hand-over to the loop.

        The text is made outside the lock: the event loop takes it to add every arriving request,
        and detokenizing a merged hand-over of many steps held it for milliseconds at a time, each
        arrival waiting its turn. Unlocked is safe because the processor's shared state is a dict
        of per-request entries read and written one key at a time (atomic under the GIL), and a
        request's entry exists before the core hears of it (`add_request`)."""
        texts, stopped = self._processor.process(outs)
        with self._lock:
            for out in texts:
                if out.request_id in self._queued and (
                    out.new_token_ids or out.finished or out.prompt_logprobs is not None
                ):
                    self.queued_tokens -= self._queued.pop(out.request_id)
                if out.finished:
                    self._processor.remove(out.request_id)
        if stopped:
            self.core.send(("abort", stopped))
        self._hand_over(texts)

    def _hand_over(self, outs: list[StepOutput]) -> None:
        if self._loop is None or not outs:
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
                    self._queued.pop(out.request_id, None)
                reason = out.finish_reason or "unknown"
                self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1

    def _on_dead(self, reason: str) -> None:
        """The core is gone: every request in flight ends with an error, new ones are refused."""
        first_line = reason.strip().splitlines()[-1] if reason.strip() else "unknown"
        self.dead = f"engine died: {first_line}"
        logger.error("the engine core died: %s", reason)
        with self._lock:
            rids = list(self._groups)
        self._hand_over([StepOutput(rid, [], None, None, True, "error", 0, 0, self.dead) for rid in rids])
        for callback in self.on_dead:
            callback(self.dead)


__all__ = ["AsyncEngine", "RequestGroup", "RequestOutput"]
