"""GET /health, /metrics, /v1/models and /v1/models/{id}."""

from __future__ import annotations

import time

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from .errors import APIError, error_response


def router(engine, model_name: str, metrics) -> APIRouter:
    r = APIRouter()
    created = int(time.time())
    card = {
        "id": model_name,
        "object": "model",
        "created": created,
        "owned_by": "complexity",
        "max_model_len": engine.max_seq_len,
    }

    @r.get("/health")
    async def health():
        stats = engine.stats()
        if not engine.running:
            return error_response(503, "engine not running", "server_error", code="engine_unavailable")
        return {"status": "ok", **{k: v for k, v in stats.items() if not isinstance(v, dict)}}

    @r.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @r.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != model_name:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {model_name!r}.",
                param="model",
                code="model_not_found",
            )
        return card

    @r.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return r


__all__ = ["router"]
