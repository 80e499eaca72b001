"""The OpenAI-compatible HTTP server (FastAPI) over an `AsyncEngine`: wiring only.

    app = create_app(Engine.from_pretrained(path), model_name="tiny")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints (one module each): POST /v1/completions (completion.py), POST /v1/chat/completions
(chat_completion.py), GET /v1/models, /health, /metrics (status.py). Request bodies and their
`to_sampling_params()` live in protocol.py, error answers in errors.py, Prometheus metrics in
metrics.py, the API-key gate in middleware.py.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from ..inference.async_engine import AsyncEngine
from ..inference.engine import Engine
from . import chat_completion, completion, status
from .errors import install_error_handlers
from .metrics import ServerMetrics
from .middleware import Gate

DEFAULT_MAX_BODY_BYTES = 8 << 20


def create_app(
    engine: Engine | AsyncEngine,
    *,
    model_name: str = "complexity",
    api_key: str | None = None,
    max_concurrent: int | None = 1024,
    max_queued_tokens: int | None = None,
    max_n: int = 16,
    max_prompts: int = 256,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    body_timeout: float = 30.0,
) -> FastAPI:
    """The FastAPI app. Pass an Engine (its core runs in a thread, started and stopped with the
    app's lifespan) or an AsyncEngine (e.g. `AsyncEngine.spawn`: the core in its own process).
    Limits: `max_concurrent` sequences in flight and `max_queued_tokens` prompt tokens waiting
    (429 past them; for an Engine argument), `max_n` choices, `max_prompts` sequences per request,
    `max_body_bytes` per request body (413), `body_timeout` seconds to receive it (408)."""
    aengine = (
        engine
        if isinstance(engine, AsyncEngine)
        else AsyncEngine(engine, max_concurrent=max_concurrent, max_queued_tokens=max_queued_tokens)
    )
    metrics = ServerMetrics(aengine, model_name)

    @asynccontextmanager
    async def lifespan(app):
        aengine.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, aengine.stop)

    app = FastAPI(title="Complexity OpenAI-compatible server", lifespan=lifespan)
    app.state.engine = aengine
    app.state.model_name = model_name
    install_error_handlers(app)
    limits = dict(max_n=max_n, max_prompts=max_prompts)
    app.include_router(completion.router(completion.ServingCompletion(aengine, model_name, metrics, **limits)))
    app.include_router(chat_completion.router(chat_completion.ServingChat(aengine, model_name, metrics, **limits)))
    app.include_router(status.router(aengine, model_name, metrics))
    app.add_middleware(Gate, api_key=api_key, metrics=metrics, max_body_bytes=max_body_bytes, body_timeout=body_timeout)
    return app


__all__ = ["create_app"]
