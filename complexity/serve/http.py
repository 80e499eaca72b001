"""The HTTP transport's limits (uvicorn): what a public server needs before any request reaches
the app.

- Header timeout: a connection must deliver a request's headers within `request_timeout`
  seconds of its first byte (or of connecting); a slowloris or a silent connection is closed.
  uvicorn's own keep-alive timeout closes idle connections between requests.
- Body timeout and body size: enforced per request by the ASGI gate (middleware.py): 408 when the
  body is not complete in time, 413 as soon as it exceeds the limit (from Content-Length, before
  reading it, or while reading a chunked body).
- Open connections: at most `max_connections`; uvicorn answers 503 past it.
"""

from __future__ import annotations

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol


class TimedH11Protocol(H11Protocol):
    """h11 with a deadline for each request's headers."""

    header_timeout = 30.0
    _header_timer = None

    def _waiting_for_headers(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._waiting_for_headers():
            self._arm()
        super().data_received(data)
        if not self._waiting_for_headers():
            self._disarm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self._waiting_for_headers() and not self.transport.is_closing():
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.transport.close()


def uvicorn_config(
    app,
    *,
    host: str,
    port: int,
    log_level: str = "info",
    request_timeout: float = 30.0,
    max_connections: int | None = 2048,
    keep_alive_timeout: float = 5.0,
    shutdown_timeout: float | None = None,
) -> uvicorn.Config:
    protocol = type("TimedH11Protocol", (TimedH11Protocol,), {"header_timeout": request_timeout})
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=protocol,
        limit_concurrency=max_connections,
        timeout_keep_alive=keep_alive_timeout,
        timeout_graceful_shutdown=shutdown_timeout,
    )


__all__ = ["TimedH11Protocol", "uvicorn_config"]
