"""The asyncio face of the bus client, for long-running programs (`dair serve`, the TUI): many
requests at once over one DEALER, answers routed to per-request queues by `req`, the bus's
published stats followed, and the connection held across the bus going away.

One task (`_connection`) owns the sockets. It says hello, heartbeats, reads both sockets and
files what it reads. When the bus has been silent for `stale_after_s` it drops both sockets, fails
every outstanding request with `disconnected`, and starts over with new ones, waiting longer for
a welcome on each further attempt (Paranoid Pirate: bus/backoff.py, config.toml's [reconnect]).
A heartbeat answer from a new bus process (`boot`) fails the outstanding requests with
`bus_restarted`. `generate` resubmits a request lost either way with the tokens streamed so far,
as `BusBackend` does for the CLI (docs/protocol.md, "Bus restart").

The plumbing it shares with the blocking face (bus/client.py) is bus/connection.py's.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
import zmq.asyncio

from dair import security
from dair.bus import protocol as P
from dair.bus.backoff import Backoff
from dair.bus.connection import (
    NO_ANSWER_HINT,
    RESUMABLE,
    BusError,
    BusTimeout,
    ClientCore,
    Resume,
    decode_stats,
    open_dealer,
    open_subscriber,
)

__all__ = ["RESUMABLE", "AsyncBusClient"]

# Connection states, as `on_state` hears them.
CONNECTING = "connecting"
CONNECTED = "connected"
RECONNECTING = "reconnecting"


class AsyncBusClient:
    """One connection to the bus, shared by the tasks of one event loop.

    Callbacks (all optional, called on the loop): `on_state(state, attempt)` when the connection
    changes; `on_welcome(welcome, restarted)` for each welcome (`restarted`: a new bus process, whose
    sessions are not ours); `on_stats(stats, now)` for each published stats map; `on_orphan(header)`
    for an error that answers no request we wait on."""

    def __init__(self, addr: str, keys: security.PeerKeys | None = None, name: str = "client",
                 timeout: float = 30.0, identity: Callable[[], bytes] | None = None,
                 follow_stats: bool = True, cfg: dict[str, Any] | None = None) -> None:
        self.addr = addr
        self.keys = keys
        self.name = name
        self.timeout = timeout
        self.cfg = cfg
        self.core = ClientCore(addr, name, cfg)
        self.backoff = Backoff.from_config(cfg)
        self.ctx = zmq.asyncio.Context.instance()
        self._identity = identity
        self.follow_stats = follow_stats
        self.latest_stats: dict[str, Any] | None = None
        self.state = CONNECTING
        self.on_state: Callable[[str, int], None] | None = None
        self.on_welcome: Callable[[dict[str, Any], bool], None] | None = None
        self.on_stats: Callable[[dict[str, Any], float], None] | None = None
        self.on_orphan: Callable[[dict[str, Any]], None] | None = None
        self._sock: zmq.asyncio.Socket | None = None
        self._queues: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._welcomed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._stats_followers: list[asyncio.Queue[dict[str, Any]]] = []

    # --- lifecycle ----------------------------------------------------------------------------
    @property
    def welcome(self) -> dict[str, Any] | None:
        return self.core.welcome

    @property
    def connected(self) -> bool:
        return self.state == CONNECTED

    @property
    def last_heard(self) -> float:
        return self.core.last_heard

    def silent(self) -> bool:
        """Whether the bus has not answered for a heartbeat timeout (it is down or unreachable):
        a new request would only wait, so callers refuse it at once instead."""
        return self.core.silent()

    def run(self) -> asyncio.Task[None]:
        """Start holding the connection (in a task of the running loop); idempotent."""
        if self._task is None:
            self._welcomed = asyncio.Event()
            self._task = asyncio.ensure_future(self._connection())
        return self._task

    async def start(self, timeout: float | None = None) -> dict[str, Any]:
        """Start the connection and wait for the bus's welcome."""
        self.run()
        return await self.hello(timeout)

    async def hello(self, timeout: float | None = None) -> dict[str, Any]:
        """The welcome of the bus on the current connection (waits for one)."""
        self.run()
        assert self._welcomed is not None
        try:
            await asyncio.wait_for(self._welcomed.wait(), self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            raise BusTimeout(f"no answer from the bus at {self.addr}{NO_ANSWER_HINT}") from None
        assert self.core.welcome is not None
        return self.core.welcome

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    # --- the connection -----------------------------------------------------------------------
    def _set_state(self, state: str, attempt: int = 0) -> None:
        self.state = state
        if self.on_state is not None:
            self.on_state(state, attempt)

    async def _connection(self) -> None:
        attempt, ever = 0, False
        try:
            while True:
                attempt += 1
                self._set_state(RECONNECTING if ever else CONNECTING, attempt)
                welcomed = await self._connect_once(self.backoff.next())
                ever = ever or welcomed
                self._fail_all(P.E_DISCONNECTED)
                if welcomed:
                    attempt = 0  # a fresh outage: count again from the start
                    self.backoff.reset()
        finally:
            self._sock = None

    async def _connect_once(self, patience: float) -> bool:
        """One socket: hello, then pump until the bus has been silent too long (or, before any
        welcome, for `patience`). True if the bus welcomed us on it."""
        sock = open_dealer(self.ctx, self.addr, self.keys,
                           identity=self._identity() if self._identity is not None else None, cfg=self.cfg)
        sub: zmq.asyncio.Socket | None = None
        self.core.new_connection()
        assert self._welcomed is not None
        self._welcomed.clear()
        poller = zmq.asyncio.Poller()
        poller.register(sock, zmq.POLLIN)
        opened = time.monotonic()
        welcomed = False
        try:
            self._sock = sock
            await sock.send_multipart(self.core.hello())
            next_beat = time.monotonic() + self.core.heartbeat_s
            while True:
                wait_s = max(0.0, next_beat - time.monotonic())
                if not welcomed:
                    wait_s = min(wait_s, max(0.0, opened + patience - time.monotonic()))
                events = dict(await poller.poll(timeout=max(1, int(1000 * wait_s))))
                now = time.monotonic()
                if sock in events:
                    while sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        heard = self.core.receive(await sock.recv_multipart())
                        if heard is None:
                            continue
                        if heard.kind == "welcome":
                            if sub is None and self.follow_stats:
                                sub = open_subscriber(self.ctx, P.stats_address(
                                    self.addr, heard.header.get("stats_port")), self.keys, self.cfg)
                                poller.register(sub, zmq.POLLIN)
                            if not welcomed:
                                welcomed = True
                                self._welcomed.set()
                                self._set_state(CONNECTED)
                            if self.on_welcome is not None:
                                self.on_welcome(heard.header, heard.restarted)
                        if heard.restarted:
                            self._fail_all(P.E_BUS_RESTARTED)
                            if heard.kind == "beat":
                                await self._send(self.core.hello())  # the new bus's welcome
                        if heard.kind == "reply":
                            self._file(heard.header)
                if sub is not None and sub in events:
                    while sub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        st = decode_stats(await sub.recv_multipart())
                        if st is not None:
                            self.core.last_heard = now
                            self._on_stats(st, now)
                if now >= next_beat:
                    await self._send(self.core.beat())
                    next_beat = now + self.core.heartbeat_s
                if welcomed and now - self.core.last_heard > self.core.stale_after_s:
                    return True
                if not welcomed and now - opened > patience:
                    return False
        finally:
            self._sock = None
            sock.close(linger=0)
            if sub is not None:
                sub.close(linger=0)

    def _file(self, h: dict[str, Any]) -> None:
        req = h.get("req")
        q = self._queues.get(req) if isinstance(req, int) else None
        if q is not None:
            q.put_nowait(h)
        elif h["type"] == P.ERROR and req is None and self.on_orphan is not None:
            self.on_orphan(h)
        # An answer nobody waits for (a request given up on) is dropped.

    def _fail_all(self, code: str) -> None:
        for req, q in self._queues.items():
            q.put_nowait(self.core.lost(req, code))

    def _on_stats(self, st: dict[str, Any], now: float) -> None:
        self.latest_stats = st
        for q in self._stats_followers:
            q.put_nowait(st)
        if self.on_stats is not None:
            self.on_stats(st, now)

    async def _send(self, frames: list[Any]) -> None:
        if self._sock is None:
            raise BusError(P.E_DISCONNECTED, f"not connected to the bus at {self.addr}")
        with contextlib.suppress(zmq.Again):
            # A DEALER queues far below its high-water mark; a full queue loses this message,
            # which its request's timeout reports.
            await self._sock.send_multipart(frames, flags=zmq.NOBLOCK)

    # --- requests: plumbing ---------------------------------------------------------------------
    def _open_req(self) -> int:
        req = self.core.next_req()
        self._queues[req] = asyncio.Queue()
        return req

    async def _next(self, req: int, timeout: float) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self._queues[req].get(), timeout)
        except asyncio.TimeoutError:
            raise BusTimeout(f"no answer from the bus at {self.addr} within {timeout:.0f}s{NO_ANSWER_HINT}") from None

    async def send(self, header: dict[str, Any]) -> None:
        """Send a message that expects no answer (cancel, a session_close without req)."""
        await self._send(P.encode(header))

    async def call(self, header: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send a request and await its one answer (an `error` raises BusError)."""
        req = self._open_req()
        try:
            await self._send(P.encode({**header, "req": req}))
            reply = await self._next(req, self.timeout if timeout is None else timeout)
        finally:
            self._queues.pop(req, None)
        if reply["type"] == P.ERROR:
            raise BusError(reply["code"], reply["msg"])
        return reply

    async def stream(self, header: dict[str, Any], timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """Send a `generate` (fields as in protocol.md) and yield its `token` events, then its
        `done`; an `error` raises BusError."""
        req = self._open_req()
        wait = self.timeout if timeout is None else timeout
        try:
            await self._send(P.encode({"type": P.GENERATE, **header, "req": req}))
            while True:
                ev = await self._next(req, wait)
                if ev["type"] == P.ERROR:
                    raise BusError(ev["code"], ev["msg"])
                yield ev
                if ev["type"] == P.DONE:
                    return
        finally:
            self._queues.pop(req, None)

    # --- requests -----------------------------------------------------------------------------
    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.call({"type": P.STATUS}, timeout)

    async def open_session(self, params: dict[str, Any] | None = None, timeout: float | None = None) -> str:
        return (await self.call({"type": P.SESSION_OPEN, **({"params": params} if params else {})}, timeout))["sid"]

    async def close_session(self, sid: str) -> None:
        """Free the session on every stage (a request still running in it is cancelled)."""
        with contextlib.suppress(BusError, BusTimeout):
            await self.call({"type": P.SESSION_CLOSE, "sid": sid}, timeout=5.0)

    async def cancel(self, sid: str) -> None:
        await self.send({"type": P.CANCEL, "sid": sid})

    async def score(self, ids: list[int], top_k: int, timeout: float | None = None) -> list[dict[str, Any]]:
        return (await self.call({"type": P.SCORE, "ids": list(ids), "top_k": top_k}, timeout))["positions"]

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        backoff = Backoff.from_config(self.cfg)
        while time.monotonic() < deadline:
            try:
                st = await self.status(timeout=1.0)
                if st["ready"]:
                    return
                problems = st.get("problems", [])
                backoff.reset()
                await asyncio.sleep(0.2)
            except (BusTimeout, BusError):
                # No bus, or no connection to it yet: back off while it is away.
                await asyncio.sleep(min(backoff.next(), max(0.0, deadline - time.monotonic())))
        raise BusError(P.E_NOT_READY, "pipeline not ready: " + "; ".join(problems))

    async def stats(self) -> AsyncIterator[dict[str, Any]]:
        """The bus's published stats maps, as they arrive."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._stats_followers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._stats_followers.remove(q)

    async def _stream_once(self, ids: list[int], params: dict[str, Any], max_tokens: int,
                           stop_ids: list[int] | None, token_timeout: float,
                           logprobs: int | None) -> AsyncIterator[dict[str, Any]]:
        """One `generate` in a session of its own; the session is closed however the stream ends,
        so a consumer that stops iterating (an HTTP client gone) frees the stages' KV caches."""
        sid = await self.open_session(params)
        finished = False
        try:
            h: dict[str, Any] = {"sid": sid, "ids": list(ids), "params": params, "max_tokens": max_tokens,
                                 "stream": True}
            if stop_ids is not None:
                h["stop_ids"] = list(stop_ids)
            if logprobs is not None:
                h["logprobs"] = logprobs
            async with contextlib.aclosing(self.stream(h, token_timeout)) as events:
                try:
                    async for ev in events:
                        finished = ev["type"] == P.DONE
                        yield ev
                except BusError:
                    finished = True
                    raise
        finally:
            # Shielded: a cancelled consumer must still free the session on the stages.
            task = asyncio.ensure_future(self.close_session(sid))
            self._closing.add(task)  # the loop keeps only a weak reference to a task
            task.add_done_callback(self._closing.discard)
            if not finished:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(task)

    async def generate(self, ids: list[int], params: dict[str, Any], max_tokens: int,
                       stop_ids: list[int] | None = None, resume_timeout: float = 60.0,
                       token_timeout: float = 300.0, logprobs: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """`token` events, then one `done` whose `ids` are all the tokens generated. With
        `logprobs` (0..20) each `token` carries its `lp` and the `logprobs` likeliest `top` ids.

        A request lost to a bus restart (or a dropped connection, or a lost session) is sent
        again once the pipeline is ready, with the tokens received so far appended to the prompt
        (connection.Resume): the caller sees the tokens of an uninterrupted run, none twice.
        `params` should carry a seed for that to hold when sampling."""
        run = Resume(ids, max_tokens, resume_timeout)
        n_prompt = len(ids)
        while True:
            prompt, left = run.attempt()
            try:
                async with contextlib.aclosing(self._stream_once(
                        prompt, params, left, stop_ids, token_timeout, logprobs)) as events:
                    async for ev in events:
                        if ev["type"] == P.TOKEN:
                            run.token(ev["id"], ev.get("text", ""))
                            yield ev
                        else:
                            yield {**ev, "ids": run.ids(ev["ids"]), "text": run.text(ev.get("text", "")),
                                   "n_prompt": n_prompt,
                                   "resumed_at": run.resumed_at}
                            return
            except BusError as e:
                if not run.may_retry(e):
                    raise
                await self.wait_ready(run.wait_left())
