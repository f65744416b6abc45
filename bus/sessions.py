"""Sessions as the bus keeps them: token history, sampling settings, the request in progress.

The history is the source of truth for a session's context: the stages' KV caches hold its
first `kv_len` positions, and anything beyond can be replayed from it (a failover, a bus
restart). It is the only copy of a session's tokens: the stages keep none.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dair.tokenizer import CompletionText


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class Request:
    req: int
    client: bytes
    kind: str  # "generate" | "score"
    max_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()
    stream: bool = True
    n_prompt: int = 0
    n_new_prompt: int = 0
    top_k: int = 0
    logprobs: int | None = None  # generate: alternatives per token with its log-probability (None: no logprobs)
    progress: bool = False  # generate: send `progress` as a long prompt's prefill steps complete
    generated: list[int] = field(default_factory=list)
    positions: list[dict[str, Any]] = field(default_factory=list)  # score results so far
    text: CompletionText | None = None  # generate: the one decoder of its tokens
    t0: float = field(default_factory=time.perf_counter)
    t_first: float | None = None


@dataclass
class Session:
    sid: str
    client: bytes
    ephemeral: bool
    params: dict[str, Any]
    history: list[int] = field(default_factory=list)
    kv_len: int = 0
    # Steps in flight -> the stage each was last sent to (None: made, not sent yet). Results for
    # any other step are stale; a result or activation for one of these from any other peer is
    # refused (a peer is trusted only for the work the bus gave it).
    qs: dict[int, bytes | None] = field(default_factory=dict)
    # Those of qs that ask nothing of the last stage (prefill chunks before the last): their
    # result says only that they passed it.
    silent: set[int] = field(default_factory=set)
    req: Request | None = None
    # The request lost a stage and waits for a standby to take its range, then replays history.
    paused: bool = False
    paused_t: float = 0.0  # monotonic time the bus first saw it paused (0: not yet)
    tokens: int = 0
    last_tok_s: float = 0.0
    created: float = field(default_factory=time.monotonic)
    last_active: float = field(default_factory=time.monotonic)

    def end(self) -> Request | None:
        """Detach the request in progress (its steps still in flight become stale)."""
        req, self.req = self.req, None
        self.qs.clear()
        self.silent.clear()
        self.paused = False
        self.paused_t = 0.0
        return req

    @property
    def state(self) -> str:
        if self.req is None:
            return "idle"
        if self.paused:
            return "paused"
        return "prefill" if self.req.t_first is None else "decode"

    def to_stats(self) -> dict[str, Any]:
        r = self.req
        tok_s = self.last_tok_s
        if r is not None and r.t_first is not None and len(r.generated) > 1:
            tok_s = (len(r.generated) - 1) / max(1e-9, time.perf_counter() - r.t_first)
        return {"sid": self.sid, "state": self.state, "tokens": self.tokens, "tok_s": round(tok_s, 2),
                "context": len(self.history)}
