"""POST /v1/chat/completions: the router and the serving class (full response and SSE stream)."""

from __future__ import annotations

from fastapi import APIRouter, Request

from ..inference.outputs import RequestOutput
from .errors import APIError
from .protocol import ChatCompletionRequest
from .serving import SSE_DONE, OpenAIServing, sse


class ServingChat(OpenAIServing):
    async def create(self, body: ChatCompletionRequest, request: Request):
        n = self.check_fields(body, 1)
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise APIError(400, "messages: this model has no chat template; use /v1/completions", param="messages")
        ids = await self.engine.apply_chat_template(body.chat_messages())
        params = [self.sampling_params(body, len(ids), j) for j in range(n)]
        group = self.submit(body, [ids] * n, params, stream=bool(body.stream))
        head = self.envelope("chatcmpl", "chat.completion.chunk" if body.stream else "chat.completion")
        if body.stream:
            return self.stream(group, self._events(body, group, head, n, len(ids)))
        outs = await self.result(group, request)
        choices = [
            {
                "index": out.index,
                "message": {"role": "assistant", "content": out.text},
                "logprobs": {"content": self._logprobs(out.logprobs or [])} if body.logprobs else None,
                "finish_reason": out.finish_reason,
            }
            for out in outs
        ]
        return {**head, "choices": choices, "usage": self.usage(len(ids), outs)}

    def _logprobs(self, entries) -> list[dict]:
        def item(tid, lp):
            s = self.token_str(tid)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8", "replace"))}

        return [
            {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in (e.top or [])]} for e in entries
        ]

    async def _events(self, body: ChatCompletionRequest, group, head, n: int, num_prompt_tokens: int):
        for k in range(n):  # OpenAI opens each choice with the assistant role
            yield sse(
                {
                    **head,
                    "choices": [
                        {
                            "index": k,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ],
                }
            )
        last: dict[int, RequestOutput] = {}
        async for outs in group:
            for out in outs:
                last[out.index] = out
                if out.finish_reason == "error":
                    yield self.error_event(out)
                    continue
                if not (out.text or out.finished or out.logprobs):
                    continue
                lp = {"content": self._logprobs(out.logprobs)} if (body.logprobs and out.logprobs) else None
                yield sse(
                    {
                        **head,
                        "choices": [
                            {
                                "index": out.index,
                                "delta": {"content": out.text} if out.text else {},
                                "logprobs": lp,
                                "finish_reason": out.finish_reason if out.finished else None,
                            }
                        ],
                    }
                )
        if body.include_usage:
            yield sse({**head, "choices": [], "usage": self.usage(num_prompt_tokens, last.values())})
        yield SSE_DONE


def router(serving: ServingChat) -> APIRouter:
    r = APIRouter()

    @r.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await serving.create(body, request)

    return r


__all__ = ["ServingChat", "router"]
