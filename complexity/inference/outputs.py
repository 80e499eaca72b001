"""What the engine hands out: per-step token outputs, and finished completions.

`StepOutput` is a NamedTuple on purpose: the engine process sends one list of them per step to
the API process, and tuples pickle several times faster than dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple


class TokenLogprob(NamedTuple):
    """One position: the token, its log-probability, and the top alternatives [(id, logprob)]."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]] | None


class StepOutput(NamedTuple):
    """What one request gained in one engine step. The engine fills the token fields; the output
    processor (detokenize.py) fills `new_text` and may end a request on a stop string."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    prompt_logprobs: list[TokenLogprob] | None  # only on the first output
    finished: bool
    finish_reason: str | None  # "stop" (eos / stop token / stop string), "length", "abort", "error"
    num_prompt_tokens: int
    num_generated_tokens: int
    error: str | None = None
    new_text: str = ""


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
class RequestOutput:
    """`StepOutput`s of one sequence merged: what it gained since its consumer last looked (a
    stream), or everything it produced (`Engine.generate`, `RequestGroup.result`)."""

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


__all__ = ["Completion", "RequestOutput", "StepOutput", "TokenLogprob"]
