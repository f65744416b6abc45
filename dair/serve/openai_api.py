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
        top_n = (body.top_logprobs or 0) if body.logprobs else None
        if not body.stream:
            r = await svc.complete(ids, params, max_tokens, stops, top_n)
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": r.text},
                                      "logprobs": None, "finish_reason": r.finish_reason}
            if top_n is not None:
                choice["logprobs"] = {"content": _chat_logprobs(svc, r.logprobs), "refusal": None}
            return {**head, "object": "chat.completion", "choices": [choice], "usage": _usage(r)}

        result = Result()
        pieces = await primed(svc.stream(ids, params, max_tokens, stops, result, top_n))
        usage_chunks = bool(body.stream_options and body.stream_options.include_usage)
        sent = 0  # entries of result.logprobs already on a chunk

        def chunk(delta: dict[str, Any], finish: str | None, with_logprobs: bool = False) -> str:
            nonlocal sent
            lp = None
            if with_logprobs and top_n is not None:
                lp = {"content": _chat_logprobs(svc, result.logprobs[sent:]), "refusal": None}
                sent = len(result.logprobs)
            c: dict[str, Any] = {**head, "object": "chat.completion.chunk",
                                 "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
            if usage_chunks:
                c["usage"] = None
            return sse(c)

        async def events() -> AsyncIterator[str]:
            yield chunk({"role": "assistant", "content": ""}, None)
            try:
                async for piece in pieces:
                    yield chunk({"content": piece}, None, with_logprobs=True)
            except APIError as e:
                yield sse(e.openai_body())
                yield SSE_DONE
                return
            if sent < len(result.logprobs):  # tokens whose text a stop string swallowed
                yield chunk({"content": ""}, None, with_logprobs=True)
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
        top_n = body.logprobs
        if not body.stream:
            r = await svc.complete(ids, params, max_tokens, stops, top_n)
            lp = _completion_logprobs(svc, r.logprobs, top_n, 0) if top_n is not None else None
            return {**head, "choices": [{"text": r.text, "index": 0, "logprobs": lp, "finish_reason": r.finish_reason}],
                    "usage": _usage(r)}

        result = Result()
        pieces = await primed(svc.stream(ids, params, max_tokens, stops, result, top_n))
        usage_chunks = bool(body.stream_options and body.stream_options.include_usage)
        sent, at = 0, 0  # entries of result.logprobs already on a chunk; their text's length

        def chunk(text: str, finish: str | None, with_logprobs: bool = False) -> str:
            nonlocal sent, at
            lp = None
            if with_logprobs and top_n is not None:
                lp = _completion_logprobs(svc, result.logprobs[sent:], top_n, at)
                sent = len(result.logprobs)
                at += sum(len(t) for t in lp["tokens"])
            c: dict[str, Any] = {**head, "choices": [{"text": text, "index": 0, "logprobs": lp,
                                                      "finish_reason": finish}]}
            if usage_chunks:
                c["usage"] = None
            return sse(c)

        async def events() -> AsyncIterator[str]:
            try:
                async for piece in pieces:
                    yield chunk(piece, None, with_logprobs=True)
            except APIError as e:
                yield sse(e.openai_body())
                yield SSE_DONE
                return
            if sent < len(result.logprobs):  # tokens whose text a stop string swallowed
                yield chunk("", None, with_logprobs=True)
            yield chunk("", result.finish_reason)
            if usage_chunks:
                yield sse({**head, "choices": [], "usage": _usage(result)})
            yield SSE_DONE

        return StreamingResponse(events(), media_type="text/event-stream", headers=STREAM_HEADERS)

    return api


def _fingerprint(svc: Service) -> str:
    return "dair-" + str(svc.model.get("fingerprint", ""))[:12]


def _chat_logprobs(svc: Service, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"token": svc.token_text(e["id"]), "logprob": finite(e["logprob"]), "bytes": svc.token_bytes(e["id"]),
             "top_logprobs": [{"token": svc.token_text(i), "logprob": finite(v), "bytes": svc.token_bytes(i)}
                              for i, v in e["top"]]}
            for e in entries]


def _completion_logprobs(svc: Service, entries: list[dict[str, Any]], top_n: int, at: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs shape; `at` is the text offset of the first entry's token."""
    tokens = [svc.token_text(e["id"]) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {"tokens": tokens, "token_logprobs": [finite(e["logprob"]) for e in entries],
            "top_logprobs": [{svc.token_text(i): finite(v) for i, v in e["top"]} for e in entries] if top_n else None,
            "text_offset": offsets}
