"""The TUI's data side: the bus client's asyncio face (bus/aclient.py) turned into Textual messages.

It runs on the app's event loop, so no ZeroMQ call ever blocks the UI. The client holds the
connection (hello, heartbeats, the stats, reconnecting with backoff when the bus falls silent);
this module keeps the conversation's session and posts what happens as messages (tui/messages.py).
A restarted bus has forgotten our session, so the next turn opens a new one and the bus
re-prefills the conversation from its messages.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from typing import Any

from textual.message import Message
from textual.message_pump import MessagePump

from dair.bus import protocol as P
from dair.bus.aclient import CONNECTED, AsyncBusClient
from dair.bus.connection import BusError, BusTimeout
from dair.security import PeerKeys
from dair.tui.messages import (
    GenerationDone,
    GenerationError,
    LinkState,
    PrefillProgress,
    Stats,
    TokenPiece,
    Welcome,
)

log = logging.getLogger("dair.tui.link")


def _identity() -> bytes:
    # With our pid: a restarted TUI is a new client to the bus, not a ghost.
    return f"tui-{os.getpid()}-{time.monotonic_ns() % 10**9}".encode()


class BusLink:
    """Connection to one bus; every result reaches `target` as a message (tui/messages.py)."""

    def __init__(self, target: MessagePump, addr: str, *, keys: PeerKeys | None = None,
                 cfg: dict[str, Any] | None = None) -> None:
        self.target = target
        self.addr = addr
        self.client = AsyncBusClient(addr, keys=keys, name="dair-tui", identity=_identity, cfg=cfg)
        self.client.on_state = self._on_state
        self.client.on_welcome = self._on_welcome
        self.client.on_stats = self._on_stats
        self.client.on_orphan = self._on_orphan
        self.ever_connected = False
        self.model: dict[str, Any] = {}
        self.sid: str | None = None
        self.active_req: int | None = None
        self._reqs = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()
        self.received_stats = 0

    @property
    def connected(self) -> bool:
        return self.client.connected

    @property
    def stale_after_s(self) -> float:
        """Silence after which the link drops the connection and reconnects."""
        return self.client.core.stale_after_s

    # --- called by the app (on the same event loop) ------------------------------------------
    def generate(self, messages: list[dict[str, str]], params: dict[str, Any], max_tokens: int) -> int:
        """Start a chat turn on this conversation's session; returns the request number."""
        req = next(self._reqs)
        if not self.connected:
            self._post(GenerationError(req, P.E_DISCONNECTED, f"not connected to the bus at {self.addr}"))
            return req
        self.active_req = req
        self._spawn(self._generate(req, list(messages), dict(params), max_tokens))
        return req

    def cancel(self) -> None:
        """Stop the running generation (the bus answers `done` with stop "cancel")."""
        if self.sid is not None and self.active_req is not None:
            self._spawn(self._quietly(self.client.cancel(self.sid)))

    def new_conversation(self) -> None:
        """Forget the session: the bus frees its KV caches; the next turn opens a new one."""
        if self.sid is not None:
            sid = self.sid
            if self.active_req is not None:
                self._spawn(self._quietly(self.client.cancel(sid)))
            self._spawn(self._quietly(self.client.send({"type": P.SESSION_CLOSE, "sid": sid})))
        self.sid = None
        self.active_req = None

    def stop(self) -> None:
        self._stop.set()

    # --- the worker ---------------------------------------------------------------------------
    async def run(self) -> None:
        task = self.client.run()
        try:
            await self._stop.wait()
            # On the way out, give a last session_close a moment to leave.
            await asyncio.sleep(0.2)
        finally:
            for t in list(self._tasks):
                t.cancel()
            task.cancel()
            await self.client.close()

    # --- from the client ------------------------------------------------------------------------
    def _on_state(self, state: str, attempt: int) -> None:
        if state == CONNECTED:
            self.ever_connected = True
        else:
            self.sid = None  # a new connection is a new client to the bus: our session is gone
            log.info("bus %s: %s (attempt %d)", self.addr, state, attempt)
        self._post(LinkState(state, self.addr, attempt))

    def _on_welcome(self, welcome: dict[str, Any], restarted: bool) -> None:
        if restarted:
            self.sid = None  # a new bus process: the session died with the old one
        self.model = dict(welcome["model"])
        self._post(Welcome(self.model, {k: v for k, v in welcome.items() if k not in ("v", "type", "model")}))

    def _on_stats(self, stats: dict[str, Any], now: float) -> None:
        self.received_stats += 1
        self._post(Stats(stats, now))

    def _on_orphan(self, h: dict[str, Any]) -> None:
        if h.get("code") == P.E_UNKNOWN_SESSION and h.get("sid") == self.sid:
            self.sid = None  # the bus lost it (restart, eviction): the next turn opens a new one
        self._post(GenerationError(None, h["code"], h["msg"]))

    # --- a chat turn ------------------------------------------------------------------------------
    async def _generate(self, req: int, messages: list[dict[str, str]], params: dict[str, Any],
                        max_tokens: int) -> None:
        retried = False
        while True:
            try:
                if self.sid is None:
                    self.sid = await self.client.open_session(params, timeout=10.0)
                if self.active_req != req:
                    return  # cancelled or replaced while the session was opening
                async with contextlib.aclosing(self.client.stream(
                        {"sid": self.sid, "messages": messages, "params": params, "max_tokens": max_tokens,
                         "stream": True, "progress": True}, timeout=300.0)) as events:
                    async for h in events:
                        if self.active_req != req:
                            return
                        if h["type"] == P.PROGRESS:
                            self._post(PrefillProgress(req, h["done"], h["total"]))
                        elif h["type"] == P.TOKEN:
                            self._post(TokenPiece(req, h["text"], h["pos"]))
                        elif h["type"] == P.DONE:
                            self.active_req = None
                            self._post(GenerationDone(req, h["stop"], h["text"], len(h["ids"]), h["n_prompt"],
                                                      h["timings"]))
                return
            except BusError as e:
                if e.code == P.E_UNKNOWN_SESSION and not retried and self.active_req == req:
                    # Once, transparently: the bus lost the session (eviction, restart) and
                    # re-prefills the conversation from its messages in a new one.
                    self.sid = None
                    retried = True
                    continue
                if e.code in (P.E_UNKNOWN_SESSION, P.E_BUS_RESTARTED):
                    self.sid = None
                self._fail(req, e.code, str(e).removeprefix("bus: "))
                return
            except BusTimeout as e:
                self._fail(req, "timeout", str(e))
                return

    def _fail(self, req: int, code: str, msg: str) -> None:
        if self.active_req == req:
            self.active_req = None
            if code == P.E_DISCONNECTED:
                msg = "the bus went away during the generation"
            self._post(GenerationError(req, code, msg))

    # --- plumbing -----------------------------------------------------------------------------
    async def _quietly(self, coro: Any) -> None:
        with contextlib.suppress(BusError, BusTimeout):
            await coro

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _post(self, message: Message) -> None:
        self.target.post_message(message)
