"""What every endpoint shares: prompts to token ids, one generation over the bus with stop
strings and token counts, each token's logprobs from the last stage, and the figures /metrics shows.

The API's dialects (OpenAI, Ollama) only differ in how they spell requests and answers.
"""
from __future__ import annotations

import contextlib
import math
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from dair.bus import protocol as P
from dair.bus.aclient import AsyncBusClient
from dair.bus.client import BusError, BusTimeout
from dair.serve.errors import APIError, from_bus, unreachable
from dair.serve.stops import StopMatcher
from dair.tokenizer import prompt_ids

FINISH = {"eos": "stop", "length": "length", "cancel": "stop"}


@dataclass
class Result:
    """A finished generation: the text shown, why it ended, and its token counts."""
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ids: list[int] = field(default_factory=list)  # the completion's tokens (completion_tokens of them)
    # With logprobs asked for: per token of `ids`, {"id", "logprob", "top": [(id, logprob), ...]}.
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    ttft_s: float = 0.0
    total_s: float = 0.0


@dataclass
class Metrics:
    """Counters of this server, for /metrics."""
    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    active: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_sum_s: float = 0.0
    ttft_count: int = 0
    decode_s: float = 0.0
    resumed: int = 0  # requests resubmitted after a bus restart
    started: float = field(default_factory=time.time)

    def count(self, route: str, status: int) -> None:
        self.requests[(route, status)] = self.requests.get((route, status), 0) + 1


class Service:
    def __init__(self, bus: AsyncBusClient, tokenizer: Any, model_info: dict[str, Any],
                 model_file: Any = None) -> None:
        self.bus = bus
        self.tok = tokenizer
        self.model = model_info
        self.model_file = model_file  # the local copy of the bus's model (its metadata), when opened
        # The file's name (without .gguf/.m) makes an id without spaces, as Ollama's names need.
        file = str(model_info.get("file") or "")
        self.model_id = os.path.splitext(file)[0] or str(model_info.get("name") or "dair")
        self.max_context = int(model_info.get("max_context") or model_info.get("context_length") or 2048)
        self.metrics = Metrics()

    # --- prompts --------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        """Requests name a model; the cluster serves one (any spelling of it is accepted)."""
        base = name.split(":")[0].lower()
        known = {self.model_id, str(self.model.get("file", "")), str(self.model.get("name", "")), "dair"}
        if base not in {k.lower() for k in known} and name.lower() not in {k.lower() for k in known}:
            raise APIError(404, f"The model '{name}' does not exist; this server has '{self.model_id}'",
                           param="model", code="model_not_found")

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The model's chat template over `messages`, as the bus renders it for `generate`."""
        try:
            return prompt_ids(self.tok, messages=messages)
        except Exception as e:  # a template's own raise_exception (e.g. roles out of order)
            raise APIError(400, f"chat template: {e}", param="messages") from None

    def text_ids(self, prompt: str) -> list[int]:
        return prompt_ids(self.tok, text=prompt)

    def check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.tok.vocab_size]
        if bad:
            raise APIError(400, f"token id(s) {bad[:5]} outside the vocabulary of {self.tok.vocab_size}",
                           param="prompt")
        if not ids:
            raise APIError(400, "empty prompt", param="prompt")

    def limit(self, ids: list[int], requested: int | None) -> int:
        """Tokens to generate: as asked, else up to the context (OpenAI's and Ollama's default)."""
        room = self.max_context - len(ids)
        if room <= 0:
            raise APIError(400, f"prompt of {len(ids)} tokens does not fit the maximum context of "
                           f"{self.max_context} tokens", param="messages", code="context_length_exceeded")
        return room if requested is None or requested < 0 else min(requested, room)

    @staticmethod
    def params(**given: Any) -> dict[str, Any]:
        """Sampling settings for the bus (unset ones take the bus's config defaults). A seed is
        always fixed here, so that a request resumed after a bus restart draws the same tokens."""
        p = {k: v for k, v in given.items() if v is not None}
        p.setdefault("seed", secrets.randbelow(2**31))
        return p

    # --- generation -----------------------------------------------------------------------------
    async def stream(self, ids: list[int], params: dict[str, Any], max_tokens: int, stops: list[str],
                     result: Result, logprobs: int | None = None) -> AsyncIterator[str]:
        """Text pieces as they are generated; `result` is filled in as the stream goes and is
        complete when it ends. Errors before the first piece are raised as APIError.

        With `logprobs` (the alternatives wanted, 0..20) every token's entry is in
        `result.logprobs` before the piece its text is part of is yielded, so a consumer that
        takes the entries new since its last piece puts each on its token's own chunk. A token
        whose text is held back (a possible stop string, a partial character) rides with the
        next piece; the token that completes a stop string is counted and has its entry too."""
        if self.bus.silent():
            raise unreachable(f"no answer from the bus at {self.bus.addr} for "
                              f"{time.monotonic() - self.bus.last_heard:.0f}s (is dair-bus running?)")
        matcher = StopMatcher(stops)
        m = self.metrics
        t0 = time.perf_counter()
        result.prompt_tokens = len(ids)
        m.active += 1
        m.prompt_tokens += len(ids)
        try:
            async with contextlib.aclosing(self.bus.generate(ids, params, max_tokens,
                                                             logprobs=logprobs)) as events:
                async for ev in events:
                    if ev["type"] != P.TOKEN:
                        m.resumed += bool(ev.get("resumed_at"))
                        result.finish_reason = FINISH.get(ev["stop"], "stop")
                        tail = matcher.flush()
                        if tail:
                            result.text += tail
                            yield tail
                        break
                    if not result.ids:
                        result.ttft_s = time.perf_counter() - t0
                        m.ttft_sum_s += result.ttft_s
                        m.ttft_count += 1
                    result.ids.append(int(ev["id"]))
                    if logprobs is not None:
                        result.logprobs.append({"id": int(ev["id"]), "logprob": float(ev["lp"]),
                                                "top": [(int(i), float(v)) for i, v in ev.get("top", [])]})
                    result.completion_tokens += 1
                    m.completion_tokens += 1
                    out = matcher.feed(ev["text"])
                    if out:
                        result.text += out
                        yield out
                    if matcher.stopped:
                        result.finish_reason = "stop"
                        break  # closing the bus's stream closes its session: the stages stop
        except BusError as e:
            raise from_bus(e.code, str(e)) from None
        except BusTimeout as e:
            raise unreachable(str(e)) from None
        finally:
            m.active -= 1
            result.total_s = time.perf_counter() - t0
            m.decode_s += max(0.0, result.total_s - result.ttft_s)

    async def complete(self, ids: list[int], params: dict[str, Any], max_tokens: int,
                       stops: list[str], logprobs: int | None = None) -> Result:
        result = Result()
        async for _ in self.stream(ids, params, max_tokens, stops, result, logprobs):
            pass
        return result

    def token_text(self, tid: int) -> str:
        return self.tok.decode([tid])

    def token_bytes(self, tid: int) -> list[int]:
        return list(self.tok.token_bytes(tid))

    # --- cluster --------------------------------------------------------------------------------
    async def status(self) -> dict[str, Any]:
        try:
            return await self.bus.status(timeout=3.0)
        except BusTimeout as e:
            raise unreachable(str(e)) from None
        except BusError as e:
            raise from_bus(e.code, str(e)) from None


def finite(x: float) -> float:
    """JSON has no infinities: a log-probability of -inf (an impossible token) is sent as a large negative."""
    return x if math.isfinite(x) else -9999.0
