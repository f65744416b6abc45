"""An asyncio client of the bus for long-running servers (`dair serve`): many requests at once
over one DEALER, each in a session of its own, resumed across a bus restart.

Unlike `dair.bus.client.AsyncBusClient` (the TUI's, one user), this client is shared by every
HTTP request of a server: answers are routed to per-request queues by `req`, a request whose
bus process restarted is failed at once with `bus_restarted` (the heartbeat answers carry the
bus's `boot` id), and `generate` resubmits such a request with the tokens streamed so far, as
`BusBackend` does for the CLI (docs/protocol.md, "Bus restart").
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from dair import security
from dair.bus import protocol as P
from dair.bus.client import NO_ANSWER_HINT, BusError, BusTimeout

# Codes after which a request can be sent again unchanged once the pipeline is whole.
RESUMABLE = frozenset({P.E_BUS_RESTARTED, P.E_UNKNOWN_SESSION})


class AsyncBus:
    """One connection to the bus, shared by concurrent tasks of one event loop."""

    def __init__(self, addr: str, keys: security.PeerKeys | None = None, name: str = "serve",
                 timeout: float = 30.0) -> None:
        from dair.config import defaults

        self.addr = addr
        self.keys = keys
        self.name = name
        self.timeout = timeout
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        security.apply_client_keys(self.sock, keys)
        self.sock.connect(addr)
        self.heartbeat_s = int(defaults("bus")["heartbeat_interval_ms"]) / 1000.0
        self.liveness = int(defaults("bus")["heartbeat_liveness"])
        self.welcome: dict[str, Any] | None = None
        self.boot: str | None = None
        self.last_heard = 0.0  # monotonic time of the bus's last message
        self.latest_stats: dict[str, Any] | None = None
        self._req = 0
        self._queues: dict[int, asyncio.Queue[dict[str, Any]]] = {}
        self._welcomes: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing: set[asyncio.Task[None]] = set()

    # --- lifecycle ----------------------------------------------------------------------------
    async def start(self, timeout: float | None = None) -> dict[str, Any]:
        """Start the reader, heartbeats and stats tasks; returns the bus's welcome."""
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._heartbeats()),
                       asyncio.create_task(self._follow_stats())]
        return await self.hello(timeout)

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self.sock.close(linger=0)

    async def hello(self, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            await self.sock.send_multipart(P.encode({"type": P.HELLO, "name": self.name}))
            try:
                w = await asyncio.wait_for(self._welcomes.get(), min(2.0, max(0.1, deadline - time.monotonic())))
            except asyncio.TimeoutError:
                if time.monotonic() >= deadline:
                    raise BusTimeout(f"no answer from the bus at {self.addr}{NO_ANSWER_HINT}") from None
                continue
            self.welcome = w
            if isinstance(w.get("heartbeat_ms"), int) and w["heartbeat_ms"] > 0:
                self.heartbeat_s = w["heartbeat_ms"] / 1000.0
            if isinstance(w.get("liveness"), int) and w["liveness"] > 0:
                self.liveness = w["liveness"]
            return w

    def silent(self) -> bool:
        """Whether the bus has not answered for a heartbeat timeout (it is down or unreachable):
        a new request would only wait, so callers refuse it at once instead."""
        return time.monotonic() - self.last_heard > self.heartbeat_s * self.liveness

    # --- plumbing -----------------------------------------------------------------------------
    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                h, _ = P.decode(frames)
            except P.ProtocolError:
                continue  # the bus never sends garbage; a stray frame must not stop the reader
            self.last_heard = time.monotonic()
            if h["type"] in (P.HEARTBEAT, P.WELCOME):
                self._on_boot(h.get("boot"))
                if h["type"] == P.WELCOME:
                    self._welcomes.put_nowait(h)
                continue
            q = self._queues.get(h.get("req")) if isinstance(h.get("req"), int) else None
            if q is not None:
                q.put_nowait(h)
            # An answer nobody waits for (a request given up on) is dropped.

    def _on_boot(self, boot: Any) -> None:
        if not isinstance(boot, str):
            return
        if self.boot is not None and boot != self.boot:
            # A new bus process: every request we have outstanding died with the old one.
            for req, q in self._queues.items():
                q.put_nowait(P.error(P.E_BUS_RESTARTED, f"the bus at {self.addr} restarted and lost this "
                                     "request", req=req))
        self.boot = boot

    async def _heartbeats(self) -> None:
        # The bus closes the sessions of a client silent for heartbeat_ms x liveness.
        while True:
            with contextlib.suppress(zmq.ZMQError):
                await self.sock.send_multipart(P.encode({"type": P.HEARTBEAT, "t": time.time()}), flags=zmq.NOBLOCK)
            await asyncio.sleep(self.heartbeat_s)

    async def _follow_stats(self) -> None:
        """Keep the bus's latest published stats (for /metrics and the web page)."""
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        security.apply_client_keys(sub, self.keys)
        sub.setsockopt(zmq.SUBSCRIBE, P.STATS_TOPIC)
        sub.connect(P.stats_address(self.addr))
        try:
            while True:
                frames = await sub.recv_multipart()
                if len(frames) != 2:
                    continue
                with contextlib.suppress(Exception):
                    st = msgpack.unpackb(frames[1], raw=False)
                    if isinstance(st, dict):
                        self.latest_stats = st
        finally:
            sub.close(linger=0)

    def _open_req(self) -> int:
        self._req += 1
        self._queues[self._req] = asyncio.Queue()
        return self._req

    async def _send(self, header: dict[str, Any]) -> None:
        await self.sock.send_multipart(P.encode(header))

    async def _next(self, req: int, timeout: float) -> dict[str, Any]:
        try:
            return await asyncio.wait_for(self._queues[req].get(), timeout)
        except asyncio.TimeoutError:
            raise BusTimeout(f"no answer from the bus at {self.addr} within {timeout:.0f}s{NO_ANSWER_HINT}") from None

    async def call(self, header: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        """Send a request and await its one answer (an `error` raises BusError)."""
        req = self._open_req()
        try:
            await self._send({**header, "req": req})
            reply = await self._next(req, self.timeout if timeout is None else timeout)
        finally:
            self._queues.pop(req, None)
        if reply["type"] == P.ERROR:
            raise BusError(reply["code"], reply["msg"])
        return reply

    # --- requests -----------------------------------------------------------------------------
    async def status(self, timeout: float | None = None) -> dict[str, Any]:
        return await self.call({"type": P.STATUS}, timeout)

    async def open_session(self, params: dict[str, Any] | None = None) -> str:
        return (await self.call({"type": P.SESSION_OPEN, **({"params": params} if params else {})}))["sid"]

    async def close_session(self, sid: str) -> None:
        """Free the session on every stage (a request still running in it is cancelled)."""
        with contextlib.suppress(BusError, BusTimeout):
            await self.call({"type": P.SESSION_CLOSE, "sid": sid}, timeout=5.0)

    async def score(self, ids: list[int], top_k: int, timeout: float | None = None) -> list[dict[str, Any]]:
        return (await self.call({"type": P.SCORE, "ids": list(ids), "top_k": top_k}, timeout))["positions"]

    async def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        while time.monotonic() < deadline:
            try:
                st = await self.status(timeout=1.0)
                if st["ready"]:
                    return
                problems = st.get("problems", [])
            except BusTimeout:
                pass
            await asyncio.sleep(0.2)
        raise BusError(P.E_NOT_READY, "pipeline not ready: " + "; ".join(problems))

    async def _stream_once(self, ids: list[int], params: dict[str, Any], max_tokens: int,
                           stop_ids: list[int] | None, token_timeout: float,
                           logprobs: int | None) -> AsyncIterator[dict[str, Any]]:
        """One `generate` in a session of its own; the session is closed however the stream ends,
        so a consumer that stops iterating (an HTTP client gone) frees the stages' KV caches."""
        sid = await self.open_session(params)
        req = self._open_req()
        finished = False
        try:
            h: dict[str, Any] = {"type": P.GENERATE, "req": req, "sid": sid, "ids": list(ids),
                                 "params": params, "max_tokens": max_tokens, "stream": True}
            if stop_ids is not None:
                h["stop_ids"] = list(stop_ids)
            if logprobs is not None:
                h["logprobs"] = logprobs
            await self._send(h)
            while True:
                ev = await self._next(req, token_timeout)
                if ev["type"] == P.ERROR:
                    finished = True
                    raise BusError(ev["code"], ev["msg"])
                if ev["type"] == P.DONE:
                    finished = True
                yield ev
                if finished:
                    return
        finally:
            self._queues.pop(req, None)
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

        A request lost to a bus restart is sent again once the pipeline is ready, with the tokens
        received so far appended to the prompt: sampling depends only on (seed, position), so
        the caller sees the tokens of an uninterrupted run, none twice. `params` should carry a
        seed for that to hold when sampling."""
        got: list[int] = []
        n_prompt = len(ids)
        deadline = time.monotonic() + resume_timeout
        while True:
            before = list(got)
            try:
                async with contextlib.aclosing(self._stream_once(
                        list(ids) + before, params, max_tokens - len(before), stop_ids, token_timeout,
                        logprobs)) as events:
                    async for ev in events:
                        if ev["type"] == P.TOKEN:
                            got.append(int(ev["id"]))
                            yield ev
                        else:
                            yield {**ev, "ids": before + list(ev["ids"]), "n_prompt": n_prompt,
                                   "resumed_at": len(before) if before else None}
                            return
            except BusError as e:
                if e.code not in RESUMABLE or time.monotonic() > deadline:
                    raise
                await self.wait_ready(max(1.0, deadline - time.monotonic()))
