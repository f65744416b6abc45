"""The ASGI application: routes, the API key, error shapes, /health, /metrics and the web page."""
from __future__ import annotations

import hmac
import time
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from dair.bus.stats import nodes_of
from dair.serve import metrics as prom
from dair.serve import ollama_api, openai_api
from dair.serve.errors import APIError
from dair.serve.service import Service


def _is_ollama(request: Request) -> bool:
    return request.url.path.startswith("/api/")


def _error_response(request: Request, e: APIError) -> JSONResponse:
    body: dict[str, Any] = {"error": e.message} if _is_ollama(request) else e.openai_body()
    return JSONResponse(body, status_code=e.status, headers=e.headers())


def _validation_error(exc: RequestValidationError) -> APIError:
    """The first schema error, as OpenAI words it, naming the parameter."""
    err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    # A union's failing branch adds its type name to the location; the parameter is what precedes it.
    loc = [x for x in loc if not x[:1].isupper() and "[" not in x and x not in ("str", "int", "float", "bool")]
    param = ".".join(loc) or None
    if err.get("type") == "extra_forbidden":
        return APIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                        code="unrecognized_argument")
    if err.get("type") in ("json_invalid", "model_attributes_type") or not loc and err.get("type") != "missing":
        return APIError(400, "The request body is not a valid JSON object", code="invalid_json")
    return APIError(400, f"Invalid value for '{param}': {err.get('msg')}", param=param, code="invalid_value")


class _CountRequests:
    """Pure ASGI (a BaseHTTPMiddleware would break streaming and disconnects): counts each
    response by route and status for /metrics."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.service.metrics.count(scope.get("path", ""), int(message["status"]))
            await send(message)

        await self.app(scope, receive, counting_send)


def create_app(service: Service, api_key: str | None = None) -> Any:
    """The whole API over `service`; with `api_key` every API route wants `Authorization: Bearer KEY`."""
    app = FastAPI(title="dair", docs_url=None, redoc_url=None, openapi_url=None)
    expected = api_key.encode() if api_key else None

    async def require_key(request: Request) -> None:
        if expected is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key", type_="invalid_request_error")

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError) -> JSONResponse:
        return _error_response(request, e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(request, _validation_error(exc))

    @app.exception_handler(404)
    async def on_not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(request, APIError(404, f"no route {request.method} {request.url.path}",
                                                 code="not_found"))

    @app.exception_handler(405)
    async def on_bad_method(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(request, APIError(405, f"{request.method} is not allowed on {request.url.path}",
                                                 code="method_not_allowed"))

    auth = [Depends(require_key)]
    app.include_router(openai_api.router(service), dependencies=auth)
    app.include_router(ollama_api.router(service), dependencies=auth)

    @app.get("/health")
    async def health() -> JSONResponse:
        try:
            st = await service.status()
        except APIError as e:
            return JSONResponse({"ready": False, "problems": [e.message]}, status_code=503,
                                headers=e.headers())
        body = {"ready": bool(st["ready"]), "problems": list(st.get("problems", [])), "model": service.model_id}
        return JSONResponse(body, status_code=200 if st["ready"] else 503,
                            headers={} if st["ready"] else {"Retry-After": "2"})

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> PlainTextResponse:
        stats = service.bus.latest_stats
        if stats is None:
            try:
                stats = await service.status()
            except APIError:
                stats = None
        return PlainTextResponse(prom.render(service.metrics, stats),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/dair/cluster", dependencies=auth)
    async def cluster() -> dict[str, Any]:
        """The stages and their state, for the web page."""
        st = service.bus.latest_stats or await service.status()
        keep = ("node", "name", "host", "first", "last", "state", "rss", "cpu", "hop_ms_p50", "sessions", "mode")
        return {"ready": st.get("ready"), "problems": st.get("problems", []), "model": service.model_id,
                "n_layers": st.get("n_layers"), "t": st.get("t", time.time()),
                "nodes": [{k: getattr(n, k) for k in keep} for n in nodes_of(st)],
                "sessions": len(st.get("sessions", []))}

    page = resources.files("dair.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response(status_code=204)

    return _CountRequests(app, service)
