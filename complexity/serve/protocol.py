"""Request bodies of the OpenAI-compatible API (pydantic v2), each owning `to_sampling_params()`.

Types are strict (a string is not an integer, a float is not an integer, a number is not a
bool). Value ranges live in one place, `SamplingParams.validate` (its errors name the field and
become 400s); what depends on the served model (context length, vocabulary) is checked by the
engine when the request is added.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from ..inference.errors import InvalidRequest
from ..inference.sampling import SamplingParams

Number = StrictFloat | StrictInt

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool | None = False


class _SamplingRequest(_Body):
    model: StrictStr | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None  # extension; 0 or -1 = off
    min_p: Number | None = None  # extension
    repetition_penalty: Number | None = None  # extension
    n: StrictInt | None = 1
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=16)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool | None = False  # extension
    user: StrictStr | None = None

    @property
    def param_names(self) -> dict[str, str]:
        """The API's names of the engine's fields, for error messages."""
        return {"max_new_tokens": "max_tokens"}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _max_new_tokens(self, num_prompt_tokens: int, context: int) -> int | None:
        raise NotImplementedError

    def to_sampling_params(self, num_prompt_tokens: int, context: int, choice: int = 0, **extra) -> SamplingParams:
        """The engine's parameters for choice `choice` (seeded requests draw choice j with seed + j)."""
        return SamplingParams(
            max_new_tokens=self._max_new_tokens(num_prompt_tokens, context),
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=0 if self.top_k is None or self.top_k == -1 else self.top_k,
            min_p=0.0 if self.min_p is None else float(self.min_p),
            repetition_penalty=1.0 if self.repetition_penalty is None else float(self.repetition_penalty),
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            seed=None if self.seed is None else self.seed + choice,
            ignore_eos=bool(self.ignore_eos),
            **extra,
        )


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    max_tokens: StrictInt | None = None
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list (a string, a token-id list, or a list of either)."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def _max_new_tokens(self, num_prompt_tokens: int, context: int) -> int:
        if self.max_tokens is not None:
            return self.max_tokens
        return max(0, min(DEFAULT_COMPLETION_MAX_TOKENS, context - num_prompt_tokens))

    def to_sampling_params(self, num_prompt_tokens: int, context: int, choice: int = 0, **extra) -> SamplingParams:
        max_new = self._max_new_tokens(num_prompt_tokens, context)
        prompt_logprobs = self.logprobs if self.echo and self.logprobs is not None else None
        if max_new == 0 and prompt_logprobs is None:
            prompt_logprobs = 0  # score-only request: nothing to generate
        return super().to_sampling_params(num_prompt_tokens, context, choice, logprobs=self.logprobs,
                                          prompt_logprobs=prompt_logprobs, **extra)


class TextPart(_Body):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = None

    @property
    def param_names(self) -> dict[str, str]:
        limit = "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
        return {"max_new_tokens": limit, "prompt": "messages", "logprobs": "top_logprobs"}

    def chat_messages(self) -> list[dict]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def _max_new_tokens(self, num_prompt_tokens: int, context: int) -> int | None:
        # default: the rest of the context (at least one token: the engine stops at the context)
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return limit if limit is not None else max(1, context - num_prompt_tokens)

    def to_sampling_params(self, num_prompt_tokens: int, context: int, choice: int = 0, **extra) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "requires logprobs=true")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return super().to_sampling_params(num_prompt_tokens, context, choice, logprobs=logprobs, **extra)


__all__ = ["ChatCompletionRequest", "ChatMessage", "CompletionRequest", "StreamOptions", "TextPart"]
