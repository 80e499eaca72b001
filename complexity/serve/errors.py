"""OpenAI-style errors: one body, one handler per error type.

Every error answer is `{"error": {"message", "type", "param", "code"}}`. The engine raises typed
errors (complexity.inference.errors); `install_error_handlers` maps each type to its status:
InvalidRequest -> 400 (param and code from the error), EngineOverloaded -> 429, EngineStopped ->
503, request validation -> 400 naming the field, unknown routes -> 404, anything else -> 500
(a bug: logged with its traceback, never the client's fault).
"""

from __future__ import annotations

import json
import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.errors import EngineOverloaded, EngineStopped, InvalidRequest

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answer decided by the server itself (unknown model, n too large, ...)."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


class JSONASCIIResponse(JSONResponse):
    """JSON with every non-ASCII character escaped: a lone surrogate a client sent (and that an
    error message quotes) cannot break the encoding of the answer."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_body(
    message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
    headers: dict | None = None,
) -> JSONResponse:
    return JSONASCIIResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


# pydantic names the member of a union it tried as a step of an error's location ("float",
# "list[int]", "function-after[_valid_unicode(), str]"): the client knows only its field names.
_UNION_MEMBER_STEPS = {"int", "float", "str", "bool"}


def _field_path(error: dict) -> list[str]:
    """The location of one pydantic error in the request's own terms: no "body", no union members."""
    return [
        str(x)
        for x in error.get("loc", ())
        if x != "body" and not (isinstance(x, str) and ("[" in x or x in _UNION_MEMBER_STEPS))
    ]


def _validation_response(exc: RequestValidationError, content_type: str | None) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg"))
        return error_response(400, f"Invalid JSON body: {detail}", code="invalid_json")
    field = _field_path(first)[:1]
    if not field and first.get("type") in ("missing", "model_attributes_type"):  # the body itself
        media = (content_type or "").split(";")[0].strip().lower()
        if not (media == "application/json" or media.endswith("+json")):  # FastAPI parses only those
            sent = f"as Content-Type {media!r}" if media else "without a Content-Type"
            return error_response(400, f"body: sent {sent}; send the JSON object as 'application/json'")
        return error_response(400, "body: must be a JSON object (the request's fields)")
    # pydantic reports one error per member of a union: keep those about the same field, and when
    # some member took the value's type (a value error, an unknown key), only those: the members
    # of other types ("Input should be a valid list") are not what the client got wrong
    same = [e for e in errors if _field_path(e)[:1] == field]
    if any(not e.get("type", "").endswith("_type") for e in same):
        same = [e for e in same if not e.get("type", "").endswith("_type")]
    param = field[0] if field else None
    for e in same:
        if e.get("type") == "extra_forbidden":  # OpenAI's words for an unknown field
            where = ".".join(_field_path(e))
            return error_response(
                400, f"Unrecognized request argument supplied: {where}", param=param, code="unrecognized_argument"
            )
    where = ".".join(os.path.commonprefix([_field_path(e) for e in same])) or "body"  # lists: step by step
    msgs = sorted({e.get("msg", "").removeprefix("Value error, ") for e in same})
    return error_response(400, f"{where}: {'; or '.join(msgs) or 'invalid value'}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(InvalidRequest)
    async def _invalid(request: Request, exc: InvalidRequest):
        return error_response(400, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(EngineOverloaded)
    async def _overloaded(request: Request, exc: EngineOverloaded):
        return error_response(429, str(exc), "rate_limit_error", code="rate_limit_exceeded")

    @app.exception_handler(EngineStopped)
    async def _stopped(request: Request, exc: EngineStopped):
        return error_response(503, str(exc), "server_error", code="engine_unavailable")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return _validation_response(exc, request.headers.get("content-type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed", 408: "request_timeout", 413: "request_too_large"}.get(
            exc.status_code
        )
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")


__all__ = ["APIError", "JSONASCIIResponse", "error_body", "error_response", "install_error_handlers"]
