"""The TUI's data side: one object that owns the bus sockets and posts Textual messages.

It runs as an async Textual worker on the app's event loop with `zmq.asyncio` sockets, so no
ZeroMQ call ever blocks the UI. A DEALER talks to the bus's ROUTER (hello, sessions, generate,
cancel, heartbeats); a SUB receives the stats. The bus counts as gone when neither socket has
said anything for `stale_after_s`; the link then drops both sockets, reports "reconnecting" and
starts over with a fresh `hello` (a restarted bus has forgotten our session, so the next turn
opens a new one and the bus re-prefills the conversation from its messages).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from typing import Any
from urllib.parse import urlsplit

import msgpack
import zmq
import zmq.asyncio
from textual.message import Message
from textual.message_pump import MessagePump

from dair.bus import protocol as P
from dair.security import PeerKeys, apply_client_keys
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


def stats_address(bus_addr: str, stats_port: int | None) -> str:
    """The PUB address: the bus's host with `stats_port` (default: the bus port + 1)."""
    parts = urlsplit(bus_addr)
    if parts.scheme != "tcp" or parts.port is None:
        raise ValueError(f"bus address {bus_addr!r} is not tcp://HOST:PORT")
    host = parts.hostname or "127.0.0.1"
    if host in ("*", "0.0.0.0"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"tcp://{host}:{stats_port or parts.port + 1}"


class BusLink:
    """Connection to one bus; every result reaches `target` as a message (tui/messages.py)."""

    def __init__(self, target: MessagePump, addr: str, *, heartbeat_ms: int = 500, liveness: int = 6,
                 stats_interval_ms: int = 1000, hello_timeout_s: float = 2.0,
                 keys: PeerKeys | None = None) -> None:
        self.target = target
        self.keys = keys
        self.addr = addr
        self.heartbeat_s = heartbeat_ms / 1000.0
        # Silence longer than a node's death timeout, and never less than three stats intervals.
        self.stale_after_s = max(heartbeat_ms * liveness, 3 * stats_interval_ms) / 1000.0
        self.hello_timeout_s = hello_timeout_s
        self.connected = False
        self.ever_connected = False
        self.model: dict[str, Any] = {}
        self.sid: str | None = None
        self.active_req: int | None = None
        self._reqs = itertools.count(1)
        self._dealer: zmq.asyncio.Socket | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last: tuple[int, list[dict[str, str]], dict[str, Any], int] | None = None
        self._retried = False
        self._stop = asyncio.Event()
        self.received_stats = 0

    # --- called by the app (on the same event loop) ------------------------------------------
    def generate(self, messages: list[dict[str, str]], params: dict[str, Any], max_tokens: int) -> int:
        """Start a chat turn on this conversation's session; returns the request number."""
        req = next(self._reqs)
        if not self.connected or self._dealer is None:
            self._post(GenerationError(req, "disconnected", f"not connected to the bus at {self.addr}"))
            return req
        self.active_req = req
        self._last = (req, list(messages), dict(params), max_tokens)
        self._retried = False
        self._spawn(self._generate(*self._last))
        return req

    def cancel(self) -> None:
        """Stop the running generation (the bus answers `done` with stop "cancel")."""
        if self.sid is not None and self.active_req is not None:
            self._send({"type": P.CANCEL, "sid": self.sid})

    def new_conversation(self) -> None:
        """Forget the session: the bus frees its KV caches; the next turn opens a new one."""
        if self.sid is not None:
            if self.active_req is not None:
                self._send({"type": P.CANCEL, "sid": self.sid})
            self._send({"type": P.SESSION_CLOSE, "sid": self.sid})
        self.sid = None
        self.active_req = None

    def stop(self) -> None:
        self._stop.set()

    # --- the worker ---------------------------------------------------------------------------
    async def run(self) -> None:
        ctx = zmq.asyncio.Context()
        attempt = 0
        try:
            while not self._stop.is_set():
                attempt += 1
                state = "reconnecting" if self.ever_connected else "connecting"
                self._post(LinkState(state, self.addr, attempt))
                try:
                    heard = await self._serve(ctx)
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # a bug here must not kill the link: report and retry
                    log.exception("link failed")
                    self._post(GenerationError(None, "link", f"{type(e).__name__}: {e}"))
                    heard = False
                self._lost()
                if heard:
                    attempt = 1  # a fresh outage: count again from the start
                    self._post(LinkState("reconnecting", self.addr, attempt))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=min(2.0, 0.25 * attempt))
        finally:
            for t in list(self._tasks):
                t.cancel()
            ctx.destroy(linger=0)

    async def _serve(self, ctx: zmq.asyncio.Context) -> bool:
        """One connection: hello, then pump both sockets until the bus goes silent. True if it
        ever answered."""
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        # Identity with our pid: a restarted TUI is a new client to the bus, not a ghost.
        dealer.setsockopt(zmq.IDENTITY, f"tui-{os.getpid()}-{time.monotonic_ns() % 10**9}".encode())
        sub = ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, P.STATS_TOPIC)
        apply_client_keys(dealer, self.keys)
        apply_client_keys(sub, self.keys)
        try:
            dealer.connect(self.addr)
            await dealer.send_multipart(P.encode({"type": P.HELLO, "name": "dair-tui"}))
            if not await dealer.poll(int(self.hello_timeout_s * 1000)):
                log.info("no welcome from %s within %.1fs", self.addr, self.hello_timeout_s)
                return False
            welcome = self._decode(await dealer.recv_multipart())
            if welcome is None or welcome["type"] != P.WELCOME:
                return False
            self.model = dict(welcome["model"])
            self._adopt_timing(welcome)
            sub.connect(stats_address(self.addr, welcome.get("stats_port")))
            self._dealer = dealer
            self.connected = self.ever_connected = True
            self._post(Welcome(self.model, {k: v for k, v in welcome.items() if k not in ("v", "type", "model")}))
            self._post(LinkState("connected", self.addr))
            await self._pump(dealer, sub)
            return True
        finally:
            self._dealer = None
            self.connected = False
            # On the way out, give a last session_close a moment to leave; on a lost bus, drop it.
            dealer.close(linger=200 if self._stop.is_set() else 0)
            sub.close(linger=0)

    async def _pump(self, dealer: zmq.asyncio.Socket, sub: zmq.asyncio.Socket) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(sub, zmq.POLLIN)
        last_heard = next_beat = time.monotonic()
        while not self._stop.is_set():
            events = dict(await poller.poll(timeout=int(self.heartbeat_s * 1000)))
            now = time.monotonic()
            if dealer in events:
                while dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    last_heard = now
                    self._on_reply(await dealer.recv_multipart())
            if sub in events:
                while sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    last_heard = now
                    self._on_stats(await sub.recv_multipart(), now)
            if now >= next_beat:
                self._send({"type": P.HEARTBEAT, "t": time.time()})
                next_beat = now + self.heartbeat_s
            if now - last_heard > self.stale_after_s:
                log.warning("bus silent for %.1fs: reconnecting", now - last_heard)
                return

    def _adopt_timing(self, welcome: dict[str, Any]) -> None:
        """The bus's own heartbeat settings, when it states them, beat config.toml's."""
        hb, live, stats = welcome.get("heartbeat_ms"), welcome.get("liveness"), welcome.get("stats_interval_ms")
        if isinstance(hb, int) and hb > 0:
            self.heartbeat_s = hb / 1000.0
            if isinstance(live, int) and live > 0:
                stats_ms = stats if isinstance(stats, int) and stats > 0 else 1000
                self.stale_after_s = max(hb * live, 3 * stats_ms) / 1000.0

    def _on_reply(self, frames: list[bytes]) -> None:
        h = self._decode(frames)
        if h is None:
            return
        kind, req = h["type"], h.get("req")
        if kind in (P.OPENED, P.CLOSED, P.CLUSTER) and req in self._waiting:
            fut = self._waiting.pop(req)
            if not fut.done():
                fut.set_result(h)
        elif kind == P.PROGRESS:
            if req == self.active_req:
                self._post(PrefillProgress(req, h["done"], h["total"]))
        elif kind == P.TOKEN:
            if req == self.active_req:
                self._post(TokenPiece(req, h["text"], h["pos"]))
        elif kind == P.DONE:
            if req == self.active_req:
                self.active_req = None
                self._post(GenerationDone(req, h["stop"], h["text"], len(h["ids"]), h["n_prompt"], h["timings"]))
        elif kind == P.ERROR:
            if h.get("code") == P.E_UNKNOWN_SESSION and h.get("sid") == self.sid:
                self.sid = None  # the bus lost it (restart, eviction): the next turn opens a new one
                if (self.active_req is not None and not self._retried and self._last is not None
                        and self._last[0] == self.active_req and req in (None, self.active_req)):
                    # Once, transparently: the bus re-prefills the conversation from its messages.
                    self._retried = True
                    self._spawn(self._generate(*self._last))
                    return
            if req is not None and req in self._waiting:
                fut = self._waiting.pop(req)
                if not fut.done():
                    fut.set_exception(RuntimeError(f"{h['code']}: {h['msg']}"))
            elif req is not None and req == self.active_req or (req is None and h.get("sid") == self.sid
                                                                  and self.active_req is not None):
                failed, self.active_req = self.active_req, None
                self._post(GenerationError(failed, h["code"], h["msg"]))
            else:
                self._post(GenerationError(None, h["code"], h["msg"]))

    def _on_stats(self, frames: list[bytes], now: float) -> None:
        if len(frames) != 2 or frames[0] != P.STATS_TOPIC:
            return
        try:
            data = msgpack.unpackb(frames[1], raw=False, strict_map_key=False)
        except Exception:  # a garbled stats frame is skipped, the next one will do
            return
        if isinstance(data, dict):
            self.received_stats += 1
            self._post(Stats(data, now))

    async def _generate(self, req: int, messages: list[dict[str, str]], params: dict[str, Any],
                        max_tokens: int) -> None:
        try:
            if self.sid is None:
                opened = await self._request({"type": P.SESSION_OPEN, "params": params})
                self.sid = opened["sid"]
            if self.active_req != req:
                return  # cancelled or replaced while the session was opening
            self._send({"type": P.GENERATE, "req": req, "sid": self.sid, "messages": messages,
                        "params": params, "max_tokens": max_tokens, "stream": True, "progress": True})
        except Exception as e:
            if self.active_req == req:
                self.active_req = None
                self._post(GenerationError(req, "session", str(e)))

    async def _request(self, header: dict[str, Any], timeout_s: float = 10.0) -> dict[str, Any]:
        req = next(self._reqs)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[req] = fut
        self._send({**header, "req": req})
        try:
            return await asyncio.wait_for(fut, timeout_s)
        finally:
            self._waiting.pop(req, None)

    def _lost(self) -> None:
        """The bus went away: fail whatever was waiting on it."""
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(ConnectionError("the bus went away"))
        self._waiting.clear()
        if self.active_req is not None:
            failed, self.active_req = self.active_req, None
            self._post(GenerationError(failed, "disconnected", "the bus went away during the generation"))
        self.sid = None

    # --- plumbing -----------------------------------------------------------------------------
    def _send(self, header: dict[str, Any]) -> None:
        if self._dealer is None:
            return
        try:
            # A DEALER send does not block (the queue is far below its high-water mark); the
            # future only matters if it fails, which it reports on its own.
            self._dealer.send_multipart(P.encode(header), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _decode(self, frames: list[bytes]) -> dict[str, Any] | None:
        try:
            header, _ = P.decode(frames)
        except P.ProtocolError:
            return None
        return header

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _post(self, message: Message) -> None:
        self.target.post_message(message)
