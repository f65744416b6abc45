"""Framing of streamed answers: server-sent events (OpenAI) and newline-delimited JSON (Ollama)."""
from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

SSE_DONE = "data: [DONE]\n\n"
# Proxies (nginx) buffer a response unless told not to; a stream must reach the reader per token.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def ndjson(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"


async def primed(pieces: AsyncIterator[str]) -> AsyncIterator[str]:
    """Wait for the first piece before the response starts, so that a refusal (busy, not ready,
    context full) is an HTTP status, not an error in the middle of a 200 stream."""
    try:
        first: str | None = await pieces.__anext__()
    except StopAsyncIteration:
        first = None

    async def rest() -> AsyncIterator[str]:
        try:
            if first is not None:
                yield first
            async for piece in pieces:
                yield piece
        finally:
            await pieces.aclose()  # type: ignore[attr-defined]

    return rest()
