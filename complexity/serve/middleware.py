"""Pure ASGI middleware (streaming and disconnects pass through untouched): the API-key check on
/v1/* and the per-endpoint status counters."""

from __future__ import annotations

import hmac

from .errors import error_response

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class Gate:
    def __init__(self, app, api_key: str | None, metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    def _authorized(self, scope) -> bool:
        auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"),
                                                                  self.api_key.encode())

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
                resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                      code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send_counted)
            await self.app(scope, receive, send_counted)
        finally:
            self.metrics.count_http(endpoint, status[0])


__all__ = ["Gate", "ROUTES"]
