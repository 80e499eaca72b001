"""The inference engine: slot cache, prefill + batched decode, continuous batching.

    engine = Engine.from_pretrained("runs/ckpt")               # CPU eager by default
    outs = engine.generate(["Hello", "Once upon"], SamplingParams(max_new_tokens=32, temperature=0))
    for delta in engine.stream("Hello", SamplingParams(max_new_tokens=32)): print(delta, end="")

Each `step()` (1) frees the slots of finished / aborted requests, (2) admits waiting requests
into free slots and prefills them together (right padded, one forward), sampling their first
token, (3) runs one decode forward over the active slots, sampling one token for each. A
request owns one slot row of the static KV cache; decode rows are the prefix 0..B-1 of the
slots (slots are handed out lowest first), so the step reads cache views without copies.

Mu and INL velocity flow only across layers at each position, and token routing depends only
on token ids (and per-position mu), so the KV cache is the whole decoding state and batching is
exact: a request's tokens do not depend on its neighbours.

On CUDA, `cuda_graphs=True` captures the decode step (optionally `torch.compile`d) once per
batch-size bucket over static input buffers and replays it; prefill stays eager.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .cache import SlotKVCache, attention_mask_decode, attention_mask_prefill
from .detokenize import IncrementalDetokenizer, StopMatcher
from .errors import InvalidRequest
from .sampling import SamplingParams, make_generator, sample_tokens, top_logprobs

logger = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass
class TokenLogprob:
    """One position: the token, its log-probability, and the top alternatives [(id, logprob)]."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


@dataclass
class StepOutput:
    """What one request gained in one engine step (sent to its callback)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob] | None  # only on the first output
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_generated_tokens: int
    error: str | None = None


@dataclass
class Completion:
    """A finished request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    time_to_first_token: float | None = None
    latency: float | None = None


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    callback: Callable[[StepOutput], None] | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    slot: int | None = None
    finished: bool = False
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    generator: torch.Generator | None = None
    detok: IncrementalDetokenizer | None = None
    stopper: StopMatcher | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None
    aborted: bool = False

    @property
    def num_cached(self) -> int:
        """Positions filled in the slot (the last sampled token is not yet in the cache)."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)

    def completion(self) -> Completion:
        return Completion(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_ids),
            token_ids=list(self.output_ids),
            text=self.text,
            finish_reason=self.finish_reason,
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            time_to_first_token=None if self.first_token_time is None else self.first_token_time - self.arrival,
            latency=None if self.finish_time is None else self.finish_time - self.arrival,
        )


def _resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype: unknown value {dtype!r}; expected one of auto, {', '.join(names)}")
    return names[dtype]


def _resolve_device(device) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was requested but torch sees no CUDA device")
    return device


class Engine:
    """Owns a model, its slot cache and the scheduling state. Not thread safe: one thread
    calls `add_request` / `abort` / `step` (see `AsyncEngine` for the server's wrapper)."""

    def __init__(self, model, tokenizer=None, *, max_batch: int = 16, max_seq_len: int | None = None,
                 max_prefill_tokens: int = 8192, cuda_graphs: bool = False, compile: bool = False,
                 seed: int = 0, attn_implementation: str | None = "sdpa"):
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: must be a positive integer, got {max_batch!r}")
        config = model.config
        limit = config.max_position_embeddings
        max_seq_len = limit if max_seq_len is None else max_seq_len
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len: must be an integer >= 2, got {max_seq_len!r}")
        if max_seq_len > limit:
            raise ValueError(f"max_seq_len: {max_seq_len} exceeds the model's max_position_embeddings={limit}")
        self.model = model.eval()
        if attn_implementation is not None and getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
            # the engine passes its own 4D float masks: only eager / sdpa take them
            model.set_attn_implementation(attn_implementation)
        # Token ids are validated on admission; the model's own check would sync every step
        # (and break CUDA graph capture).
        self.model.model.validate_token_ids = False
        self.tokenizer = tokenizer
        self.config = config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.vocab_size = config.vocab_size
        self.sliding_window = config.sliding_window
        self.cache = SlotKVCache(config.num_hidden_layers, max_batch, config.num_key_value_heads, max_seq_len,
                                 config.head_dim, self.dtype, self.device)
        eos = config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos_token_ids = set(eos)
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.free_slots: list[int] = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.requests: dict[str, Request] = {}
        self.stats = {"prompt_tokens": 0, "generated_tokens": 0, "prefill_steps": 0, "decode_steps": 0,
                      "finished": 0, "aborted": 0}
        self.use_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.compile = bool(compile)
        self._graphs: dict[int, tuple] = {}
        self._decode_impl = self._decode_forward
        if self.compile:
            self._decode_impl = torch.compile(self._decode_forward, fullgraph=False, dynamic=False)
        if self.use_graphs:
            self._capture_graphs()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, tokenizer=True, **kwargs) -> "Engine":
        """Load a checkpoint folder (config.json + safetensors, tokenizer files if any)."""
        import os

        import complexity  # noqa: F401  (registers the model type)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = str(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"checkpoint {path!r}: not a directory")
        if not os.path.exists(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"checkpoint {path!r}: no config.json")
        dev = _resolve_device(device)
        dt = _resolve_dtype(dtype, dev)
        attn = kwargs.pop("attn_implementation", "sdpa")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dt, attn_implementation=attn).to(dev)
        tok = None
        if tokenizer is True:
            has_tok = any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json"))
            tok = AutoTokenizer.from_pretrained(path) if has_tok else None
        elif tokenizer not in (None, False):
            tok = tokenizer
        return cls(model, tok, attn_implementation=attn, **kwargs)

    # ------------------------------------------------------------------ requests

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("prompt", "a text prompt needs a tokenizer (this checkpoint has none); pass token ids")
            ids = self.tokenizer(prompt).input_ids
            if not ids and self.tokenizer.bos_token_id is not None:
                ids = [self.tokenizer.bos_token_id]
            return list(ids)
        return [int(t) for t in prompt]

    def check_request(self, ids: Sequence[int], params: SamplingParams, *, require_fit: bool = False) -> None:
        """Raise InvalidRequest naming the problem if `ids` cannot run with `params` on this engine.
        The one check of a prompt against the model (the model's own id check is off: it would
        sync every step). `require_fit`: the requested new tokens must fit in the context too
        (the API's rule); otherwise generation just stops there with finish_reason "length"."""
        if len(ids) == 0:
            raise InvalidRequest("prompt", "is empty (no tokens)")
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size),
                   None)
        if bad is not None:
            raise InvalidRequest("prompt", f"token id {bad!r} is outside the vocabulary [0, {self.vocab_size})")
        # a prompt filling the whole context still gets one sampled token (never written back)
        if len(ids) > self.max_seq_len:
            raise InvalidRequest("prompt", f"{len(ids)} tokens exceed the context length {self.max_seq_len}",
                                 "context_length_exceeded")
        if require_fit and params.max_new_tokens is not None and len(ids) + params.max_new_tokens > self.max_seq_len:
            raise InvalidRequest("max_new_tokens", f"{params.max_new_tokens} new tokens + {len(ids)} prompt tokens "
                                 f"exceed the context length {self.max_seq_len}", "context_length_exceeded")

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, callback: Callable[[StepOutput], None] | None = None) -> Request:
        params = params or SamplingParams()
        params.validate()
        ids = self.encode(prompt)
        self.check_request(ids, params)
        rid = request_id or f"req-{next(_ids)}"
        if rid in self.requests:
            raise InvalidRequest("request_id", f"{rid!r} is already in use")
        req = Request(rid, ids, params, callback)
        req.generator = make_generator(params.seed, self.device)
        if params.logprobs is not None:
            req.logprobs = []
        if self.tokenizer is not None:
            req.detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        req.stopper = StopMatcher(params.stop)
        self.waiting.append(req)
        self.requests[rid] = req
        return req

    def abort(self, request_id: str) -> bool:
        """Cancel a request now: its slot is free for the next step. False if unknown/finished."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        req.aborted = True
        if req.slot is None:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self._finish(req, "abort")
        self.stats["aborted"] += 1
        self._emit(req, [], "", None, None)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ high-level API

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[Completion]:
        """Run a batch of prompts (texts or token-id lists) to completion; one Completion each."""
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: got {len(params)} for {len(prompts)} prompts")
        reqs = [self.add_request(p, sp) for p, sp in zip(prompts, params)]
        while any(not r.finished for r in reqs):
            self.step()
        for r in reqs:
            self.requests.pop(r.request_id, None)
        return [r.completion() for r in reqs]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[str]:
        """Yield text deltas of one request as they are decoded."""
        outs: list[StepOutput] = []
        req = self.add_request(prompt, params, callback=outs.append)
        try:
            while not req.finished:
                self.step()
                for o in outs:
                    if o.new_text:
                        yield o.new_text
                outs.clear()
            for o in outs:
                if o.new_text:
                    yield o.new_text
        finally:
            if not req.finished:
                self.abort(req.request_id)
            self.requests.pop(req.request_id, None)
        self.last_completion = req.completion()

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> None:
        admitted = self._admit()
        if admitted:
            try:
                self._prefill(admitted)
            except Exception as err:  # one bad batch must not take the engine down
                logger.exception("prefill failed")
                for r in admitted:
                    self._fail(r, err)
        # requests admitted just now decode in the same step (their first token came from prefill)
        decoding = [r for r in self.running.values() if not r.finished and r.output_ids]
        if decoding:
            try:
                self._decode(decoding)
            except Exception as err:
                logger.exception("decode failed")
                for r in decoding:
                    self._fail(r, err)

    def _admit(self) -> list[Request]:
        admitted: list[Request] = []
        longest = 0
        while self.waiting and self.free_slots:
            req = self.waiting[0]
            n = len(req.prompt_ids)
            if admitted and max(longest, n) * (len(admitted) + 1) > self.max_prefill_tokens:
                break
            self.waiting.popleft()
            req.slot = heapq.heappop(self.free_slots)
            self.running[req.slot] = req
            admitted.append(req)
            longest = max(longest, n)
        return admitted

    def _prefill(self, reqs: list[Request]) -> None:
        b = len(reqs)
        lens = [len(r.prompt_ids) for r in reqs]
        s = max(lens)
        ids = torch.full((b, s), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : lens[i]] = torch.tensor(r.prompt_ids, dtype=torch.long)
        ids = ids.to(self.device)
        pos = torch.arange(s, device=self.device)[None].expand(b, s)
        mask = attention_mask_prefill(b, s, self.sliding_window, self.dtype, self.device)
        self.cache.set_prefill(torch.tensor([r.slot for r in reqs], device=self.device))
        hidden = self.model.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache,
                                  use_cache=True).last_hidden_state
        self.cache.set_decode(None, self.max_seq_len)
        last = hidden[torch.arange(b, device=self.device), torch.tensor(lens, device=self.device) - 1]
        logits = self.model.lm_head(last).float()
        self.stats["prefill_steps"] += 1
        self.stats["prompt_tokens"] += sum(lens)
        for i, r in enumerate(reqs):
            k = r.params.prompt_logprobs
            if k is None:
                continue
            n = lens[i]
            entries = [TokenLogprob(r.prompt_ids[0], None, None)]
            if n > 1:
                plogits = self.model.lm_head(hidden[i, : n - 1]).float()
                chosen = ids[i, 1:n]
                lp, top_ids, top_lp = top_logprobs(plogits, chosen, k)
                lp, top_ids, top_lp = lp.tolist(), top_ids.tolist(), top_lp.tolist()
                for j in range(n - 1):
                    entries.append(TokenLogprob(r.prompt_ids[j + 1], lp[j], list(zip(top_ids[j], top_lp[j]))))
            r.prompt_logprobs = entries
        sampling = [r for r in reqs if r.params.max_new_tokens > 0]
        for r in reqs:
            if r.params.max_new_tokens == 0:
                self._finish(r, "length")
                self._emit(r, [], "", None, r.prompt_logprobs)
        if sampling:
            rows = [reqs.index(r) for r in sampling]
            self._sample_and_emit(sampling, logits[rows], first=True)

    def _decode(self, reqs: list[Request]) -> None:
        nrows = max(r.slot for r in reqs) + 1
        tokens = [self.pad_token_id] * nrows
        pos = [0] * nrows
        for r in self.running.values():
            # rows of slots that hold a request but do not decode now write their dummy key at the
            # next free position of that request (overwritten before it is ever read)
            if r.slot < nrows:
                pos[r.slot] = min(r.num_cached, self.max_seq_len - 1)
        for r in reqs:
            tokens[r.slot] = r.output_ids[-1]
            pos[r.slot] = r.num_cached
        logits = self._run_decode(torch.tensor([tokens, pos]), nrows)
        slots = [r.slot for r in reqs]
        if slots != list(range(nrows)):  # skip the gather in the common case: every row decodes, in order
            logits = logits[torch.tensor(slots, device=logits.device)]
        self.stats["decode_steps"] += 1
        self._sample_and_emit(reqs, logits, first=False)

    def _decode_forward(self, tokens: torch.Tensor, pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        self.cache.set_decode(pos, kv_len)
        mask = attention_mask_decode(pos, kv_len, self.sliding_window, self.dtype)
        hidden = self.model.model(input_ids=tokens, attention_mask=mask, position_ids=pos[:, None],
                                  past_key_values=self.cache, use_cache=True).last_hidden_state
        return self.model.lm_head(hidden[:, -1]).float()

    def _run_decode(self, tokens_pos: torch.Tensor, nrows: int) -> torch.Tensor:
        """Logits [nrows, V] for the CPU tensor [2, nrows] of (last token, its position) per row."""
        if self.use_graphs:
            bucket = next(b for b in self._buckets if b >= nrows)
            static_in, graph, out = self._graphs[bucket]
            if nrows < bucket:  # rows past nrows hold no decoding request: a padding token at position 0
                static_in[0].fill_(self.pad_token_id)
                static_in[1].zero_()
            static_in[:, :nrows].copy_(tokens_pos, non_blocking=True)  # one host-to-device copy
            graph.replay()
            return out[:nrows]
        # eager: attend over the filled prefix only, rounded up to limit recompiles / allocations
        need = int(tokens_pos[1].max()) + 1
        kv_len = min(self.max_seq_len, -(-need // 128) * 128)
        tokens_pos = tokens_pos.to(self.device)
        return self._decode_impl(tokens_pos[0, :, None], tokens_pos[1], kv_len)

    def _capture_graphs(self) -> None:
        """One CUDA graph per batch bucket (1, 2, 4, ... max_batch), over static buffers, attending
        over the full cache length (static shapes)."""
        buckets, b = [], 1
        while b < self.max_batch:
            buckets.append(b)
            b *= 2
        buckets.append(self.max_batch)
        self._buckets = buckets
        pool = None
        t0 = time.perf_counter()
        with torch.inference_mode():
            for b in reversed(buckets):
                static_in = torch.zeros(2, b, dtype=torch.long, device=self.device)  # tokens; positions
                static_in[0].fill_(self.pad_token_id)
                tokens, pos = static_in[0, :, None], static_in[1]
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    for _ in range(3):  # warm-up (and compile) outside the capture
                        self._decode_impl(tokens, pos, self.max_seq_len)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._decode_impl(tokens, pos, self.max_seq_len)
                pool = graph.pool()
                self._graphs[b] = (static_in, graph, out)
        torch.cuda.synchronize()
        logger.info("captured %d decode graphs in %.1fs", len(buckets), time.perf_counter() - t0)

    # ------------------------------------------------------------------ sampling and bookkeeping

    def _sample_and_emit(self, reqs: list[Request], logits: torch.Tensor, first: bool) -> None:
        params = [r.params for r in reqs]
        histories = [
            torch.tensor(r.prompt_ids + r.output_ids, device=logits.device) if r.params.repetition_penalty != 1.0 else None
            for r in reqs
        ]
        tokens = sample_tokens(logits, params, [r.generator for r in reqs], histories, self.generator)
        lp_rows = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        lp_entries: dict[int, TokenLogprob] = {}
        if lp_rows:
            k = max(reqs[i].params.logprobs for i in lp_rows)
            rows = torch.tensor(lp_rows, device=logits.device)
            lp, top_ids, top_lp = top_logprobs(logits[rows], tokens[rows], k)
            lp, top_ids, top_lp = lp.tolist(), top_ids.tolist(), top_lp.tolist()
            for j, i in enumerate(lp_rows):
                kk = reqs[i].params.logprobs
                lp_entries[i] = TokenLogprob(0, lp[j], list(zip(top_ids[j][:kk], top_lp[j][:kk])))
        tokens = tokens.tolist()
        now = time.perf_counter()
        self.stats["generated_tokens"] += len(reqs)
        for i, r in enumerate(reqs):
            tok = tokens[i]
            r.output_ids.append(tok)
            if r.first_token_time is None:
                r.first_token_time = now
            entry = lp_entries.get(i)
            if entry is not None:
                entry.token_id = tok
                r.logprobs.append(entry)
            reason = None
            text = ""
            is_stop_token = (tok in self.eos_token_ids and not r.params.ignore_eos) or tok in r.params.stop_token_ids
            if not is_stop_token and r.detok is not None:
                text = r.detok.add(tok)
            if is_stop_token:
                reason = "stop"
            elif len(r.output_ids) >= r.params.max_new_tokens or r.num_cached + 1 > self.max_seq_len:
                reason = "length"
            if reason is not None and r.detok is not None:
                text += r.detok.flush()
            text, hit = r.stopper.feed(text, final=reason is not None)
            if hit:
                reason = "stop"
            r.text += text
            if reason is not None:
                self._finish(r, reason)
            self._emit(r, [tok], text, [entry] if entry is not None else None, r.prompt_logprobs if first else None)

    def _finish(self, req: Request, reason: str) -> None:
        req.finished = True
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        if req.slot is not None:
            self.running.pop(req.slot, None)
            heapq.heappush(self.free_slots, req.slot)
            req.slot = None
        self.stats["finished"] += 1

    def _fail(self, req: Request, err: Exception) -> None:
        if req.finished:
            return
        self._finish(req, "error")
        if req.callback is not None:
            req.callback(StepOutput(req.request_id, [], "", None, None, True, "error", len(req.prompt_ids),
                                    len(req.output_ids), error=f"{type(err).__name__}: {err}"))

    def _emit(self, req: Request, tokens, text, logprobs, prompt_logprobs) -> None:
        if req.callback is not None:
            req.callback(StepOutput(req.request_id, tokens, text, logprobs, prompt_logprobs, req.finished,
                                    req.finish_reason, len(req.prompt_ids), len(req.output_ids)))

    def release(self, request_id: str) -> None:
        """Forget a finished request (the async wrapper calls this once it has its final output)."""
        req = self.requests.get(request_id)
        if req is not None and req.finished:
            del self.requests[request_id]


__all__ = ["Engine", "Completion", "StepOutput", "TokenLogprob", "Request"]
