"""The inference engine: slot cache, prefill + batched decode, continuous batching.

    engine = Engine.from_pretrained("runs/ckpt")      # on CUDA: CUDA graphs + compile, slots sized from memory
    outs = engine.generate(["Hello", "Once upon"], SamplingParams(max_new_tokens=32, temperature=0))
    for out in engine.stream("Hello", SamplingParams(max_new_tokens=32)): print(out.new_text, end="")

Each `step()` (1) admits waiting requests into free slots and prefills them together (right
padded, one forward of at most `max_prefill_tokens` padded tokens), sampling their first token,
(2) runs one decode forward over the active slots, sampling one token for each, and returns the
step's `StepOutput`s (token ids; text is the output processor's job, see detokenize.py). With
`async_decode` the decode of (2) is launched and read by the next `step()`, after it has
launched the following one (see `Engine`). A request owns one slot row of the static KV cache;
decode rows are the prefix 0..B-1 of the slots (slots are handed out lowest first), so the step
reads cache views without copies.

Scheduling: every step admits what fits in one prefill forward, then decodes every running
request. Decodes therefore wait for at most one bounded prefill per step (a long queue of prompts
cannot hold them hostage), and new requests are admitted at every step (decodes cannot starve
them). Prompts are not split across steps: with the per-step budget bounded, one prefill
forward costs about as much as a few decode steps, and the slot cache stays simple.

Mu and INL velocity flow only across layers at each position, and token routing depends only
on token ids (and per-position mu), so the KV cache is the whole decoding state and batching is
exact: a request's tokens do not depend on its neighbours.

On CUDA the defaults are the fast ones: for batches of up to COMPILED_DECODE_MAX_ROWS rows the
decode step is compiled once with a dynamic batch and context dimension (no recompiles), larger
batches run it eagerly, and each is captured as one CUDA graph per (batch bucket, context bucket);
the graphs attend over the bucket's context, not the whole slot. The number of slots
comes from free GPU memory (`gpu_memory_utilization`, as vLLM does), and each step's decode is
launched before the last one's tokens are read (`async_decode`). Prefill stays eager.
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import itertools
import logging
import math
import numbers
import operator
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..runtime import resolve_device, resolve_dtype
from .cache import SlotKVCache, attention_mask_decode, attention_mask_prefill, positions_per_slot
from .detokenize import OutputProcessor
from .errors import InvalidRequest
from .outputs import Completion, RequestOutput, StepOutput, TokenLogprob
from .sampling import SEED_RANGE, BatchSampler, SamplingParams, make_generator, top_logprobs

logger = logging.getLogger(__name__)

_ids = itertools.count()

CPU_SLOTS = 16  # CPU default: decoding there is compute bound, more rows buy little
MAX_AUTO_SLOTS = 256  # CUDA: the most slots sized automatically (the largest decode batch)
GRAPH_MEMORY_RESERVE = 1 << 30  # CUDA graphs' private pool and allocator slack, kept out of the KV budget
# The decode step is compiled for batches of at most this many rows; larger ones run the eager step
# (inside their CUDA graphs). Measured side by side on an H100 (BENCHMARKS.md): compiled, batch 1
# decodes 1.8-1.9x faster (its many small kernels fused); 256 rows ran at 0.24x of the eager step,
# whose batched GEMMs leave little to fuse (that compiled step also copied the batch's cache rows
# per layer, since fixed: the large batches are to be measured again).
COMPILED_DECODE_MAX_ROWS = 16
# The most decode steps `decode_steps` may run back to back before the host reads their tokens.
MAX_DECODE_STEPS = 64


@dataclass
class _Window:
    """Decode steps launched on the device, their tokens not yet read by the host."""

    reqs: list[Request]
    sampler: BatchSampler
    slots: torch.Tensor  # the rows' slots (device)
    rows: torch.Tensor | None  # the logits rows of `reqs` (None: every row, in order)
    nrows: int
    steps: int
    next_input: torch.Tensor  # [2, nrows] (device): tokens and positions of the step after the window
    next_max_pos: int  # the largest position in next_input
    drawn: torch.Tensor  # [len(reqs), steps] tokens, -1 for a row with non-finite logits
    logprobs: list[torch.Tensor] | None  # (chosen [L, steps], top ids [L, steps, k], top logprobs)
    ready: torch.cuda.Event | None  # set once drawn/logprobs (host copies) hold the values


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    slot: int | None = None
    finished: bool = False
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    generator: torch.Generator | None = None
    arrival: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finish_time: float | None = None

    @property
    def num_cached(self) -> int:
        """Positions filled in the slot (the last sampled token is not yet in the cache)."""
        n = len(self.output_ids)
        return len(self.prompt_ids) + (n - 1 if n else 0)

    def completion(self, out: RequestOutput) -> Completion:
        """The finished request from its merged outputs: their tokens, which a stop string may
        end before the last token the engine sampled."""
        return Completion(
            request_id=self.request_id,
            prompt_token_ids=list(self.prompt_ids),
            token_ids=out.token_ids,
            text=out.text,
            finish_reason=out.finish_reason,
            logprobs=None if self.params.logprobs is None else (out.logprobs or []),
            prompt_logprobs=self.prompt_logprobs,
            time_to_first_token=None if self.first_token_time is None else self.first_token_time - self.arrival,
            latency=None if self.finish_time is None else self.finish_time - self.arrival,
        )


def batch_buckets(max_batch: int, smallest: int = 1) -> list[int]:
    """Decode batch sizes with a CUDA graph: powers of two from `smallest`, and from 16 on the
    midpoints between them (24, 48, 96, 192, ...), so a batch pads by at most a third; max_batch
    is the last."""
    out, b = [], smallest
    while b < max_batch:
        out.append(b)
        if b >= 16 and b + b // 2 < max_batch:
            out.append(b + b // 2)
        b *= 2
    return sorted(set(out)) + [max_batch]


def context_buckets(max_seq_len: int, smallest: int = 256) -> list[int]:
    """Attention lengths with a CUDA graph: powers of two from `smallest`, then max_seq_len."""
    out, n = [], smallest
    while n < max_seq_len:
        out.append(n)
        n *= 2
    return out + [max_seq_len]


def kv_bytes_per_token(config, dtype: torch.dtype) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * dtype.itemsize


def check_params(params: SamplingParams, *, vocab_size: int, has_tokenizer: bool) -> None:
    """The part of `check_request` that needs no prompt: the sampling values against their
    ranges and this model (the server runs it before any tokenization or chat template)."""
    params.validate()
    if params.stop and not has_tokenizer:
        raise InvalidRequest("stop", "stop strings need a tokenizer, and this model has none (use stop_token_ids)")
    bad = next((t for t in params.logit_bias if t >= vocab_size), None)
    if bad is not None:
        raise InvalidRequest("logit_bias", f"token id {bad} is outside the vocabulary [0, {vocab_size})")


def check_request(
    ids: Sequence[int],
    params: SamplingParams,
    *,
    vocab_size: int,
    max_seq_len: int,
    has_tokenizer: bool,
    require_fit: bool = False,
) -> None:
    """The one check of a request against a model: the sampling values (`check_params`), then the
    prompt (not empty, ids in the vocabulary, within the context). The model's own id check is
    off under the engine (it would sync every step); the server runs this in its API process
    before a request reaches the engine process. `require_fit`: the requested new tokens must fit in the context
    too (the API's rule); otherwise generation stops there with finish_reason "length"."""
    check_params(params, vocab_size=vocab_size, has_tokenizer=has_tokenizer)
    if len(ids) == 0:
        raise InvalidRequest("prompt", "is empty (no tokens)")
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise InvalidRequest("prompt", f"token id {bad!r} is outside the vocabulary [0, {vocab_size})")
    # a prompt filling the whole context still gets one sampled token (never written back)
    if len(ids) > max_seq_len:
        raise InvalidRequest(
            "prompt", f"{len(ids)} tokens exceed the context length {max_seq_len}", "context_length_exceeded"
        )
    if require_fit and params.max_new_tokens is not None and len(ids) + params.max_new_tokens > max_seq_len:
        raise InvalidRequest(
            "max_new_tokens",
            f"{params.max_new_tokens} new tokens + {len(ids)} prompt tokens exceed the context length {max_seq_len}",
            "context_length_exceeded",
        )


def _token_id(t) -> int:
    if not isinstance(t, bool):
        try:
            return operator.index(t)
        except TypeError:
            pass
    raise InvalidRequest("prompt", f"token ids must be integers, got {t!r:.40}")


def encode_prompt(prompt: str | Sequence[int], tokenizer, max_seq_len: int) -> list[int]:
    """Token ids of a prompt: a text is tokenized (special tokens added; an empty text is the bos
    token); token ids are taken as given (any integer type: numpy's and torch's too), never
    rounded or parsed. The one tokenization of the engine and the server's API process."""
    if not isinstance(prompt, str):
        return [_token_id(t) for t in prompt]
    if tokenizer is None:
        raise InvalidRequest("prompt", "a text prompt needs a tokenizer (this checkpoint has none); pass token ids")
    # Far longer than the context? Count the tokens of a prefix cut at a space first: if it alone
    # exceeds the context, so does the whole, and megabytes are never tokenized.
    probe = max_seq_len * 16
    if len(prompt) > probe:
        cut = prompt.rfind(" ", probe // 2, probe)
        head = prompt[: cut if cut > 0 else probe]
        n = len(tokenizer(head, add_special_tokens=False).input_ids)
        if n > max_seq_len + 8:
            raise InvalidRequest(
                "prompt",
                f"exceeds the context length {max_seq_len}: its first {len(head)} characters alone are {n} tokens",
                "context_length_exceeded",
            )
    ids = tokenizer(prompt).input_ids
    if not ids and tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id]
    return list(ids)


def _check_engine_args(
    config,
    *,
    max_batch,
    max_seq_len,
    max_prefill_tokens,
    gpu_memory_utilization,
    cuda_graphs,
    compile,
    seed,
    decode_steps,
    async_decode,
) -> None:
    """Every argument of `Engine` by type, then range; a ValueError names the argument. A bool is
    not an integer nor a number here, and a string is not a number: `True` slots or a "0.9"
    utilization are mistakes, not values to coerce."""

    def fail(name, what, value):
        raise ValueError(f"{name}: must be {what}, got {value!r} ({type(value).__name__})")

    def integer(name, value, lo, hi, what):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            fail(name, what, value)

    if max_batch is not None:
        integer("max_batch", max_batch, 1, math.inf, "a positive integer")
    integer("max_prefill_tokens", max_prefill_tokens, 1, math.inf, "a positive integer")
    integer("max_seq_len", max_seq_len, 2, math.inf, "an integer >= 2")
    if max_seq_len > config.max_position_embeddings:
        raise ValueError(
            f"max_seq_len: {max_seq_len} exceeds the model's max_position_embeddings={config.max_position_embeddings}"
        )
    u = gpu_memory_utilization
    if isinstance(u, bool) or not isinstance(u, numbers.Real) or not 0.0 < u <= 1.0:
        fail("gpu_memory_utilization", "a number in (0, 1]", u)
    if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
        fail("cuda_graphs", "True, False or None (the device's default)", cuda_graphs)
    if compile is not None and not isinstance(compile, bool) and not (isinstance(compile, str) and compile):
        fail("compile", "True, False, None (the device's default) or a torch.compile backend name", compile)
    integer("seed", seed, *SEED_RANGE, "an integer in [-2**63, 2**64)")  # torch.Generator's range
    integer("decode_steps", decode_steps, 1, MAX_DECODE_STEPS, f"an integer in [1, {MAX_DECODE_STEPS}]")
    if async_decode is not None and not isinstance(async_decode, bool):
        fail("async_decode", "True, False or None (the device's default)", async_decode)


def _next_input(tokens_pos: torch.Tensor, tokens: torch.Tensor, slots: torch.Tensor, rows) -> torch.Tensor:
    """The input [2, nrows] of a window's next step: each decoding slot's sampled token (a failed
    row's -1 made a valid id, for the steps after it) at the next position. Always a new tensor:
    the eager step may hold views of the last one. When every row decodes, in order (`rows` is
    None), it is built in three small kernels instead of six: at batch 1 the GPU runs such a
    step's extra kernels back to back with the graph, so each one counts."""
    if rows is None:
        return torch.stack((tokens.clamp(min=0), tokens_pos[1] + 1))
    tokens_pos = tokens_pos.clone()
    tokens_pos[0, slots] = tokens.clamp(min=0)
    tokens_pos[1, slots] += 1
    return tokens_pos


def _by_row(per_step: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, steps] from `steps` tensors [B] (a view, no copy, for a window of one step)."""
    return per_step[0].unsqueeze(1) if len(per_step) == 1 else torch.stack(per_step, dim=1)


def _copy_to_host(drawn: torch.Tensor, logprobs: list[torch.Tensor] | None):
    """Pinned host copies of a window's tokens and logprobs, queued behind its steps, and the event
    that marks their arrival: the host then waits for these steps only, not for those queued after."""

    def host(t: torch.Tensor) -> torch.Tensor:
        copy = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        copy.copy_(t, non_blocking=True)
        return copy

    ready = torch.cuda.Event()
    drawn, logprobs = host(drawn), None if logprobs is None else [host(t) for t in logprobs]
    ready.record()
    return drawn, logprobs, ready


@contextlib.contextmanager
def _collector_paused():
    """Garbage from an earlier engine collected now, and no collection until the block ends: a
    CUDA graph freed by the cyclic collector in the middle of a capture (an earlier engine no longer
    used, kept until then by a reference cycle) invalidates that capture, at random."""
    gc.collect()
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


# The start-up phases in the order they run, as `Engine.startup` and the core process name them.
STARTUP_PHASES = {
    "process_s": "process start",
    "load_s": "load",
    "memory_s": "memory sizing",
    "compile_s": "compile and warm-up",
    "capture_s": "graph capture",
}


def describe_startup(startup: dict) -> str:
    """The phases that ran and their seconds, as in "load 1.2s, compile and warm-up 30.1s"."""
    return ", ".join(f"{name} {startup[key]:.1f}s" for key, name in STARTUP_PHASES.items() if key in startup)


class Engine:
    """Owns a model, its slot cache and the scheduling state. Not thread safe: one thread calls
    `add_request` / `abort` / `step` (the server runs it in its own process, see core.py).

    Defaults follow the device: on CUDA, `cuda_graphs`, `compile` and `async_decode` are on and
    `max_batch` is sized from free memory (`gpu_memory_utilization` of the device for weights,
    activations and the KV cache, capped at MAX_AUTO_SLOTS); on the CPU, eager and synchronous
    with CPU_SLOTS slots. `compile` may also name a torch.compile backend (True means "inductor").
    `max_seq_len` (the per-slot context) defaults to the model's max_position_embeddings.
    `decode_steps` > 1 runs that many decode steps back to back, each step's sampled tokens fed
    to the next on the device, before the host reads them (`_launch_window`): one wait for the
    GPU and one round of bookkeeping per `decode_steps` tokens instead of per token, and tokens
    reach the caller that many at a time.
    `async_decode` launches the next decode steps before the host reads the last ones' tokens, so
    that the host's per-step work (reading the tokens, bookkeeping, outputs) runs while the device
    computes instead of between its steps: outputs come one `step()` later, and while the batch is
    unchanged (nothing to admit, nobody finished) the device never waits for the host. A request
    whose end could not be known ahead (a stop token, an abort) has its slot decode one window
    more, whose tokens are dropped. On an H100 it made base's batch-1 decode 1.23x faster and its
    served throughput 1.28x (BENCHMARKS.md, fifth GPU run); on the CPU, where the host is the
    device, there is nothing to overlap, so it is off there.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_batch: int | None = None,
        max_seq_len: int | None = None,
        max_prefill_tokens: int = 8192,
        cuda_graphs: bool | None = None,
        compile: bool | None = None,
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        attn_implementation: str | None = "sdpa",
        decode_steps: int = 1,
        async_decode: bool | None = None,
    ):
        t0 = time.perf_counter()
        config = model.config
        max_seq_len = config.max_position_embeddings if max_seq_len is None else max_seq_len
        _check_engine_args(
            config,
            max_batch=max_batch,
            max_seq_len=max_seq_len,
            max_prefill_tokens=max_prefill_tokens,
            gpu_memory_utilization=gpu_memory_utilization,
            cuda_graphs=cuda_graphs,
            compile=compile,
            seed=seed,
            decode_steps=decode_steps,
            async_decode=async_decode,
        )
        self._adopt_model(model, tokenizer, attn_implementation)
        on_cuda = self.device.type == "cuda"
        self.use_graphs = on_cuda if cuda_graphs is None else bool(cuda_graphs) and on_cuda
        self.compile = on_cuda if compile is None else bool(compile)
        self._compile_backend = compile if isinstance(compile, str) else "inductor"
        self.max_seq_len = max_seq_len
        self.max_prefill_tokens = max_prefill_tokens
        self.decode_steps = decode_steps
        self.async_decode = on_cuda if async_decode is None else async_decode
        self._in_flight: _Window | None = None  # async_decode: the window whose tokens are not read yet
        self._launched: list[_Window] = []  # windows launched by the step in progress
        self.memory_plan = None
        self._min_cache_rows = 3 if self.compile else 1  # see _compiled_max_rows
        self.startup: dict = {}  # seconds per start-up phase (the serve command's start line lists them)
        if max_batch is None and on_cuda:
            t = time.perf_counter()
            max_batch = self._slots_from_memory(gpu_memory_utilization)
            self.startup["memory_s"] = time.perf_counter() - t
        self.max_batch = max_batch = CPU_SLOTS if max_batch is None else max_batch
        self._allocate_cache()
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self.free_slots: list[int] = list(range(max_batch))
        self.waiting: deque[Request] = deque()
        self.running: dict[int, Request] = {}
        self.requests: dict[str, Request] = {}
        self._outbox: list[StepOutput] = []  # outputs made between steps (aborts)
        self.stats = dict.fromkeys(
            ("prompt_tokens", "generated_tokens", "prefill_steps", "decode_steps", "finished", "aborted"), 0
        )
        self.stats["device_wait_seconds"] = 0.0  # reading sampled tokens: the device's time the host waited out
        self._kv_ranges: dict[int, torch.Tensor] = {}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._decode_impl = self._decode_forward
        if self.compile:
            self._decode_impl = torch.compile(self._decode_forward, backend=self._compile_backend)
        if self.use_graphs:
            self._capture_graphs()
        elif self.compile:
            self._compile_at_startup()
        self.startup["setup_s"] = time.perf_counter() - t0
        logger.info("engine: %s", self.describe())

    # ------------------------------------------------------------------ construction

    def _adopt_model(self, model, tokenizer, attn_implementation: str | None) -> None:
        """The model in inference mode with an attention that takes the engine's 4D float masks,
        and what the engine reads from it and the tokenizer (device, dtype, EOS and pad ids)."""
        config = model.config
        self.model = model.eval()
        if attn_implementation is not None and getattr(config, "_attn_implementation", None) not in ("eager", "sdpa"):
            model.set_attn_implementation(attn_implementation)  # only eager / sdpa take the engine's masks
        # Token ids are checked once, by `check_request`; the model's own check would sync every
        # step (and break CUDA graph capture).
        self.model.model.validate_token_ids = False
        self.tokenizer = tokenizer
        self.config = config
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = config.vocab_size
        self.sliding_window = config.sliding_window
        eos = config.eos_token_id
        self.eos_token_ids = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self.pad_token_id = config.pad_token_id if config.pad_token_id is not None else 0

    def _allocate_cache(self) -> None:
        """The slot KV cache for max_batch slots of max_seq_len tokens, and the compiled decode
        step's batch range.

        A compiled decode step never sees batch 1 (dynamo specializes a dimension of size 1, which
        would compile it a second time): batch 1 runs as 2 rows. Its batch is declared dynamic over
        [2, _compiled_max_rows], at least two sizes (one would be specialized: a violated
        mark_dynamic, the step decoding eagerly), and the cache holds that many rows at least."""
        self._smallest_bucket = 2 if self.compile else 1
        self._compiled_max_rows = max(min(COMPILED_DECODE_MAX_ROWS, self.max_batch), self._min_cache_rows)
        c = self.config
        self.cache = SlotKVCache(
            c.num_hidden_layers,
            max(self.max_batch, self._min_cache_rows),
            c.num_key_value_heads,
            self.max_seq_len,
            c.head_dim,
            self.dtype,
            self.device,
        )

    @classmethod
    def from_pretrained(cls, path, *, device=None, dtype=None, tokenizer=True, **kwargs) -> Engine:
        """Load a checkpoint folder (config.json + safetensors, tokenizer files if any), every file
        checked first (`complexity.checkpoint_folder`: a broken folder is one clear error)."""
        from ..checkpoint_folder import load_checkpoint_folder

        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        attn = kwargs.pop("attn_implementation", "sdpa")
        t = time.perf_counter()
        model, tok = load_checkpoint_folder(path, device=dev, dtype=dt, attn_implementation=attn, tokenizer=tokenizer)
        load_s = time.perf_counter() - t
        engine = cls(model, tok, attn_implementation=attn, **kwargs)
        engine.startup["load_s"] = load_s
        return engine

    def _slots_from_memory(self, utilization: float) -> int:
        """Slots of max_seq_len tokens that fit in `utilization` of the device's memory, after the
        weights (already loaded), the peak of one full prefill forward (measured) and a reserve
        for the CUDA graphs; capped at MAX_AUTO_SLOTS."""
        gib = 1 << 30
        torch.cuda.synchronize(self.device)
        peak = self._prefill_peak_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = utilization * total - (total - free) - peak - GRAPH_MEMORY_RESERVE
        per_slot = kv_bytes_per_token(self.config, self.dtype) * positions_per_slot(self.max_seq_len)
        slots = int(min(MAX_AUTO_SLOTS, budget // per_slot))
        self.memory_plan = {
            "total_gib": total / gib,
            "in_use_gib": (total - free) / gib,
            "prefill_peak_gib": peak / gib,
            "kv_budget_gib": budget / gib,
            "slot_gib": per_slot / gib,
            "utilization": utilization,
        }
        if slots < self._min_cache_rows:
            raise ValueError(
                f"gpu_memory_utilization: {utilization} of {total / gib:.1f} GiB leaves {max(budget, 0) / gib:.2f} GiB "
                f"for the KV cache ({(total - free) / gib:.1f} GiB in use, {peak / gib:.2f} GiB prefill peak), less "
                f"than {self._min_cache_rows} slot(s) of {self.max_seq_len} tokens ({per_slot / gib:.2f} GiB each): "
                "raise it, or lower max_seq_len / max_prefill_tokens"
            )
        return slots

    @torch.inference_mode()
    def _prefill_peak_bytes(self) -> int:
        """Memory above the weights taken by the largest prefill forward (with the prompt
        logprobs of a full-context prompt), measured on dummy tokens."""
        n = min(self.max_prefill_tokens, self.max_seq_len)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        ids = torch.full((1, n), self.pad_token_id, dtype=torch.long, device=self.device)
        mask = attention_mask_prefill(1, n, self.sliding_window, self.dtype, self.device)
        hidden = self.model.model(
            input_ids=ids, attention_mask=mask, position_ids=torch.arange(n, device=self.device)[None], use_cache=False
        ).last_hidden_state
        torch.log_softmax(self.model.compute_logits(hidden[0]).float(), -1)
        del hidden
        peak = torch.cuda.max_memory_allocated(self.device) - before
        torch.cuda.empty_cache()
        return peak

    def describe(self) -> str:
        """One line saying what was chosen (the startup log)."""
        kv = self.cache.nbytes / (1 << 30)
        parts = [
            f"{self.max_batch} slots x {self.max_seq_len} tokens (KV cache {kv:.2f} GiB)",
            f"{self.device}",
            str(self.dtype).removeprefix("torch."),
        ]
        if self.memory_plan is not None:
            m = self.memory_plan
            parts.append(
                f"sized from memory: {m['kv_budget_gib']:.1f} GiB KV budget at gpu_memory_utilization "
                f"{m['utilization']:.2f} of {m['total_gib']:.0f} GiB, capped at {MAX_AUTO_SLOTS} slots"
            )
        compiled_rows = min(self._compiled_max_rows, self.max_batch)
        if self.use_graphs:
            compiled = (
                f", compiled once for batches up to {compiled_rows}"
                if self.compile
                else (", compile failed: eager kernels" if "compile_error" in self.startup else "")
            )
            parts.append(
                f"decode: {len(self._graphs)} CUDA graphs ({len(self._buckets)} batch x "
                f"{len(self._kv_buckets)} context buckets{compiled})"
            )
        else:
            decode = "eager (compile failed)" if "compile_error" in self.startup else "eager"
            if self.compile:
                decode = f"compiled for batches up to {compiled_rows}"
            parts.append("decode: " + decode)
        if self.decode_steps > 1:
            parts.append(f"{self.decode_steps} decode steps per read of the tokens")
        if self.async_decode:
            parts.append("next decode steps launched before the tokens are read (async)")
        startup = describe_startup(self.startup)
        return ", ".join(parts) + (f"; start-up {startup}" if startup else "")

    # ------------------------------------------------------------------ requests

    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(prompt, self.tokenizer, self.max_seq_len)

    def check_request(self, ids: Sequence[int], params: SamplingParams, *, require_fit: bool = False) -> None:
        """Raise InvalidRequest naming the problem if `ids` cannot run with `params` here."""
        check_request(
            ids,
            params,
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            has_tokenizer=self.tokenizer is not None,
            require_fit=require_fit,
        )

    def add_request(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        checked: bool = False,
    ) -> Request:
        """Queue a request. `checked=True`: the caller already ran `check_request` (the server's
        API process does, before anything reaches the engine process)."""
        params = params or SamplingParams()
        ids = self.encode(prompt)
        if not checked:
            self.check_request(ids, params)
        rid = request_id or f"req-{next(_ids)}"
        if rid in self.requests:
            raise InvalidRequest("request_id", f"{rid!r} is already in use")
        req = Request(rid, ids, params)
        req.generator = make_generator(params.seed, self.device)
        self.waiting.append(req)
        self.requests[rid] = req
        return req

    def abort(self, request_id: str) -> bool:
        """Cancel a request now: its slot is free for the next step, and the next `step()` returns
        its final output (finish_reason "abort"). False if unknown or finished."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return False
        if req.slot is None:
            try:
                self.waiting.remove(req)
            except ValueError:
                pass
        self._finish(req, "abort")
        self.stats["aborted"] += 1
        self._outbox.append(self._output(req, [], None, None))
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_work(self) -> bool:
        """Something for `step()` to do: requests to run or outputs to hand out."""
        return bool(self.waiting or self.running or self._outbox)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ high-level API

    def _run_to_end(self, reqs: list[Request], incremental: bool) -> Iterator[StepOutput]:
        """Step until `reqs` finish, yielding their outputs with text (stop strings applied)."""
        proc = OutputProcessor(self.tokenizer)
        for r in reqs:
            proc.add_request(r.request_id, r.prompt_ids, r.params, incremental)
        pending = {r.request_id for r in reqs}
        try:
            while pending:
                outs, stopped = proc.process(self.step())
                for rid in stopped:
                    self.abort(rid)
                for out in outs:
                    if out.request_id in pending:
                        if out.finished:
                            pending.discard(out.request_id)
                        yield out
        finally:
            for rid in pending:
                self.abort(rid)
            self._outbox = [o for o in self._outbox if o.request_id not in pending]

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
        merged = {r.request_id: RequestOutput(i) for i, r in enumerate(reqs)}
        for out in self._run_to_end(reqs, incremental=False):
            merged[out.request_id].add(out)
        return [r.completion(merged[r.request_id]) for r in reqs]

    def stream(self, prompt, params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """The outputs of one request as they are decoded: `new_text` holds each text delta; the
        last one has `finished` set, its `finish_reason` and `num_generated_tokens`."""
        req = self.add_request(prompt, params)
        yield from self._run_to_end([req], incremental=True)

    # ------------------------------------------------------------------ the step

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One scheduling step; returns the outputs it produced (and those of aborts since the
        last step)."""
        outputs, self._outbox = self._outbox, []
        window, self._in_flight = self._in_flight, None
        if window is not None:
            # async: while the batch is unchanged, its next steps go to the device before this
            # window's tokens are read, and the host reads them while those run
            if self._continues(window):
                self._in_flight = self._next_window(window)  # None if that failed
            self._collect(window, outputs)
            if self._in_flight is not None:
                return outputs
        admitted = self._admit()
        if admitted:
            self._isolated(self._prefill_batch, admitted, outputs, "prefill")
        # requests admitted just now decode in the same step (their first token came from prefill)
        decoding = [r for r in self.running.values() if r.output_ids]
        if decoding:
            self._isolated(self._decode, decoding, outputs, "decode")
        launched, self._launched = self._launched, []
        if self.async_decode and len(launched) == 1:  # (a batch retried row by row is read now)
            self._in_flight = launched.pop()
        for w in launched:
            self._collect(w, outputs)
        return outputs

    def _isolated(self, run, reqs: list[Request], outputs: list[StepOutput], what: str) -> None:
        """`run(reqs, outputs)` for the batch; if it raises, for each request alone, so that only a
        request that fails by itself fails (a forward changes no request state before it returns)."""
        try:
            run(reqs, outputs)
        except Exception as err:
            if len(reqs) == 1:
                logger.exception("%s failed", what)
                self._fail(reqs[0], err, outputs)
                return
            logger.warning(
                "%s of %d requests failed (%s: %s); retrying them one by one", what, len(reqs), type(err).__name__, err
            )
            for r in reqs:
                try:
                    run([r], outputs)
                except Exception as one_err:
                    logger.exception("%s of request %s failed", what, r.request_id)
                    self._fail(r, one_err, outputs)

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

    def _prefill_batch(self, reqs: list[Request], outputs: list[StepOutput]) -> None:
        b = len(reqs)
        lens = [len(r.prompt_ids) for r in reqs]
        s = max(lens)
        ids = torch.full((b, s), self.pad_token_id, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, : lens[i]] = torch.tensor(r.prompt_ids, dtype=torch.long)
        ids = ids.to(self.device)
        self.cache.set_prefill(torch.tensor([r.slot for r in reqs], device=self.device))
        try:
            pos = mask = None  # the kernel's causal mode: 1.2x the masked prefill of 1,024 tokens (CPU)
            if not self.model.model.causal_without_mask(None, self.cache, None, s):  # eager attention, window < s
                pos = torch.arange(s, device=self.device)[None].expand(b, s)
                mask = attention_mask_prefill(b, s, self.sliding_window, self.dtype, self.device)
            hidden = self.model.model(
                input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=self.cache, use_cache=True
            ).last_hidden_state
        finally:
            self.cache.set_decode(None, self.max_seq_len)
        last = hidden[torch.arange(b, device=self.device), torch.tensor(lens, device=self.device) - 1]
        logits = self.model.compute_logits(last).float()
        prompt_lps = [self._prompt_logprobs(r, hidden[i], ids[i]) for i, r in enumerate(reqs)]
        self.stats["prefill_steps"] += 1
        self.stats["prompt_tokens"] += sum(lens)
        for r, lps in zip(reqs, prompt_lps):
            r.prompt_logprobs = lps
        scoring = [r for r in reqs if r.params.max_new_tokens == 0]
        for r in scoring:  # score-only: the prompt logprobs are the whole answer
            self._finish(r, "length")
            outputs.append(self._output(r, [], None, r.prompt_logprobs))
        sampling = [i for i, r in enumerate(reqs) if r.params.max_new_tokens != 0]
        if sampling:
            self._sample_and_emit([reqs[i] for i in sampling], logits[sampling], outputs, first=True)

    def _prompt_logprobs(self, r: Request, hidden: torch.Tensor, ids: torch.Tensor) -> list[TokenLogprob] | None:
        k = r.params.prompt_logprobs
        if k is None:
            return None
        n = len(r.prompt_ids)
        entries = [TokenLogprob(r.prompt_ids[0], None, None)]
        if n > 1:
            lp, top_ids, top_lp = top_logprobs(self.model.compute_logits(hidden[: n - 1]).float(), ids[1:n], k)
            lp, top_ids, top_lp = lp.tolist(), top_ids.tolist(), top_lp.tolist()
            entries += [
                TokenLogprob(r.prompt_ids[j + 1], lp[j], list(zip(top_ids[j], top_lp[j]))) for j in range(n - 1)
            ]
        return entries

    def _decode(self, reqs: list[Request], outputs: list[StepOutput]) -> None:
        nrows = max(r.slot for r in reqs) + 1
        tokens = [self.pad_token_id] * nrows
        pos = [0] * nrows
        if len(reqs) != len(self.running):  # (usually every running request decodes)
            for r in self.running.values():
                # rows of slots that hold a request but do not decode now write their dummy key at
                # the next free position of that request (overwritten before it is ever read)
                if r.slot < nrows:
                    pos[r.slot] = min(r.num_cached, self.max_seq_len - 1)
        for r in reqs:
            tokens[r.slot] = r.output_ids[-1]
            pos[r.slot] = r.num_cached
        steps = self._steps_ahead(reqs)
        slots = [r.slot for r in reqs]
        # skip the gather in the common case: every row decodes, in order
        rows = None if slots == list(range(nrows)) else torch.tensor(slots, device=self.device)
        tokens_pos = torch.tensor([tokens, pos])
        if steps == 1 and not self.async_decode:
            logits = self._run_decode(tokens_pos, nrows, max(pos) + 1)
            self.stats["decode_steps"] += 1
            self._sample_and_emit(reqs, logits if rows is None else logits[rows], outputs, first=False)
            return
        window = self._launch_window(
            reqs,
            self._sampler(reqs, self.device),
            torch.tensor(slots, device=self.device),
            rows,
            nrows,
            tokens_pos.to(self.device),
            max(pos),
            steps,
        )
        self._launched.append(window)  # step() reads it now, or after launching the next (async)

    def _steps_ahead(self, reqs: list[Request], pending: int = 0) -> int:
        """How many decode steps to run before reading the tokens: `decode_steps`, at most as many
        as some request still wants and every slot has room for, after `pending` steps launched
        and not read yet (0: no step can run)."""
        if self.decode_steps == 1 and not pending:
            return 1
        room = min(self.max_seq_len - r.num_cached - pending for r in reqs)
        wanted = max(
            self.decode_steps
            if r.params.max_new_tokens is None
            else r.params.max_new_tokens - len(r.output_ids) - pending
            for r in reqs
        )
        return max(0, min(self.decode_steps, room, wanted))

    def _launch_window(
        self,
        reqs: list[Request],
        sampler: BatchSampler,
        slots: torch.Tensor,
        rows: torch.Tensor | None,
        nrows: int,
        tokens_pos: torch.Tensor,
        max_pos: int,
        steps: int,
    ) -> _Window:
        """`steps` decode steps back to back on the device from the input `tokens_pos` [2, nrows]:
        each step's sampled tokens become the next step's input there, and the host reads them
        all once, in `_collect`, so it neither waits for the device nor does its bookkeeping
        between two tokens. A request that finishes inside the window (a stop token, its length)
        drops the tokens it sampled after: only their compute is lost (a stop string is found by
        the output processor, which cuts the output after the token that completed it). Sampling
        draws as the single steps would, penalties counting each step's tokens on the device: the
        same tokens for greedy and seeded requests, and the same logprobs."""
        need_kv = max_pos + steps
        drawn, logprobs = [], []
        for _ in range(steps):
            logits = self._run_decode(tokens_pos, nrows, need_kv)
            logits = logits if rows is None else logits[rows]
            tokens = sampler.sample(logits)  # a row with non-finite logits: -1, its request fails below
            logprobs.append(sampler.logprobs(logits, tokens))
            sampler.count(tokens)
            drawn.append(tokens)
            tokens_pos = _next_input(tokens_pos, tokens, slots, rows)
        self.stats["decode_steps"] += steps
        stacked = _by_row(drawn)
        stacked_lps = None if logprobs[0] is None else [_by_row(t) for t in zip(*logprobs)]
        ready = None
        if self.async_decode and self.device.type == "cuda":
            stacked, stacked_lps, ready = _copy_to_host(stacked, stacked_lps)
        return _Window(
            reqs, sampler, slots, rows, nrows, steps, tokens_pos, max_pos + steps, stacked, stacked_lps, ready
        )

    def _continues(self, window: _Window) -> bool:
        """Whether `window`'s batch decodes on unchanged: it holds every running request (none of
        them has finished since it was launched), none waits for a free slot, and some request
        wants more tokens than the window brings, with room for them."""
        if len(window.reqs) != len(self.running) or (self.waiting and self.free_slots):
            return False
        return self._steps_ahead(window.reqs, pending=window.steps) > 0

    def _next_window(self, window: _Window) -> _Window | None:
        """The steps after `window`, from the input it left on the device; None if launching them
        failed (the requests then decode through the usual path, isolated)."""
        try:
            steps = self._steps_ahead(window.reqs, pending=window.steps)
            return self._launch_window(
                window.reqs,
                window.sampler,
                window.slots,
                window.rows,
                window.nrows,
                window.next_input,
                window.next_max_pos,
                steps,
            )
        except Exception as err:
            logger.warning("launching the next decode steps failed (%s: %s)", type(err).__name__, err)
            return None

    def _collect(self, window: _Window, outputs: list[StepOutput]) -> None:
        """Read `window`'s tokens (waiting for its steps only) and hand them to its requests; a
        request that ended before they were read (aborted, or in an earlier window) drops them."""
        drawn = self._read(window.drawn, window.ready)
        now = time.perf_counter()
        reqs = window.reqs
        entries = self._logprob_entries(reqs, window.sampler, window.logprobs)
        for i, (r, toks) in enumerate(zip(reqs, drawn)):
            if r.finished:
                continue
            accepted = []
            for tok in toks:
                if tok < 0:
                    break
                accepted.append(tok)
                self._accept(r, tok, now)
                if r.finished:
                    break
            lps = [TokenLogprob(t, *e) for t, e in zip(accepted, entries[i])] if i in entries else None
            if accepted:
                outputs.append(self._output(r, accepted, lps, None))
            if not r.finished and len(accepted) < len(toks):
                self._fail(r, FloatingPointError("the model produced non-finite logits"), outputs)

    def _read(self, tokens: torch.Tensor, ready=None) -> list:
        """Sampled tokens as a list, after `ready` (the event of their copy to the host, where there
        is one). The time this waits for the device adds to stats["device_wait_seconds"]: against
        the time in steps it says how much of a step is the device's and how much the host's."""
        start = time.perf_counter()
        if ready is not None:
            ready.synchronize()
        out = tokens.tolist()
        self.stats["device_wait_seconds"] += time.perf_counter() - start
        return out

    def _decode_forward(self, tokens: torch.Tensor, pos: torch.Tensor, kv_range: torch.Tensor) -> torch.Tensor:
        """Logits [B, V] (float32) of tokens [B, 1] at positions pos [B], attending over the cache
        positions kv_range = arange(kv_len): its length is a tensor size, so one compiled graph
        serves every context bucket (a Python int would be specialized and recompiled)."""
        kv_len = kv_range.shape[0]
        self.cache.set_decode(pos, kv_len)
        mask = attention_mask_decode(pos, kv_range, self.sliding_window, self.dtype)
        hidden = self.model.model(
            input_ids=tokens, attention_mask=mask, position_ids=pos[:, None], past_key_values=self.cache, use_cache=True
        ).last_hidden_state
        return self.model.compute_logits(hidden[:, -1]).float()

    def _kv_range(self, kv_len: int) -> torch.Tensor:
        r = self._kv_ranges.get(kv_len)
        if r is None:
            r = self._kv_ranges[kv_len] = torch.arange(kv_len, device=self.device)
        return r

    def _call_decode(self, tokens: torch.Tensor, pos: torch.Tensor, kv_range: torch.Tensor) -> torch.Tensor:
        if not self.compile or tokens.shape[0] > self._compiled_max_rows:
            return self._decode_forward(tokens, pos, kv_range)
        # batch and context dynamic: one compile for every shape. The batch's declared range is
        # what the decode kernels are chosen from (never a guard), and its maximum is within the
        # cache's rows, so the view cache[:batch] needs no guard either.
        for t in (tokens, pos):
            torch._dynamo.mark_dynamic(t, 0, min=self._smallest_bucket, max=self._compiled_max_rows)
        torch._dynamo.mark_dynamic(kv_range, 0)
        return self._decode_impl(tokens, pos, kv_range)

    def _run_decode(self, tokens_pos: torch.Tensor, nrows: int, need_kv: int) -> torch.Tensor:
        """Logits [nrows, V] for the tensor [2, nrows] of (last token, its position) per row (on the
        CPU, or already on the device: `_launch_window`), attending over at least `need_kv` cache
        positions."""
        if self.use_graphs:
            bucket = next(b for b in self._buckets if b >= nrows)
            kv = next(k for k in self._kv_buckets if k >= need_kv)
            static_in = self._static_in[bucket]
            if nrows < bucket:  # rows past nrows hold no decoding request: a padding token at position 0
                static_in[0].fill_(self.pad_token_id)
                static_in[1].zero_()
            static_in[:, :nrows].copy_(tokens_pos, non_blocking=True)  # one host-to-device copy
            self._graphs[(bucket, kv)].replay()
            return self._logits[:nrows]
        # eager: attend over the filled prefix only, rounded up to limit allocations
        kv_len = min(self.max_seq_len, -(-need_kv // 128) * 128)
        if nrows < self._smallest_bucket:  # a padding row: a padding token at position 0 of a free slot
            pad = torch.tensor([[self.pad_token_id], [0]], device=tokens_pos.device).expand(
                2, self._smallest_bucket - nrows
            )
            tokens_pos = torch.cat([tokens_pos, pad], dim=1)
        tokens_pos = tokens_pos.to(self.device)
        return self._call_decode(tokens_pos[0, :, None], tokens_pos[1], self._kv_range(kv_len))[:nrows]

    def _compile_at_startup(self) -> None:
        """Without CUDA graphs (the CPU), the decode step is compiled here, at its largest compiled
        batch, rather than inside the first request: the time is startup's, and a compile that
        fails (no C++ compiler on the machine, say) leaves the eager step, never a failed request."""
        t0 = time.perf_counter()
        rows = self._compiled_max_rows
        try:
            with torch.inference_mode():  # the steps' own mode: its tensors, hence its guards
                tokens = torch.full((rows, 1), self.pad_token_id, dtype=torch.long, device=self.device)
                pos = torch.zeros(rows, dtype=torch.long, device=self.device)  # free slots: overwritten before read
                self._call_decode(tokens, pos, self._kv_range(min(self.max_seq_len, 128)))
        except Exception as err:
            self._drop_compile(err)
        self.startup["compile_s"] = time.perf_counter() - t0

    def _drop_compile(self, err: Exception) -> None:
        """An optimization must not keep the engine from starting: say so, and decode eagerly."""
        logger.warning("torch.compile of the decode step failed (%s: %s); decoding eagerly", type(err).__name__, err)
        self.startup["compile_error"] = f"{type(err).__name__}: {err}"
        self.compile, self._decode_impl = False, self._decode_forward

    def _warm_up(self) -> None:
        """Every graph shape runs once before any capture (the largest compiled one first: that
        call compiles): kernels are selected, loaded and their workspaces allocated outside the
        graphs."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for kv in reversed(self._kv_buckets):
                for b in reversed(self._buckets):
                    self._call_decode(self._static_in[b][0, :, None], self._static_in[b][1], self._kv_range(kv))
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)

    def _capture_graphs(self) -> None:
        """One CUDA graph per (batch bucket, context bucket) over static input buffers, all
        writing their logits into one static buffer; compiled once first when `compile`."""
        t0 = time.perf_counter()
        self._buckets = batch_buckets(max(self.max_batch, self._smallest_bucket), self._smallest_bucket)
        self._kv_buckets = context_buckets(self.max_seq_len)
        self._static_in = {}
        self._logits = torch.empty(self._buckets[-1], self.vocab_size, dtype=torch.float32, device=self.device)
        pool = None
        with torch.inference_mode():
            for b in self._buckets:  # compile (if on) and warm up outside any capture, every shape
                static_in = torch.zeros(2, b, dtype=torch.long, device=self.device)  # tokens; positions
                static_in[0].fill_(self.pad_token_id)
                self._static_in[b] = static_in
            try:
                self._warm_up()
            except Exception as err:
                if not self.compile:
                    raise
                self._drop_compile(err)
                self._warm_up()
            self.startup["compile_s"] = time.perf_counter() - t0  # warm-up, and the compile if on
            t0 = time.perf_counter()
            with _collector_paused():
                for kv in reversed(self._kv_buckets):
                    for b in reversed(self._buckets):
                        static_in = self._static_in[b]
                        graph = torch.cuda.CUDAGraph()
                        with torch.cuda.graph(graph, pool=pool):
                            out = self._call_decode(static_in[0, :, None], static_in[1], self._kv_range(kv))
                            self._logits[:b].copy_(out)
                        del out
                        pool = graph.pool()
                        self._graphs[(b, kv)] = graph
        torch.cuda.synchronize(self.device)
        self.startup["capture_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ sampling and bookkeeping

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list:
        """Per row: (token id, TokenLogprob or None), or the Exception that row raised. The batch
        is sampled at once; if that fails, row by row, so one request's values fail only it."""
        try:
            return self._sample_rows(reqs, logits)
        except Exception as err:
            if len(reqs) == 1:
                return [err]
            logger.warning(
                "sampling %d rows failed (%s: %s); sampling them one by one", len(reqs), type(err).__name__, err
            )
            out = []
            for i, r in enumerate(reqs):
                try:
                    out += self._sample_rows([r], logits[i : i + 1])
                except Exception as one_err:
                    out.append(one_err)
            return out

    def _sampler(self, reqs: list[Request], device: torch.device) -> BatchSampler:
        return BatchSampler(
            [r.params for r in reqs],
            [r.generator for r in reqs],
            [r.prompt_ids for r in reqs],
            [r.output_ids for r in reqs],
            self.vocab_size,
            device,
            self.generator,
        )

    @staticmethod
    def _logprob_entries(reqs: list[Request], sampler: BatchSampler, logprobs) -> dict[int, list[tuple]]:
        """Row -> (logprob, top [(id, logprob)]) per step, for the rows that asked for logprobs,
        from the sampler's (chosen [L, S], top ids [L, S, k], top logprobs [L, S, k]) of S steps."""
        if logprobs is None:
            return {}
        lp, top_ids, top_lp = (t.tolist() for t in logprobs)
        entries = {}
        for j, i in enumerate(sampler.logprob_rows):
            k = reqs[i].params.logprobs
            entries[i] = [(lp[j][s], list(zip(top_ids[j][s][:k], top_lp[j][s][:k]))) for s in range(len(lp[j]))]
        return entries

    def _sample_rows(self, reqs: list[Request], logits: torch.Tensor) -> list:
        sampler = self._sampler(reqs, logits.device)
        tokens = sampler.sample(logits)
        logprobs = sampler.logprobs(logits, tokens)
        entries = self._logprob_entries(reqs, sampler, None if logprobs is None else [t[:, None] for t in logprobs])
        out = []
        for i, tok in enumerate(self._read(tokens)):
            if tok < 0:
                out.append(FloatingPointError("the model produced non-finite logits"))
            else:
                e = entries[i][0] if i in entries else None
                out.append((tok, TokenLogprob(tok, e[0], e[1]) if e is not None else None))
        return out

    def _sample_and_emit(
        self, reqs: list[Request], logits: torch.Tensor, outputs: list[StepOutput], first: bool
    ) -> None:
        now = time.perf_counter()
        for r, res in zip(reqs, self._sample(reqs, logits)):
            if isinstance(res, Exception):
                self._fail(r, res, outputs)
                continue
            tok, entry = res
            self._accept(r, tok, now)
            outputs.append(
                self._output(r, [tok], [entry] if entry is not None else None, r.prompt_logprobs if first else None)
            )

    def _accept(self, r: Request, tok: int, now: float) -> None:
        """Append a sampled token to its request; finish the request on a stop token, at its
        max_new_tokens or when its slot is full."""
        r.output_ids.append(tok)
        self.stats["generated_tokens"] += 1
        if r.first_token_time is None:
            r.first_token_time = now
        p = r.params
        n = len(r.output_ids)
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            self._finish(r, "stop")
        # at its length, or its slot full (len(prompt) + n = num_cached + 1 positions for the next step)
        elif (p.max_new_tokens is not None and n >= p.max_new_tokens) or len(r.prompt_ids) + n > self.max_seq_len:
            self._finish(r, "length")

    def _output(self, req: Request, tokens, logprobs, prompt_logprobs, error: str | None = None) -> StepOutput:
        return StepOutput(
            req.request_id,
            tokens,
            logprobs,
            prompt_logprobs,
            req.finished,
            req.finish_reason,
            len(req.prompt_ids),
            len(req.output_ids),
            error,
        )

    def _finish(self, req: Request, reason: str) -> None:
        req.finished = True
        req.finish_reason = reason
        req.finish_time = time.perf_counter()
        self.requests.pop(req.request_id, None)
        if req.slot is not None:
            self.running.pop(req.slot, None)
            heapq.heappush(self.free_slots, req.slot)
            req.slot = None
        self.stats["finished"] += 1

    def _fail(self, req: Request, err: Exception, outputs: list[StepOutput]) -> None:
        if req.finished:
            return
        self._finish(req, "error")
        outputs.append(self._output(req, [], None, None, error=f"{type(err).__name__}: {err}"))


__all__ = [
    "Engine",
    "check_params",
    "check_request",
    "Completion",
    "StepOutput",
    "TokenLogprob",
    "Request",
    "batch_buckets",
    "context_buckets",
]
