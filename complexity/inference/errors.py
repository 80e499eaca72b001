"""The typed errors of the inference engine.

The engine raises these and nothing else for a caller's mistake or an engine state; the server
maps each type to one HTTP answer in one handler (InvalidRequest -> 400, EngineOverloaded -> 429,
EngineStopped -> 503). `InvalidRequest` is a ValueError, so Python callers and the CLI treat it
like any other bad argument.
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of the engine's errors."""


class InvalidRequest(EngineError, ValueError):
    """A request the engine cannot run: a bad sampling value, an empty or too long prompt, a token
    id outside the vocabulary. `param` names the offending field, `code` is an OpenAI-style code
    (e.g. "context_length_exceeded") or None. The message starts with the field name."""

    def __init__(self, param: str | None, message: str, code: str | None = None):
        super().__init__(f"{param}: {message}" if param else message)
        self.param, self.code, self.detail = param, code, message

    def renamed(self, names: dict[str, str]) -> InvalidRequest:
        """The same error with `param` translated into the caller's vocabulary (e.g. the engine's
        `max_new_tokens` is the API's `max_tokens`)."""
        if self.param not in names:
            return self
        return InvalidRequest(names[self.param], self.detail, self.code)


class EngineOverloaded(EngineError):
    """Too many requests in flight or too many prompt tokens queued: retry later."""


class EngineStopped(EngineError):
    """The engine is shutting down, or its process has died: no new requests."""


__all__ = ["EngineError", "EngineOverloaded", "EngineStopped", "InvalidRequest"]
