"""Ollama's endpoints, for the tools that speak only that: /api/tags, /api/show, /api/ps,
/api/generate, /api/chat (newline-delimited JSON streaming, Ollama's default) and /api/version."""
from __future__ import annotations

import datetime
import json
import os
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from dair.serve import model_facts
from dair.serve.errors import APIError
from dair.serve.schemas import (
    OllamaBase,
    OllamaChatRequest,
    OllamaGenerateRequest,
    OllamaOptions,
    OllamaShowRequest,
)
from dair.serve.service import Result, Service
from dair.serve.streaming import STREAM_HEADERS, ndjson, primed

M = TypeVar("M", bound=BaseModel)
DONE_REASON = {"stop": "stop", "length": "length"}
# Ollama's expires_at for a model kept loaded for good (keep_alive < 0): now + Go's longest
# duration, ~292 years. A dair cluster holds its model for as long as it runs.
FOREVER = datetime.timedelta(days=292 * 365)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat().replace("+00:00", "Z")


def _ns(seconds: float) -> int:
    return int(seconds * 1e9)


def _sampling(svc: Service, opts: OllamaOptions | None) -> tuple[dict[str, Any], int | None, list[str]]:
    o = opts or OllamaOptions()
    params = svc.params(temperature=o.temperature, top_k=o.top_k, top_p=o.top_p, min_p=o.min_p,
                        repeat_penalty=o.repeat_penalty, repeat_last_n=o.repeat_last_n, seed=o.seed)
    return params, o.num_predict, [s for s in (o.stop or []) if s]


def _final(model: str, r: Result) -> dict[str, Any]:
    return {"model": model, "created_at": _now(), "done": True, "done_reason": DONE_REASON.get(r.finish_reason, "stop"),
            "total_duration": _ns(r.total_s), "load_duration": 0, "prompt_eval_count": r.prompt_tokens,
            "prompt_eval_duration": _ns(r.ttft_s), "eval_count": r.completion_tokens,
            "eval_duration": _ns(max(0.0, r.total_s - r.ttft_s))}


async def _run(svc: Service, body: OllamaBase, ids: list[int], shape: Any) -> Any:
    """One generation, answered whole or as NDJSON lines; `shape(text)` is a line's payload."""
    svc.check_ids(ids)
    params, num_predict, stops = _sampling(svc, body.options)
    max_tokens = svc.limit(ids, num_predict)
    if not body.stream:
        r = await svc.complete(ids, params, max_tokens, stops)
        return {**shape(r.text), **_final(body.model, r)}
    result = Result()
    pieces = await primed(svc.stream(ids, params, max_tokens, stops, result))

    async def lines() -> AsyncIterator[str]:
        try:
            async for piece in pieces:
                yield ndjson({"model": body.model, "created_at": _now(), **shape(piece), "done": False})
        except APIError as e:
            yield ndjson({"error": e.message})
            return
        yield ndjson({**shape(""), **_final(body.model, result)})

    return StreamingResponse(lines(), media_type="application/x-ndjson", headers=STREAM_HEADERS)


async def _body(request: Request, schema: type[M]) -> M:
    """The body validated by `schema` whatever its Content-Type: Ollama's own examples post JSON
    with `curl -d`, which labels it as a form."""
    try:
        return schema.model_validate_json(await request.body())
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None


def router(svc: Service) -> APIRouter:
    api = APIRouter()

    @api.get("/api/version")
    async def version() -> dict[str, str]:
        from dair import __version__

        return {"version": f"dair-{__version__}"}

    def listing() -> dict[str, Any]:
        """What /api/tags and /api/ps say of the one model: name, file size, digest, details."""
        m, mf = svc.model, svc.model_file
        entry: dict[str, Any] = {"name": svc.model_id, "model": svc.model_id, "modified_at": _now(), "size": 0,
                                 "digest": str(m.get("fingerprint", ""))}
        if mf is not None:
            entry.update(modified_at=model_facts.modified_at(mf), size=os.path.getsize(mf.path),
                         details=model_facts.details(mf))
        else:
            entry["details"] = {"parent_model": "", "format": "gguf" if str(m.get("file", "")).endswith(".gguf")
                                else "dllama", "family": "", "families": [], "parameter_size": "",
                                "quantization_level": ""}
        return entry

    @api.get("/api/tags")
    async def tags() -> dict[str, Any]:
        return {"models": [listing()]}

    @api.post("/api/show")
    async def show(request: Request) -> dict[str, Any]:
        body = await _body(request, OllamaShowRequest)
        svc.check_model(body.model_name())
        mf = svc.model_file
        if mf is None:
            raise APIError(404, f"no local copy of the model file '{svc.model_id}' to describe", param="model")
        stops = [svc.token_text(i) for i in svc.model.get("eos_ids", [])]
        params = "\n".join([f"{'stop':<30} {json.dumps(s)}" for s in stops if s] +
                            [f"{'num_ctx':<30} {svc.max_context}"])
        template = str(getattr(svc.tok, "chat_template", "") or "")
        return {"modelfile": f"# Modelfile generated by dair\nFROM {mf.path}\n"
                             + "".join(f"PARAMETER {line}\n" for line in params.splitlines()),
                "parameters": params, "template": template, "details": model_facts.details(mf),
                "model_info": model_facts.model_info(mf, verbose=body.verbose),
                "capabilities": ["completion"], "modified_at": model_facts.modified_at(mf),
                **({"license": str(mf.metadata["general.license"])} if "general.license" in mf.metadata else {})}

    @api.get("/api/ps")
    async def ps() -> dict[str, Any]:
        """The model, while the cluster can serve it: its bytes held by the stages (weights and
        KV caches), all in RAM (size_vram 0: dair runs on CPUs)."""
        st = await svc.status()
        if not st.get("ready"):
            return {"models": []}
        held = sum(int(n.get("resident_bytes") or 0) + int(n.get("kv_bytes") or 0)
                   for n in st.get("nodes", []) if n.get("state") not in ("standby", "dead"))
        expires = datetime.datetime.now(datetime.timezone.utc) + FOREVER
        entry = {k: v for k, v in listing().items() if k != "modified_at"}
        return {"models": [{**entry, "size": held, "expires_at": expires.isoformat().replace("+00:00", "Z"),
                            "size_vram": 0, "context_length": svc.max_context}]}

    @api.post("/api/generate")
    async def generate(request: Request) -> Any:
        body = await _body(request, OllamaGenerateRequest)
        body.refuse_unsupported()
        svc.check_model(body.model)
        if body.raw:
            ids = svc.text_ids((body.system or "") + body.prompt)
        else:
            msgs = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": body.prompt}]
            ids = svc.chat_ids(msgs)
        return await _run(svc, body, ids, lambda text: {"response": text})

    @api.post("/api/chat")
    async def chat(request: Request) -> Any:
        body = await _body(request, OllamaChatRequest)
        body.refuse_unsupported()
        svc.check_model(body.model)
        ids = svc.chat_ids([{"role": m.role, "content": m.content} for m in body.messages])
        return await _run(svc, body, ids, lambda text: {"message": {"role": "assistant", "content": text}})

    return api
