"""Request bodies of the OpenAI-compatible API (pydantic v2), each owning `to_sampling_params()`.

The validation boundary of the server: every field of a request is checked here, once.
- Types are strict (a string is not an integer, a float is not an integer, a number is not a
  bool); strings must be valid Unicode (a lone surrogate is refused); NaN and infinities are refused.
- Unknown fields are refused, as OpenAI does ("Unrecognized request argument supplied").
- Fields of OpenAI's schemas this server does not implement (tools, response_format, best_of,
  ...) are refused with a 400 naming them, unless they hold their neutral value (e.g.
  `response_format: {"type": "text"}`): nothing is accepted and silently ignored.
- Value ranges are those of `SamplingParams.validate` (one place); what depends on the served
  model (vocabulary, context length) is checked by the engine client before a request is queued.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from ..inference.errors import InvalidRequest
from ..inference.sampling import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _valid_unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return text


def _float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:
        raise ValueError("is too large") from None


Text = Annotated[StrictStr, AfterValidator(_valid_unicode)]
Number = Annotated[StrictFloat | StrictInt, AfterValidator(_float)]
TokenIds = list[StrictInt]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool | None = False


class _SamplingRequest(_Body):
    model: Text | None = None
    temperature: Number | None = None
    top_p: Number | None = None
    top_k: StrictInt | None = None  # extension; 0 or -1 = off
    min_p: Number | None = None  # extension
    repetition_penalty: Number | None = None  # extension
    n: StrictInt | None = 1
    stop: Text | list[Text] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    seed: StrictInt | None = None
    ignore_eos: StrictBool | None = False  # extension
    user: Text | None = None  # an end-user id for the operator's logs: nothing to implement
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logit_bias: dict[Text, Number] | None = None  # JSON keys are strings: token ids in decimal

    # OpenAI fields not implemented (in the endpoints' subclasses): field -> the values that change
    # nothing (accepted); anything else is refused
    NEUTRAL: ClassVar[dict[str, tuple]] = {}

    @property
    def param_names(self) -> dict[str, str]:
        """The API's names of the engine's fields, for error messages."""
        return {"max_new_tokens": "max_tokens"}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        """Refuse (400, naming the field) any field this server would otherwise ignore."""
        for name, neutral in self.NEUTRAL.items():
            value = getattr(self, name)
            if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
                allowed = "".join(f" or {v!r}" for v in neutral)
                raise InvalidRequest(
                    name, f"is not supported by this server (only null{allowed} is accepted)", "unsupported_parameter"
                )
        if self.stream_options is not None and not self.stream:
            raise InvalidRequest("stream_options", "is only allowed with stream=true")

    def _max_new_tokens(self, num_prompt_tokens: int, context: int) -> int | None:
        raise NotImplementedError

    def _logit_bias(self) -> dict[int, float]:
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            # one spelling per id ("7", not "07"), and short enough for int() to be cheap
            if not (key.isascii() and key.isdigit() and len(key) <= 10 and (key == "0" or key[0] != "0")):
                raise InvalidRequest(
                    "logit_bias", f"keys must be token ids (decimal integers, no leading zeros), got {key!r:.40}"
                )
            bias[int(key)] = value
        return bias

    def to_sampling_params(self, num_prompt_tokens: int, context: int, choice: int = 0, **extra) -> SamplingParams:
        """The engine's parameters for choice `choice` (seeded requests draw choice j with seed + j)."""
        return SamplingParams(
            max_new_tokens=self._max_new_tokens(num_prompt_tokens, context),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None or self.top_k == -1 else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logit_bias=self._logit_bias(),
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            seed=None if self.seed is None else self.seed + choice,
            ignore_eos=bool(self.ignore_eos),
            **extra,
        )


class CompletionRequest(_SamplingRequest):
    prompt: Text | list[Text] | TokenIds | list[TokenIds]
    max_tokens: StrictInt | None = None
    logprobs: StrictInt | None = None
    echo: StrictBool | None = False
    best_of: Any = None
    suffix: Any = None

    NEUTRAL: ClassVar[dict[str, tuple]] = {**_SamplingRequest.NEUTRAL, "best_of": (1,), "suffix": ("",)}

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
        return super().to_sampling_params(
            num_prompt_tokens, context, choice, logprobs=self.logprobs, prompt_logprobs=prompt_logprobs, **extra
        )


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    # no "tool" role: this server implements no tools
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None  # refused (the chat template has no place for it), see check_supported

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        # OpenAI's schema: only an assistant message (one that made tool calls) may have none; a
        # user message without content is a client's mistake, not an empty turn
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content (a string or a list of text parts)")
        return self

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
    # OpenAI chat fields not implemented (see _SamplingRequest)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    service_tier: Any = None
    store: Any = None
    metadata: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None

    NEUTRAL: ClassVar[dict[str, tuple]] = {
        **_SamplingRequest.NEUTRAL,
        "response_format": ({"type": "text"},),
        "tools": ([],),
        "tool_choice": ("none",),
        "functions": ([],),
        "function_call": ("none",),
        "modalities": (["text"],),
        "store": (False,),
        "service_tier": ("auto", "default"),
        "parallel_tool_calls": (),
        "audio": (),
        "prediction": (),
        "reasoning_effort": (),
        "verbosity": (),
        "web_search_options": (),
        "metadata": (),
        "prompt_cache_key": (),
        "safety_identifier": (),
    }

    def check_supported(self) -> None:
        super().check_supported()
        for i, m in enumerate(self.messages):
            if m.name is not None:
                raise InvalidRequest(
                    "messages",
                    f"messages[{i}].name is not supported by this server (the chat "
                    "template has no place for participant names)",
                    "unsupported_parameter",
                )

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
