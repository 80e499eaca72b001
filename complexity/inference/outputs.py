"""What the engine hands out: per-step token outputs, and finished completions.

`StepOutput` is a NamedTuple on purpose: the engine process sends one list of them per step to
the API process, and tuples pickle several times faster than dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
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


__all__ = ["Completion", "StepOutput", "TokenLogprob"]
