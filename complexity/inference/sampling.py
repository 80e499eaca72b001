"""Sampling parameters and the batched logits processors of the inference engine.

One decode step samples every active request at once: the processors below take a [B, V]
float32 logits tensor and per-row parameters (tensors of length B), so a batch mixing greedy
and sampled requests with different penalties / temperatures / top-k / top-p / min-p costs a
few kernels, not a loop over rows. Order, vLLM's (whose request fields the server takes): logit
bias, repetition penalty, presence/frequency penalties, then temperature, min-p, top-k, top-p.
(transformers' `generate()` applies min-p last; with top-p and min-p both set the two differ.)

Seeded requests own a `torch.Generator`, so their draws do not depend on which other requests
share the batch; unseeded rows share the engine's generator.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import NoReturn

import torch

from .errors import InvalidRequest

# The stated ranges of every field (InvalidRequest names the field otherwise). They keep the
# float32 arithmetic of the sampler finite: a temperature of 1e-45 or a penalty of 1e-40 would
# overflow the logits, a top_k past int64 would not fit a tensor.
MAX_LOGPROBS = 20
MIN_TEMPERATURE, MAX_TEMPERATURE = 1e-4, 1e4  # or exactly 0 (greedy)
MIN_PENALTY, MAX_PENALTY = 0.01, 100.0
MAX_OCCURRENCE_PENALTY = 2.0  # presence / frequency, OpenAI's range [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range [-100, 100]
MAX_LOGIT_BIAS_ENTRIES = 2048  # bounds the per-step work and what each request ships to the engine
MAX_TOKEN_ID = 2**31 - 1
MAX_TOP_K = 2**31 - 1  # values past the vocabulary keep every token
MAX_NEW_TOKENS = 2**31 - 1
SEED_RANGE = (-(2**63), 2**64 - 1)
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1000


@dataclass
class SamplingParams:
    """How one request is decoded (ranges: the constants above).

    temperature: 0 means greedy (argmax); otherwise logits / temperature, in [1e-4, 1e4].
    top_k: keep the k most likely tokens (0 = off). top_p: nucleus mass in (0, 1] (1 = off).
    min_p: drop tokens with p < min_p * p_max, in [0, 1] (0 = off). repetition_penalty: the CTRL
    penalty over prompt and generated tokens, in [0.01, 100] (1 = off). presence_penalty,
    frequency_penalty: OpenAI's penalties over the generated tokens, in [-2, 2]: a token's logit
    loses presence_penalty once if it was generated and frequency_penalty per time it was (0 =
    off). logit_bias: token id -> a bias in [-100, 100] added to its logit (ids are checked
    against the model's vocabulary when the request is admitted). max_new_tokens: tokens to
    generate (0 only with prompt_logprobs: score the prompt, generate nothing; None: until the
    context is full). stop: up to 16 strings (1 to 1000 characters) that end the text (not
    included in it). stop_token_ids: extra ids that end generation (the eos id always does unless
    ignore_eos). seed: per-request generator (an int64 or uint64). logprobs: return the
    log-probability of each generated token plus this many top alternatives, 0 to 20 (None =
    off). prompt_logprobs: likewise for the prompt tokens (the first token gets None).
    """

    max_new_tokens: int | None = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        self.validate()

    @property
    def penalised(self) -> bool:
        """Whether `Penalties` changes this request's logits."""
        return (
            bool(self.logit_bias)
            or self.repetition_penalty != 1.0
            or bool(self.presence_penalty or self.frequency_penalty)
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise InvalidRequest (a ValueError) naming the first bad field, in this order; each
        field's type is checked before its range."""
        self._validate_length()
        self._validate_filters()
        self._validate_penalties()
        self._validate_stops()
        self._validate_seed_and_logprobs()

    def _validate_length(self) -> None:
        if self.max_new_tokens is None:
            return
        _integer("max_new_tokens", self.max_new_tokens)
        lo = 0 if self.prompt_logprobs is not None else 1  # 0: the prompt is scored, nothing generated
        if self.max_new_tokens == 0 and lo == 1:
            _fail("max_new_tokens", "must be >= 1 (0 only when scoring the prompt), got 0")
        _within("max_new_tokens", self.max_new_tokens, lo, MAX_NEW_TOKENS, f"in [{lo}, {MAX_NEW_TOKENS}]")

    def _validate_filters(self) -> None:
        _finite("temperature", self.temperature)
        if self.temperature != 0:
            lo, hi = MIN_TEMPERATURE, MAX_TEMPERATURE
            _within("temperature", self.temperature, lo, hi, f"0 (greedy) or in [{lo:g}, {hi:g}]")
        _integer_in("top_k", self.top_k, 0, MAX_TOP_K, f"in [0, {MAX_TOP_K}] (0 = off)")
        _finite("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            _fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        _number_in("min_p", self.min_p, 0.0, 1.0, "in [0, 1]")

    def _validate_penalties(self) -> None:
        lo, hi = MIN_PENALTY, MAX_PENALTY
        _number_in("repetition_penalty", self.repetition_penalty, lo, hi, f"in [{lo:g}, {hi:g}] (1 = off)")
        occ = MAX_OCCURRENCE_PENALTY
        for name in ("presence_penalty", "frequency_penalty"):
            _number_in(name, getattr(self, name), -occ, occ, f"in [{-occ:g}, {occ:g}] (0 = off)")
        if len(self.logit_bias) > MAX_LOGIT_BIAS_ENTRIES:
            _fail("logit_bias", f"at most {MAX_LOGIT_BIAS_ENTRIES} entries, got {len(self.logit_bias)}")
        big = MAX_LOGIT_BIAS
        for t, bias in self.logit_bias.items():
            _integer_in("logit_bias", t, 0, MAX_TOKEN_ID, f"keyed by token ids in [0, {MAX_TOKEN_ID}]")
            _number_in("logit_bias", bias, -big, big, f"biases in [{-big:g}, {big:g}] (token {t})")

    def _validate_stops(self) -> None:
        if len(self.stop) > MAX_STOP_STRINGS:
            _fail("stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS:
                _fail("stop", f"stop strings must be strings of 1 to {MAX_STOP_CHARS} characters, got {s!r:.40}")
        for t in self.stop_token_ids:
            _integer_in("stop_token_ids", t, 0, MAX_TOKEN_ID, f"token ids in [0, {MAX_TOKEN_ID}]")

    def _validate_seed_and_logprobs(self) -> None:
        if self.seed is not None:
            _integer_in("seed", self.seed, *SEED_RANGE, f"in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]")
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                _integer_in(name, getattr(self, name), 0, MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}]")

    def copy(self, **changes) -> SamplingParams:
        return replace(self, **changes)


def _fail(name: str, msg: str) -> NoReturn:
    raise InvalidRequest(name, msg)


def _finite(name: str, value) -> None:
    # A bool is an int to Python but never a number here; a string is never coerced.
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        _fail(name, f"must be a finite number, got {value!r:.40}")


def _integer(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"must be an integer, got {value!r}")


def _within(name: str, value, lo, hi, what: str) -> None:
    if not lo <= value <= hi:
        _fail(name, f"must be {what}, got {value!r}")


def _number_in(name: str, value, lo, hi, what: str) -> None:
    _finite(name, value)
    _within(name, value, lo, hi, what)


def _integer_in(name: str, value, lo, hi, what: str) -> None:
    _integer(name, value)
    _within(name, value, lo, hi, what)


def _row_ids(ids: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, id) index tensors of a [len(ids), V] tensor for every id of each row's list,
    built from one flat list: per-element (row, id) pairs took ~15x longer to build (64 rows of
    ~230 ids: 16 ms against 1 ms on the CPU), and the penalties are rebuilt at every read of the
    tokens."""
    flat = torch.tensor(list(itertools.chain.from_iterable(ids)), dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(ids)), torch.tensor([len(r) for r in ids], dtype=torch.long))
    return rows.to(device), flat.to(device)


class Penalties:
    """The logits processors that depend on the tokens so far, for the rows of one batch that use
    any: logit bias, the CTRL repetition penalty over prompt and output (logit / p if positive,
    else logit * p), then OpenAI's presence and frequency penalties over the output (logit -
    presence * [count > 0] - frequency * count). Held as dense [rows, V] tensors on the device,
    built once from the tokens so far: applying them reads nothing from the host, and `count`
    adds a step's sampled tokens on the device, so a window of decode steps penalises each step as
    single steps would."""

    def __init__(self, params: list[SamplingParams], prompts, outputs, vocab: int, device: torch.device):
        rows = [i for i, p in enumerate(params) if p.penalised]
        sub = [params[i] for i in rows]
        self.rows = torch.tensor(rows, device=device)
        shape = (len(rows), vocab)
        self.bias = self.seen = self.counts = None
        if any(p.logit_bias for p in sub):
            self.bias = torch.zeros(shape, device=device)
            values = torch.tensor([b for p in sub for b in p.logit_bias.values()], device=device)
            self.bias[_row_ids([list(p.logit_bias) for p in sub], device)] = values
        if any(p.repetition_penalty != 1.0 for p in sub):
            self.rep = torch.tensor([p.repetition_penalty for p in sub], device=device)[:, None]
            self.seen = torch.zeros(shape, dtype=torch.bool, device=device)
            seen = [prompts[i] + outputs[i] if p.repetition_penalty != 1.0 else [] for i, p in zip(rows, sub)]
            self.seen[_row_ids(seen, device)] = True
        if any(p.presence_penalty or p.frequency_penalty for p in sub):
            self.presence = torch.tensor([p.presence_penalty for p in sub], device=device)[:, None]
            self.frequency = torch.tensor([p.frequency_penalty for p in sub], device=device)[:, None]
            self.counts = torch.zeros(shape, device=device)
            at = _row_ids([outputs[i] for i in rows], device)
            self.counts.index_put_(at, torch.ones(len(at[1]), device=device), accumulate=True)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of float32 logits [B, V] with the penalised rows processed."""
        logits = logits.clone()
        sub = logits[self.rows]
        if self.bias is not None:
            sub += self.bias
        if self.seen is not None:
            sub = torch.where(self.seen, torch.where(sub > 0, sub / self.rep, sub * self.rep), sub)
        if self.counts is not None:
            sub -= self.frequency * self.counts + self.presence * (self.counts > 0)
        logits[self.rows] = sub
        return logits

    def count(self, tokens: torch.Tensor) -> None:
        """Add the batch's sampled tokens [B] (-1: a failed row, skipped) to the tokens so far."""
        if self.seen is None and self.counts is None:
            return
        tok = tokens[self.rows]
        valid = tok >= 0
        tok = tok.clamp(min=0)[:, None]
        if self.seen is not None:
            self.seen.scatter_(1, tok, self.seen.gather(1, tok) | valid[:, None])
        if self.counts is not None:
            self.counts.scatter_add_(1, tok, valid[:, None].float())


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor
) -> torch.Tensor:
    """Probabilities [B, V] after temperature, min-p, top-k and top-p, in vLLM's order (rows with
    temperature 0 are given temperature 1 here; the caller takes their argmax instead). Each row's
    maximum is subtracted before dividing by its temperature, so a small temperature cannot
    overflow. Top-p's mass is counted over what min-p and top-k kept, renormalized."""
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    logits = (logits - logits.amax(-1, keepdim=True)) / temp[:, None]
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    remove = ranks >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(-1)
    # min-p: relative to the most likely token, so the same set before or after top-k
    remove = remove | (probs < min_p[:, None] * probs[:, :1])
    probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(-1)
    # top-p: drop a token when the mass before it already reaches top_p (the first always stays)
    before = probs.cumsum(-1) - probs
    remove = remove | ((before >= top_p[:, None]) & (ranks > 0))
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    probs = sorted_logits.softmax(-1)
    return torch.empty_like(probs).scatter_(-1, sorted_idx, probs)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed) & 0xFFFF_FFFF_FFFF_FFFF)
    return gen


class BatchSampler:
    """The sampling of one batch of requests, prepared once (per decode step, or once for a window
    of steps): the parameter tensors, the penalties' state, each row's generator.

    `sample(logits)` draws the next tokens; `logprobs(logits, tokens)` gives the rows that asked
    for them their entries; `count(tokens)` adds a step's tokens to the penalties' state. All of
    it stays on the device: nothing waits for the host between two steps of a window. Draws use the
    exponential race (argmax of p / E with E ~ Exp(1), a sample from p): unlike `torch.multinomial`,
    it never raises (nor, on CUDA, asserts) on a degenerate row."""

    def __init__(
        self,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
        prompts: list[list[int]],
        outputs: list[list[int]],
        vocab: int,
        device: torch.device,
        default_generator: torch.Generator | None = None,
    ):
        """`prompts[i]` and `outputs[i]` are row i's prompt and generated ids so far (read only for
        the rows whose penalties need them)."""
        self.params, self.generators, self.default_generator = params, generators, default_generator
        self.penalties = (
            Penalties(params, prompts, outputs, vocab, device) if any(p.penalised for p in params) else None
        )
        self.sampled = [i for i, p in enumerate(params) if not p.greedy]
        self.logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        # a greedy batch (the common case at batch 1, where the host bounds the step) builds no tensors
        if self.sampled:
            sub = [params[i] for i in self.sampled]
            self._sampled_rows = torch.tensor(self.sampled, device=device)
            self._filters = (
                torch.tensor([p.temperature for p in sub], device=device, dtype=torch.float32),
                torch.tensor([p.top_k for p in sub], device=device, dtype=torch.long),
                torch.tensor([p.top_p for p in sub], device=device, dtype=torch.float32),
                torch.tensor([p.min_p for p in sub], device=device, dtype=torch.float32),
            )
        if self.logprob_rows:
            self._logprob_rows = torch.tensor(self.logprob_rows, device=device)

    def sample(self, logits: torch.Tensor) -> torch.Tensor:
        """Next token ids [B] (long, on logits' device) for float32 logits [B, V]; -1 for a row
        whose logits are not all finite (a broken model: its request fails alone)."""
        processed = logits.float() if self.penalties is None else self.penalties(logits.float())
        out = processed.argmax(dim=-1)
        if self.sampled:
            probs = filter_logits(processed[self._sampled_rows], *self._filters)
            noise = torch.empty_like(probs)
            if any(self.generators[i] is None for i in self.sampled):
                noise.exponential_(generator=self.default_generator)
            for j, i in enumerate(self.sampled):
                if self.generators[i] is not None:  # a seeded request draws from its own generator only
                    noise[j].exponential_(generator=self.generators[i])
            noise.clamp_(min=torch.finfo(noise.dtype).tiny)  # a draw of exactly 0 would divide by zero
            out[self._sampled_rows] = (probs / noise).argmax(-1)
        return torch.where(torch.isfinite(logits).all(-1), out, -1)

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor):
        """For the rows in `logprob_rows`: (chosen logprob [L], top ids [L, k], top logprobs [L, k])
        from the raw model distribution, k the largest any of them asked for; None if none did."""
        if not self.logprob_rows:
            return None
        k = max(self.params[i].logprobs for i in self.logprob_rows)
        rows = self._logprob_rows
        return top_logprobs(logits[rows], tokens[rows].clamp(min=0), k)

    def count(self, tokens: torch.Tensor) -> None:
        """The tokens [B] just sampled become part of the tokens so far (for the next step of a
        window)."""
        if self.penalties is not None:
            self.penalties.count(tokens)


def top_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int):
    """For logits [N, V] and chosen ids [N]: (chosen logprob [N], top-k ids [N, k], top-k logprobs [N, k])
    from the raw model distribution (log_softmax in float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen_lp = logp.gather(-1, chosen[:, None]).squeeze(-1)
    if k > 0:
        vals, ids = logp.topk(k, dim=-1)
    else:
        vals = logp.new_empty(logp.shape[0], 0)
        ids = chosen.new_empty(logp.shape[0], 0)
    return chosen_lp, ids, vals


__all__ = [
    "SamplingParams",
    "BatchSampler",
    "Penalties",
    "filter_logits",
    "make_generator",
    "top_logprobs",
    "MAX_LOGPROBS",
]
