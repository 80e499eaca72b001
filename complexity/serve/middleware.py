"""Pure ASGI middleware (streaming and disconnects pass through untouched): the API-key check on
/v1/*, the request-body limits (size: 413, time: 408) and the per-endpoint status counters."""

from __future__ import annotations

import asyncio
import hmac
import time

from starlette.exceptions import HTTPException

from .errors import error_response

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Gate:
    def __init__(self, app, api_key: str | None, metrics, max_body_bytes: int, body_timeout: float):
        self.app, self.api_key, self.metrics = app, api_key, metrics
        self.max_body_bytes, self.body_timeout = max_body_bytes, body_timeout

    def _authorized(self, scope) -> bool:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode("latin-1"), self.api_key.encode()
        )

    def _too_large(self) -> str:
        return f"request body larger than the limit of {self.max_body_bytes} bytes"

    def _limited(self, receive):
        """`receive` with the body limits: raises HTTPException 413 / 408 (answered by the error
        handlers) once the body is too large or late; passes everything after the body through."""
        deadline = time.monotonic() + self.body_timeout
        state = {"bytes": 0, "done": False}

        async def limited_receive():
            if state["done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise HTTPException(408, f"request body not received within {self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                state["bytes"] += len(message.get("body", b""))
                if state["bytes"] > self.max_body_bytes:
                    raise HTTPException(413, self._too_large())
                state["done"] = not message.get("more_body", False)
            else:
                state["done"] = True
            return message

        return limited_receive

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1") and not self._authorized(scope):
                resp = error_response(
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
                return await resp(scope, receive, send_counted)
            length = dict(scope.get("headers") or []).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                resp = error_response(413, self._too_large(), code="request_too_large", headers={"Connection": "close"})
                return await resp(scope, receive, send_counted)
            await self.app(scope, self._limited(receive), send_counted)
        finally:
            self.metrics.count_http(endpoint, status[0])


__all__ = ["Gate", "ROUTES"]
