"""POST /v1/completions: the router and the serving class (full response and SSE stream)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..inference.errors import InvalidRequest
from ..inference.outputs import RequestOutput
from .protocol import CompletionRequest
from .serving import SSE_DONE, OpenAIServing, sse


class LegacyLogprobs:
    """The completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset),
    built incrementally so a stream can send each chunk's slice."""

    def __init__(self, token_str):
        self.token_str = token_str
        self.obj = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        self.offset = 0

    def add(self, entries) -> None:
        o = self.obj
        for e in entries:
            s = self.token_str(e.token_id)
            o["tokens"].append(s)
            o["token_logprobs"].append(e.logprob)
            if e.top is None:
                o["top_logprobs"].append(None)
            else:
                top: dict[str, float] = {}
                for tid, lp in e.top:
                    top.setdefault(self.token_str(tid), lp)
                o["top_logprobs"].append(top)
            o["text_offset"].append(self.offset)
            self.offset += len(s)

    def since(self, start: int) -> dict:
        return {key: v[start:] for key, v in self.obj.items()}


class ServingCompletion(OpenAIServing):
    async def create(self, body: CompletionRequest, request: Request):
        raw = body.prompts()
        n = self.check_fields(body, len(raw))
        if not raw:
            raise InvalidRequest("prompt", "must not be empty")
        id_lists = [await self.engine.encode(p) if isinstance(p, str) else list(p) for p in raw]
        prompts, params = [], []
        for ids in id_lists:
            for j in range(n):
                prompts.append(ids)
                params.append(self.sampling_params(body, len(ids), j))
        group = self.submit(body, prompts, params, stream=bool(body.stream))
        echo_texts = None
        if body.echo:
            echo_texts = [
                p if isinstance(p, str) else await self.engine.decode(ids) if self.engine.tokenizer else ""
                for p, ids in zip(raw, id_lists)
            ]
        num_prompt_tokens = sum(len(ids) for ids in id_lists)
        head = self.envelope("cmpl", "text_completion")
        if body.stream:
            return self.stream(group, self._events(body, group, head, n, echo_texts, num_prompt_tokens))
        outs = await self.result(group, request)
        choices = []
        for k, out in enumerate(outs):
            lp = None
            if body.logprobs is not None:
                b = LegacyLogprobs(self.token_str)
                if body.echo and out.prompt_logprobs is not None:
                    b.add(out.prompt_logprobs)
                b.add(out.logprobs or [])
                lp = b.obj
            text = echo_texts[k // n] + out.text if echo_texts else out.text
            choices.append({"index": k, "text": text, "logprobs": lp, "finish_reason": out.finish_reason})
        return {**head, "choices": choices, "usage": self.usage(num_prompt_tokens, outs)}

    async def _events(self, body: CompletionRequest, group, head, n: int, echo_texts, num_prompt_tokens: int):
        builders = [LegacyLogprobs(self.token_str) for _ in group.request_ids]
        echoed: set[int] = set()
        last: dict[int, RequestOutput] = {}
        async for outs in group:
            for out in outs:
                last[out.index] = out
                if out.finish_reason == "error":
                    yield self.error_event(out)
                    continue
                choice = self._choice(body, out, builders[out.index], echoed, echo_texts, n)
                if choice is not None:
                    yield sse({**head, "choices": [choice]})
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": self.usage(num_prompt_tokens, last.values())})
        yield SSE_DONE

    @staticmethod
    def _choice(body, out: RequestOutput, builder: LegacyLogprobs, echoed: set, echo_texts, n: int):
        k = out.index
        text = out.text
        start = len(builder.obj["tokens"])
        if echo_texts and k not in echoed:
            echoed.add(k)
            text = echo_texts[k // n] + text
            if body.logprobs is not None and out.prompt_logprobs is not None:
                builder.add(out.prompt_logprobs)
        if body.logprobs is not None and out.logprobs:
            builder.add(out.logprobs)
        lp = builder.since(start) if body.logprobs is not None else None
        if not (text or out.finished or (lp and lp["tokens"])):
            return None
        return {"index": k, "text": text, "logprobs": lp, "finish_reason": out.finish_reason if out.finished else None}


def router(serving: ServingCompletion) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await serving.create(body, request)

    return r


__all__ = ["ServingCompletion", "router"]
