"""OpenAI's endpoints: /v1/models, /v1/chat/completions, /v1/completions."""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from dair.serve.errors import APIError
from dair.serve.schemas import ChatCompletionRequest, CompletionRequest
from dair.serve.service import Result, Service, finite
from dair.serve.streaming import SSE_DONE, STREAM_HEADERS, primed, sse


def _usage(r: Result) -> dict[str, int]:
    return {"prompt_tokens": r.prompt_tokens, "completion_tokens": r.completion_tokens,
            "total_tokens": r.prompt_tokens + r.completion_tokens}


def router(svc: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": svc.model_id, "object": "model", "created": int(svc.metrics.started),
                                            "owned_by": "dair"}]}

    @api.get("/v1/models/{name}")
    async def model(name: str) -> dict[str, Any]:
        svc.check_model(name)
        return {"id": svc.model_id, "object": "model", "created": int(svc.metrics.started), "owned_by": "dair"}

    @api.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> Any:
        body.refuse_unsupported()
        svc.check_model(body.model)
        msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
        ids = svc.chat_ids(msgs)
        svc.check_ids(ids)
        stops = body.stop_list()
        params = svc.params(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        max_tokens = svc.limit(ids, body.token_limit())
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "created": created, "model": svc.model_id, "system_fingerprint": _fingerprint(svc)}
        if not body.stream:
            r = await svc.complete(ids, params, max_tokens, stops)
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": r.text},
                                      "logprobs": None, "finish_reason": r.finish_reason}
            if body.logprobs:
                choice["logprobs"] = {"content": await _chat_logprobs(svc, ids, svc.content_ids(r), body.top_logprobs or 0),
                                      "refusal": None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(r)}

        result = Result()
        pieces = await primed(svc.stream(ids, params, max_tokens, stops, result))
        usage_chunks = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: dict[str, Any], finish: str | None) -> str:
            c: dict[str, Any] = {**head, "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if usage_chunks:
                c["usage"] = None
            return sse(c)

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            try:
                async for piece in pieces:
                    yield chunk({"content": piece}, None)
            except APIError as e:
                yield sse(e.openai_body())
                yield SSE_DONE
                return
            yield chunk({}, result.finish_reason)
            if usage_chunks:
                yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(result)})
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        body.refuse_unsupported()
        svc.check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            ids = list(prompt)  # token ids, as OpenAI accepts them
        else:
            ids = svc.text_ids(prompt[0] if isinstance(prompt, list) and prompt else (prompt or ""))
        svc.check_ids(ids)
        stops = body.stop_list()
        params = svc.params(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
        # OpenAI's default for this endpoint is 16 tokens.
        max_tokens = svc.limit(ids, 16 if body.max_tokens is None else body.max_tokens)
        cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": svc.model_id,
                "system_fingerprint": _fingerprint(svc)}
        if not body.stream:
            r = await svc.complete(ids, params, max_tokens, stops)
            lp = await _completion_logprobs(svc, ids, svc.content_ids(r), body.logprobs) if body.logprobs is not None else None
            return {**head, "choices": [{"text": r.text, "index": 0, "logprobs": lp, "finish_reason": r.finish_reason}],
                    "usage": _usage(r)}

        result = Result()
        pieces = await primed(svc.stream(ids, params, max_tokens, stops, result))
        usage_chunks = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text: str, finish: str | None) -> str:
            c: dict[str, Any] = {**head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                      "finish_reason": finish}]}
            if usage_chunks:
                c["usage"] = None
            return sse(c)

        async def events() -> AsyncIterator[str]:
            try:
                async for piece in pieces:
                    yield chunk(piece, None)
            except APIError as e:
                yield sse(e.openai_body())
                yield SSE_DONE
                return
            yield chunk("", result.finish_reason)
            if usage_chunks:
                yield sse({**head, "choices": [], "usage": _usage(result)})
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)

    return api


def _fingerprint(svc: Service) -> str:
    return "dair-" + str(svc.model.get("fingerprint", ""))[:12]


async def _chat_logprobs(svc: Service, prompt: list[int], gen: list[int], top_n: int) -> list[dict[str, Any]]:
    out = []
    for e in await svc.logprobs(prompt, gen, top_n):
        out.append({"token": svc.token_text(e["id"]), "logprob": finite(e["logprob"]),
                    "bytes": svc.token_bytes(e["id"]),
                    "top_logprobs": [{"token": svc.token_text(i), "logprob": finite(v), "bytes": svc.token_bytes(i)}
                                     for i, v in e["top"]]})
    return out


async def _completion_logprobs(svc: Service, prompt: list[int], gen: list[int], top_n: int) -> dict[str, Any]:
    entries = await svc.logprobs(prompt, gen, top_n)
    tokens = [svc.token_text(e["id"]) for e in entries]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [finite(e["logprob"]) for e in entries],
            "top_logprobs": [{svc.token_text(i): finite(v) for i, v in e["top"]} for e in entries] if top_n else None,
            "text_offset": offsets}

