"""What both generation endpoints share (vLLM's `OpenAIServing`): the model check, submitting
validated requests to the async engine, waiting for a full response while watching for the
client leaving, the SSE response, usage and token strings."""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import Request
from fastapi.responses import StreamingResponse

from ..inference.async_engine import AsyncEngine, RequestGroup
from ..inference.errors import EngineStopped, InvalidRequest
from ..inference.outputs import RequestOutput
from ..inference.sampling import SamplingParams
from .errors import APIError, error_body
from .metrics import ServerMetrics


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


class EngineStream(StreamingResponse):
    """An SSE response that aborts its engine requests however it ends (client gone included)."""

    def __init__(self, content, on_close):
        super().__init__(
            content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, metrics: ServerMetrics, *, max_n: int, max_prompts: int):
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.max_n, self.max_prompts = max_n, max_prompts

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(
                404,
                f"The model {name!r} does not exist; this server serves {self.model_name!r}.",
                param="model",
                code="model_not_found",
            )

    def check_fields(self, body, num_prompts: int) -> int:
        """Every check of a request that needs no prompt tokens (the model, unsupported fields,
        n, the sampling values against their ranges and the model), run before any tokenization
        or chat template, so an invalid request costs none. Returns n."""
        self.check_model(body.model)
        body.check_supported()
        n = body.n if body.n is not None else 1
        self.check_n(n, num_prompts)
        # the last choice's parameters: its seed (seed + n - 1) is the largest
        params = self.sampling_params(body, 0, n - 1)
        try:
            self.engine.check_params(params)
        except InvalidRequest as err:
            raise err.renamed(body.param_names) from None
        return n

    def check_n(self, n: int, prompts: int) -> None:
        if not 1 <= n <= self.max_n:
            raise APIError(400, f"n: must be between 1 and {self.max_n} (choices per prompt), got {n}", param="n")
        if n * prompts > self.max_prompts:
            raise APIError(
                400,
                f"n: {n} choices x {prompts} prompts exceed the limit of {self.max_prompts} sequences per request",
                param="n",
            )

    def submit(self, body, prompts: list[list[int]], params: list[SamplingParams], stream: bool) -> RequestGroup:
        """Add the request's sequences to the engine; errors name the API's fields."""
        try:
            return self.engine.add_request(prompts, params, stream=stream)
        except InvalidRequest as err:
            raise err.renamed(body.param_names) from None

    def sampling_params(self, body, num_prompt_tokens: int, choice: int) -> SamplingParams:
        try:
            return body.to_sampling_params(num_prompt_tokens, self.engine.max_seq_len, choice)
        except InvalidRequest as err:
            raise err.renamed(body.param_names) from None

    async def result(self, group: RequestGroup, request: Request) -> list[RequestOutput]:
        """The finished outputs; a client that leaves first has its requests cancelled at once."""
        done = asyncio.ensure_future(group.result())
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not done.done():
                done.cancel()
                self.engine.abort(group)
            self.metrics.observe(group)
        if not done.done() or done.cancelled():
            raise APIError(499, "client disconnected", code="client_disconnected")
        outs = done.result()
        failed = next((o for o in outs if o.finish_reason == "error"), None)
        if failed is not None:
            if self.engine.dead:  # the engine process is gone: unavailable, not this request's fault
                raise EngineStopped(self.engine.dead)
            raise APIError(500, f"generation failed: {failed.error}", "server_error")
        return outs

    def stream(self, group: RequestGroup, events) -> EngineStream:
        def close():
            self.engine.abort(group)
            self.metrics.observe(group)

        return EngineStream(events, on_close=close)

    @staticmethod
    def error_event(out: RequestOutput) -> str:
        return sse(error_body(f"generation failed: {out.error}", "server_error"))

    @staticmethod
    def usage(num_prompt_tokens: int, outs) -> dict:
        completion = sum(o.num_generated_tokens for o in outs)
        return {
            "prompt_tokens": num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": num_prompt_tokens + completion,
        }

    def token_str(self, tid: int) -> str:
        tok = self.engine.tokenizer
        if tok is None:
            return f"token_id:{tid}"
        return tok.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def envelope(self, prefix: str, obj: str) -> dict:
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": obj,
            "created": int(time.time()),
            "model": self.model_name,
        }


__all__ = ["OpenAIServing", "EngineStream", "sse", "SSE_DONE"]
