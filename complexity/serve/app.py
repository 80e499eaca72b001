"""The OpenAI-compatible HTTP server (FastAPI) over an `AsyncEngine`.

    app = create_app(Engine.from_pretrained(path), model_name="tiny")
    uvicorn.run(app, host="127.0.0.1", port=8000)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /health,
GET /metrics (Prometheus text). Errors always use the OpenAI body
{"error": {"message", "type", "param", "code"}}: 400 bad input (validation included), 401 bad
API key, 404 unknown model or route, 429 over the concurrency / queued-token limits, 503 while
shutting down.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..inference.async_engine import AsyncEngine, EngineOverloaded, EngineStopped, Histogram
from ..inference.engine import Engine, StepOutput
from ..inference.sampling import SamplingParams
from .schemas import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
                   headers=None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


def _param_error(err: ValueError, default: str | None = None) -> APIError:
    """SamplingParams / Engine raise 'field: message'; keep the field as `param`."""
    text = str(err)
    field, sep, _ = text.partition(":")
    param = field if sep and field.isidentifier() else default
    return APIError(400, text, param=param)


class _Metrics:
    def __init__(self):
        self.requests: dict[tuple[str, int], int] = {}
        self.started = time.time()


_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")


class _ASGIGate:
    """Pure ASGI middleware (keeps streaming/disconnects intact): API-key check on /v1/* and
    per-endpoint status counters."""

    def __init__(self, app, api_key: str | None, metrics: _Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = next((r for r in _ROUTES if path == r or path.startswith(r + "/")), "other")
        status_box = [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status_box[0] = message["status"]
            await send(message)

        try:
            if self.api_key is not None and path.startswith("/v1"):
                auth = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
                scheme, _, token = auth.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
                    resp = error_response(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                                          "invalid_request_error", None, "invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                    return await resp(scope, receive, send_wrapper)
            await self.app(scope, receive, send_wrapper)
        finally:
            key = (endpoint, status_box[0])
            self.metrics.requests[key] = self.metrics.requests.get(key, 0) + 1


class _EngineStream(StreamingResponse):
    """SSE response that aborts its engine requests however it ends (client gone included)."""

    def __init__(self, content, on_close, **kwargs):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}, **kwargs)
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse_events(streams, envelope, make_choice, usage_of=None):
    """The Server-Sent Events of one request's streams: a chunk per engine output that
    `make_choice(out)` turns into a choice (None: nothing to send), an error event for a failed
    generation, the usage chunk when `usage_of(last outputs)` is given, then `[DONE]`."""
    queue = streams[0].queue
    remaining = len(streams)
    last: dict = {}
    while remaining:
        out = await queue.get()
        last[out.request_id] = out
        if out.finish_reason == "error":
            yield _sse(error_body(f"generation failed: {out.error}", "server_error"))
        else:
            choice = make_choice(out)
            if choice is not None:
                yield _sse({**envelope(), "choices": [choice]})
        if out.finished:
            remaining -= 1
    if usage_of is not None:
        yield _sse({**envelope(), "choices": [], "usage": usage_of(last)})
    yield "data: [DONE]\n\n"


def create_app(engine: Engine | AsyncEngine, *, model_name: str = "complexity", api_key: str | None = None,
               max_concurrent: int | None = 256, max_queued_tokens: int | None = None, max_n: int = 16,
               max_prompts: int = 256) -> FastAPI:
    """The FastAPI app. Pass an Engine (wrapped and started/stopped with the app's lifespan) or an
    AsyncEngine you manage (started by the lifespan too if not running)."""
    aengine = engine if isinstance(engine, AsyncEngine) else AsyncEngine(
        engine, max_concurrent=max_concurrent, max_queued_tokens=max_queued_tokens)
    core: Engine = aengine.engine
    tokenizer = core.tokenizer
    metrics = _Metrics()
    created = int(time.time())

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

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"Invalid JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}",
                                  code="invalid_json")
        param = loc[0] if loc else None
        where = loc[0] if loc else "body"
        msgs = sorted({e.get("msg", "") for e in errors if [str(x) for x in e.get("loc", ()) if x != "body"][:1] == loc[:1]})
        return error_response(400, f"{where}: {'; or '.join(msgs) or 'invalid value'}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        logger.exception("unhandled error")
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    # ------------------------------------------------------------------ helpers

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_name}'.",
                           param="model", code="model_not_found")

    def token_str(tid: int) -> str:
        if tokenizer is None:
            return f"token_id:{tid}"
        return tokenizer.decode([tid], skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def encode_prompt(prompt) -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise APIError(400, "prompt: this model has no tokenizer; send token ids", param="prompt")
            return core.encode(prompt)
        return list(prompt)

    def check_ids(ids: list[int], param: str = "prompt") -> None:
        if not ids:
            raise APIError(400, f"{param}: is empty", param=param)
        bad = next((t for t in ids if not 0 <= t < core.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{param}: token id {bad} is outside the vocabulary [0, {core.vocab_size})", param=param)
        if len(ids) > core.max_seq_len:
            raise APIError(400, f"{param}: {len(ids)} tokens exceed the model's context length {core.max_seq_len}",
                           param=param, code="context_length_exceeded")

    def resolve_max_tokens(n_prompt: int, requested: int | None, default: int | None, param: str) -> int:
        room = core.max_seq_len - n_prompt
        if requested is None:
            return max(0, min(default if default is not None else room, room))
        if requested > room:
            raise APIError(400, f"{param}: {requested} new tokens + {n_prompt} prompt tokens exceed the context "
                           f"length {core.max_seq_len}", param=param, code="context_length_exceeded")
        return requested

    def make_params(body, max_new: int, seed_offset: int, **extra) -> SamplingParams:
        top_k = body.top_k if body.top_k is not None and body.top_k > 0 else 0
        try:
            return SamplingParams(
                max_new_tokens=max_new,
                temperature=float(body.temperature) if body.temperature is not None else 1.0,
                top_p=float(body.top_p) if body.top_p is not None else 1.0,
                top_k=top_k,
                min_p=float(body.min_p) if body.min_p is not None else 0.0,
                repetition_penalty=float(body.repetition_penalty) if body.repetition_penalty is not None else 1.0,
                stop=[body.stop] if isinstance(body.stop, str) else list(body.stop or []),
                seed=None if body.seed is None else body.seed + seed_offset,
                ignore_eos=bool(body.ignore_eos),
                **extra,
            )
        except ValueError as err:
            raise _param_error(err) from None

    def check_n(n: int, prompts: int) -> None:
        if n > max_n:
            raise APIError(400, f"n: {n} exceeds the limit of {max_n} choices per prompt", param="n")
        if n * prompts > max_prompts:
            raise APIError(400, f"n: {n} choices x {prompts} prompts exceed the limit of {max_prompts} sequences "
                           "per request", param="n")

    def submit(items):
        try:
            return aengine.submit_many(items)
        except EngineOverloaded as err:
            raise APIError(429, str(err), "rate_limit_error", None, "rate_limit_exceeded") from None
        except EngineStopped as err:
            raise APIError(503, str(err), "server_error", None, "shutting_down") from None

    def abort_all(streams):
        for s in streams:
            if not s.finished:
                aengine.abort(s.request_id)

    async def collect(streams, request: Request) -> dict[str, list[StepOutput]]:
        """All outputs of `streams` (sharing one queue); aborts them if the client goes away."""
        outs: dict[str, list[StepOutput]] = {s.request_id: [] for s in streams}
        queue = streams[0].queue
        remaining = len(streams)
        try:
            while remaining:
                try:
                    out = await asyncio.wait_for(queue.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        abort_all(streams)
                        raise APIError(499, "client disconnected") from None
                    continue
                outs[out.request_id].append(out)
                if out.finished:
                    remaining -= 1
        finally:
            abort_all(streams)
        for lst in outs.values():
            if lst and lst[-1].finish_reason == "error":
                raise APIError(500, f"generation failed: {lst[-1].error}", "server_error")
        return outs

    def usage(prompt_lens: list[int], outs_by_req: dict[str, list[StepOutput]]) -> dict:
        p = sum(prompt_lens)
        c = sum(lst[-1].num_generated_tokens for lst in outs_by_req.values() if lst)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    class _LegacyLogprobs:
        """Builds the completions `logprobs` object incrementally (tokens, token_logprobs, top_logprobs, text_offset)."""

        def __init__(self):
            self.obj = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            self.offset = 0

        def add(self, entries, base_offset: int | None = None):
            o = self.obj
            for e in entries:
                s = token_str(e.token_id)
                o["tokens"].append(s)
                o["token_logprobs"].append(e.logprob)
                if e.top is None:
                    o["top_logprobs"].append(None)
                else:
                    top: dict[str, float] = {}
                    for tid, lp in e.top:
                        top.setdefault(token_str(tid), lp)
                    o["top_logprobs"].append(top)
                o["text_offset"].append(self.offset)
                self.offset += len(s)

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health():
        if not aengine.running:
            return error_response(503, "engine not running", "server_error")
        return {"status": "ok", **aengine.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": created, "owned_by": "complexity",
             "max_model_len": core.max_seq_len}]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        check_model(name)
        return {"id": model_name, "object": "model", "created": created, "owned_by": "complexity",
                "max_model_len": core.max_seq_len}

    @app.get("/metrics")
    async def metrics_endpoint():
        return PlainTextResponse(render_metrics(aengine, metrics, model_name), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        raw = body.prompt
        if isinstance(raw, str):
            prompts = [raw]
        elif not raw:
            raise APIError(400, "prompt: must not be empty", param="prompt")
        elif isinstance(raw[0], int):
            prompts = [raw]
        else:
            prompts = list(raw)
        n = body.n or 1
        check_n(n, len(prompts))
        id_lists = [encode_prompt(p) for p in prompts]
        for ids in id_lists:
            check_ids(ids)
        echo = bool(body.echo)
        lp_k = body.logprobs
        items, index_of = [], {}
        for pi, ids in enumerate(id_lists):
            max_new = resolve_max_tokens(len(ids), body.max_tokens, DEFAULT_MAX_TOKENS, "max_tokens")
            prompt_lp = lp_k if (echo and lp_k is not None) else None
            if max_new == 0 and prompt_lp is None:
                prompt_lp = 0  # score-only request: nothing to generate
            for j in range(n):
                items.append((ids, make_params(body, max_new, j, logprobs=lp_k, prompt_logprobs=prompt_lp)))
        streams = submit(items)
        for k, s in enumerate(streams):
            index_of[s.request_id] = k
        rid = f"cmpl-{uuid.uuid4().hex}"
        prompt_texts = [p if isinstance(p, str) else (tokenizer.decode(ids, skip_special_tokens=False)
                                                      if tokenizer is not None else "")
                        for p, ids in zip(prompts, id_lists)]

        def prompt_of(k):
            return k // n

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            builders = {s.request_id: _LegacyLogprobs() for s in streams}
            echoed = set()

            def completion_choice(out):
                k = index_of[out.request_id]
                text = out.new_text
                lp = None
                b = builders[out.request_id]
                start = len(b.obj["tokens"])
                if echo and out.request_id not in echoed:
                    echoed.add(out.request_id)
                    text = prompt_texts[prompt_of(k)] + text
                    if lp_k is not None and out.prompt_logprobs is not None:
                        b.add(out.prompt_logprobs)
                if lp_k is not None and out.new_logprobs:
                    b.add(out.new_logprobs)
                if lp_k is not None:
                    lp = {key: v[start:] for key, v in b.obj.items()}
                if not (text or out.finished or lp):
                    return None
                return {"index": k, "text": text, "logprobs": lp,
                        "finish_reason": out.finish_reason if out.finished else None}

            def envelope():
                return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name}

            def usage_of(last):
                return usage([len(i) for i in id_lists], {r: [o] for r, o in last.items()})

            gen = _sse_events(streams, envelope, completion_choice, usage_of if include_usage else None)
            return _EngineStream(gen, on_close=lambda: abort_all(streams))

        outs = await collect(streams, request)
        choices = []
        for k, s in enumerate(streams):
            lst = outs[s.request_id]
            text = "".join(o.new_text for o in lst)
            lp = None
            if lp_k is not None:
                b = _LegacyLogprobs()
                for o in lst:
                    if o.prompt_logprobs is not None and echo:
                        b.add(o.prompt_logprobs)
                    if o.new_logprobs:
                        b.add(o.new_logprobs)
                lp = b.obj
            if echo:
                text = prompt_texts[prompt_of(k)] + text
            choices.append({"index": k, "text": text, "logprobs": lp,
                            "finish_reason": lst[-1].finish_reason if lst else None})
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage([len(i) for i in id_lists], outs)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise APIError(400, "messages: this model has no chat template; use /v1/completions", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # template errors (e.g. unsupported roles) are the caller's
            raise APIError(400, f"messages: the chat template rejected them: {err}", param="messages") from None
        ids = tokenizer(text, add_special_tokens=False).input_ids
        check_ids(ids, "messages")
        n = body.n or 1
        check_n(n, 1)
        requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        max_new = resolve_max_tokens(len(ids), requested, None, param)
        if max_new < 1:
            raise APIError(400, f"messages: {len(ids)} tokens leave no room to generate within the context length "
                           f"{core.max_seq_len}", param="messages", code="context_length_exceeded")
        k_top = body.top_logprobs if body.logprobs else None
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs: requires logprobs=true", param="top_logprobs")
        lp_k = (k_top or 0) if body.logprobs else None
        streams = submit([(ids, make_params(body, max_new, j, logprobs=lp_k)) for j in range(n)])
        index_of = {s.request_id: k for k, s in enumerate(streams)}
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        def chat_lp(entries):
            def item(tid, lp):
                s = token_str(tid)
                return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}
            return [{**item(e.token_id, e.logprob), "top_logprobs": [item(t, l) for t, l in (e.top or [])]}
                    for e in entries]

        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)

            def envelope():
                return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model_name}

            def chat_choice(out):
                if not (out.new_text or out.finished or out.new_logprobs):
                    return None
                delta = {"content": out.new_text} if out.new_text else {}
                lp = {"content": chat_lp(out.new_logprobs)} if (lp_k is not None and out.new_logprobs) else None
                return {"index": index_of[out.request_id], "delta": delta, "logprobs": lp,
                        "finish_reason": out.finish_reason if out.finished else None}

            def usage_of(last):
                return usage([len(ids)], {r: [o] for r, o in last.items()})

            async def gen():
                for k in range(n):  # OpenAI opens each choice with the assistant role
                    yield _sse({**envelope(), "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                           "logprobs": None, "finish_reason": None}]})
                async for event in _sse_events(streams, envelope, chat_choice, usage_of if include_usage else None):
                    yield event

            return _EngineStream(gen(), on_close=lambda: abort_all(streams))

        outs = await collect(streams, request)
        choices = []
        for k, s in enumerate(streams):
            lst = outs[s.request_id]
            entries = [e for o in lst for e in (o.new_logprobs or [])]
            choices.append({"index": k, "message": {"role": "assistant", "content": "".join(o.new_text for o in lst)},
                            "logprobs": {"content": chat_lp(entries)} if lp_k is not None else None,
                            "finish_reason": lst[-1].finish_reason if lst else None})
        return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model_name,
                "choices": choices, "usage": usage([len(ids)], outs)}

    app.add_middleware(_ASGIGate, api_key=api_key, metrics=metrics)
    return app


def _histogram_lines(name: str, help_: str, h: Histogram, labels: str) -> list[str]:
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    cum = 0
    for b, c in zip(h.buckets, h.counts):
        cum += c
        lines.append(f'{name}_bucket{{{labels},le="{b}"}} {cum}')
    lines.append(f'{name}_bucket{{{labels},le="+Inf"}} {h.count}')
    lines.append(f"{name}_sum{{{labels}}} {h.sum}")
    lines.append(f"{name}_count{{{labels}}} {h.count}")
    return lines


def render_metrics(aengine: AsyncEngine, metrics: _Metrics, model_name: str) -> str:
    s = aengine.stats()
    lab = f'model="{model_name}"'
    out = ["# HELP complexity_http_requests_total HTTP requests by endpoint and status code.",
           "# TYPE complexity_http_requests_total counter"]
    for (endpoint, status), count in sorted(metrics.requests.items()):
        out.append(f'complexity_http_requests_total{{{lab},endpoint="{endpoint}",status="{status}"}} {count}')

    def one(name, kind, help_, value):
        out.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name}{{{lab}}} {value}"])

    one("complexity_prompt_tokens_total", "counter", "Prompt tokens prefilled.", s["prompt_tokens"])
    one("complexity_generation_tokens_total", "counter", "Tokens generated.", s["generated_tokens"])
    one("complexity_requests_running", "gauge", "Requests holding a cache slot.", s["running"])
    one("complexity_requests_waiting", "gauge", "Requests waiting for a slot (queue depth).", s["waiting"])
    one("complexity_requests_inflight", "gauge", "Requests accepted and not finished.", s["inflight"])
    one("complexity_queued_prompt_tokens", "gauge", "Prompt tokens of requests not yet prefilled.", s["queued_tokens"])
    one("complexity_free_slots", "gauge", "Free cache slots.", s["free_slots"])
    one("complexity_max_batch", "gauge", "Cache slots (largest decode batch).", s["max_batch"])
    one("complexity_decode_steps_total", "counter", "Batched decode steps run.", s["decode_steps"])
    one("complexity_prefill_steps_total", "counter", "Prefill forwards run.", s["prefill_steps"])
    one("complexity_rejected_requests_total", "counter", "Requests refused with 429 (limits).", aengine.rejected)
    one("complexity_aborted_requests_total", "counter", "Requests cancelled (client gone, shutdown).", s["aborted"])
    out += ["# HELP complexity_request_finished_total Finished requests by finish reason.",
            "# TYPE complexity_request_finished_total counter"]
    for reason, count in sorted(aengine.finish_reasons.items()):
        out.append(f'complexity_request_finished_total{{{lab},reason="{reason}"}} {count}')
    out += _histogram_lines("complexity_time_to_first_token_seconds", "Time from submission to first token.",
                            aengine.ttft, lab)
    out += _histogram_lines("complexity_request_latency_seconds", "Time from submission to the last token.",
                            aengine.latency, lab)
    return "\n".join(out) + "\n"


__all__ = ["create_app", "render_metrics", "APIError"]
