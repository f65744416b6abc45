"""Talking to a dair bus: a request/stream client, a stats subscriber, and BusBackend.

`BusClient` is the low-level, synchronous client (one DEALER; answers are matched to requests
by `req`, so several requests may be outstanding). `StatsSubscriber` follows the bus's PUB
stats. `AsyncBusClient` offers the same requests to asyncio programs (token streams, stats
iterator). `BusBackend` implements dair.backend.Backend over a running cluster, so `dair generate
--bus`, `score --bus` and `chat --bus` behave as the in-process engine does.
"""
from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from dair import security
from dair.bus import protocol as P
from dair.errors import DairError

NO_ANSWER_HINT = " (is `dair-bus` running? if it uses keys, pass --keys or --server-key and --secret-key)"

class BusError(DairError):
    """An error reply from the bus (`code` is one of protocol.E_*)."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"bus: {msg}" if code != P.E_NOT_READY else f"bus: {msg} (is every stage up?)")
        self.code = code


class BusTimeout(DairError):
    pass


class BusClient:
    def __init__(self, addr: str, timeout: float = 30.0, name: str = "client",
                 keys: security.PeerKeys | None = None) -> None:
        self.addr = addr
        self.timeout = timeout
        self.name = name
        self.keys = keys
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        security.apply_client_keys(self.sock, keys)
        self.sock.connect(addr)
        self._req = 0
        self._mail: dict[int | None, deque[dict[str, Any]]] = {}
        self.welcome: dict[str, Any] | None = None
        # The bus closes the sessions of a client silent for heartbeat_ms x liveness, so a thread
        # heartbeats while the caller does other things between requests. The socket is shared
        # under this lock (never used by two threads at once).
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        from dair.config import defaults

        self.heartbeat_s = int(defaults("bus")["heartbeat_interval_ms"]) / 1000.0
        self.boot: str | None = None  # the bus process answering us (see _on_beat)
        self._lost_upto = 0  # requests up to this number went to a bus that has since restarted
        threading.Thread(target=self._heartbeats, name="bus-client-heartbeat", daemon=True).start()

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            self.sock.close(linger=0)

    def _heartbeats(self) -> None:
        # The first beat at once: its answer tells us which bus process holds our first request,
        # so that a restart even within the first heartbeat interval is noticed.
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self.sock.send_multipart(P.encode({"type": P.HEARTBEAT, "t": time.time()}), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the bus is unreachable right now: the next beat tries again
            if self._stopping.wait(self.heartbeat_s):
                return

    def _on_beat(self, h: dict[str, Any]) -> None:
        """A heartbeat answer or welcome: a new `boot` means a new bus process without our sessions."""
        boot = h.get("boot")
        if not isinstance(boot, str):
            return
        if self.boot is not None and boot != self.boot:
            self._lost_upto = self._req
        self.boot = boot

    def __enter__(self) -> BusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------
    def send(self, header: dict[str, Any]) -> int:
        """Send a request; returns its `req` number (assigned here unless given)."""
        if "req" not in header and header["type"] in P.SCHEMAS and "req" in P.SCHEMAS[header["type"]]:
            self._req += 1
            header = {**header, "req": self._req}
        self._send_frames(P.encode(header), time.monotonic() + self.timeout)
        return header.get("req", 0)

    def _send_frames(self, frames: list[Any], deadline: float) -> None:
        """Send without blocking past the deadline: a DEALER with no live connection (a bus that
        never completed the CURVE handshake with us, say) blocks a plain send forever."""
        while True:
            with self._lock:  # short polls: the heartbeat thread takes the lock between them
                if self.sock.poll(max(0.0, min(0.05, deadline - time.monotonic())) * 1000, zmq.POLLOUT):
                    self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
                    return
            if time.monotonic() >= deadline:
                raise BusTimeout(f"no answer from the bus at {self.addr}{NO_ANSWER_HINT}")

    def _recv_one(self, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._lock:  # short polls: the heartbeat thread takes the lock between them
                if self.sock.poll(max(0.0, min(0.05, deadline - time.monotonic())) * 1000):
                    header, _ = P.decode(self.sock.recv_multipart())
                    if header["type"] != P.HEARTBEAT:
                        return header
                    self._on_beat(header)
                    if self._lost_upto:
                        return header  # let next() tell a waiting request that the bus restarted
                    continue
            if time.monotonic() >= deadline:
                return None

    def next(self, req: int | None, timeout: float | None = None) -> dict[str, Any]:
        """The next message answering `req` (messages for other requests are kept for later)."""
        box = self._mail.get(req)
        if box:
            return box.popleft()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if req is not None and 0 < req <= self._lost_upto:
                return P.error(P.E_BUS_RESTARTED, f"the bus at {self.addr} restarted and lost this request "
                               "and its session; send it again (in a new session)", req=req)
            h = self._recv_one(deadline - time.monotonic())
            if h is not None and h["type"] == P.HEARTBEAT:
                continue
            if h is None:
                raise BusTimeout(f"no answer from the bus at {self.addr} within "
                                 f"{self.timeout if timeout is None else timeout:.0f}s{NO_ANSWER_HINT}")
            key = h.get("req")
            if key == req:
                return h
            if h["type"] == P.ERROR and key is None and req is not None and h.get("code") != P.E_UNKNOWN_SESSION:
                # An error without a req answers whatever we sent last (e.g. a malformed request).
                return h
            self._mail.setdefault(key, deque()).append(h)

    def call(self, header: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        req = self.send(header)
        reply = self.next(req, timeout)
        if reply["type"] == P.ERROR:
            raise BusError(reply["code"], reply["msg"])
        return reply

    # --- requests -----------------------------------------------------------------------------
    def hello(self, timeout: float | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        self._send_frames(P.encode({"type": P.HELLO, "name": self.name}), deadline)
        while True:
            h = self._recv_one(deadline - time.monotonic())
            if h is None:
                raise BusTimeout(f"no answer from the bus at {self.addr}{NO_ANSWER_HINT}")
            if h["type"] == P.ERROR and h.get("req") is None:
                # The bus answered, and said no (a stage key used by a client, say): say that,
                # not that nothing answered.
                raise BusError(h["code"], h["msg"])
            if h["type"] == P.WELCOME:
                self.welcome = h
                self._on_beat(h)
                if isinstance(h.get("heartbeat_ms"), int) and h["heartbeat_ms"] > 0:
                    self.heartbeat_s = h["heartbeat_ms"] / 1000.0
                return h

    def status(self, timeout: float | None = None) -> dict[str, Any]:
        return self.call({"type": P.STATUS}, timeout)

    def open_session(self, params: dict[str, Any] | None = None) -> str:
        h: dict[str, Any] = {"type": P.SESSION_OPEN}
        if params:
            h["params"] = params
        return self.call(h)["sid"]

    def close_session(self, sid: str, timeout: float | None = None) -> None:
        self.call({"type": P.SESSION_CLOSE, "sid": sid}, timeout)

    def cancel(self, sid: str) -> None:
        self.send({"type": P.CANCEL, "sid": sid})

    def start_generate(self, *, ids: list[int] | None = None, text: str | None = None,
                       messages: list[dict[str, str]] | None = None, sid: str | None = None,
                       params: dict[str, Any] | None = None, max_tokens: int | None = None,
                       stop_ids: list[int] | None = None, stream: bool = True) -> int:
        h: dict[str, Any] = {"type": P.GENERATE, "stream": stream}
        for k, v in (("ids", ids), ("text", text), ("messages", messages), ("sid", sid), ("params", params),
                     ("max_tokens", max_tokens), ("stop_ids", stop_ids)):
            if v is not None:
                h[k] = list(v) if k in ("ids", "stop_ids") else v
        return self.send(h)

    def events(self, req: int, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """`token` messages of request `req`, then its `done` (an `error` raises BusError)."""
        while True:
            h = self.next(req, timeout)
            if h["type"] == P.ERROR:
                raise BusError(h["code"], h["msg"])
            yield h
            if h["type"] == P.DONE:
                return

    def generate(self, **kw: Any) -> Iterator[dict[str, Any]]:
        return self.events(self.start_generate(**kw))

    def score(self, *, ids: list[int] | None = None, text: str | None = None, top_k: int = 5,
              timeout: float | None = None) -> list[dict[str, Any]]:
        h: dict[str, Any] = {"type": P.SCORE, "top_k": top_k}
        if ids is not None:
            h["ids"] = list(ids)
        else:
            h["text"] = text
        return self.call(h, timeout)["positions"]

    def wait_ready(self, timeout: float = 60.0, alive: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Poll `status` until the pipeline is ready; returns the last status."""
        deadline = time.monotonic() + timeout
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise DairError("a cluster process exited before the pipeline was ready")
            try:
                st = self.status(timeout=1.0)
            except BusTimeout:
                continue
            if st["ready"]:
                return st
            time.sleep(0.1)
        raise DairError(f"pipeline not ready after {timeout:.0f}s: " + "; ".join(st.get("problems", [])))


class StatsSubscriber:
    """The bus's stats as published on its PUB socket (bus port + 1)."""

    def __init__(self, stats_addr: str, keys: security.PeerKeys | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        security.apply_client_keys(self.sock, keys)
        self.sock.setsockopt(zmq.SUBSCRIBE, P.STATS_TOPIC)
        self.sock.connect(stats_addr)

    def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        if not self.sock.poll(timeout * 1000):
            return None
        _, frame = self.sock.recv_multipart()
        import msgpack

        return msgpack.unpackb(frame, raw=False)

    def close(self) -> None:
        self.sock.close(linger=0)


class BusBackend:
    """dair.backend.Backend over a running cluster."""

    def __init__(self, addr: str, timeout: float = 60.0, model_path: str | None = None,
                 keys: security.PeerKeys | None = None) -> None:
        self.client = BusClient(addr, timeout=timeout, keys=keys)
        self.model_info = self.client.hello(timeout=min(timeout, 10.0))["model"]
        self.n_layers = int(self.model_info["n_layers"])
        self._model_path = model_path
        self._tokenizer: Any = None
        self._sid: str | None = None
        self.resume_timeout = max(timeout, 60.0)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer, from a local copy of the bus's model file (same fingerprint)."""
        if self._tokenizer is None:
            self._tokenizer = local_tokenizer(self.model_info, self._model_path)
        return self._tokenizer

    def generate(self, prompt_ids: list[int], params: Any, max_tokens: int, stop_ids: set[int],
                 on_token: Callable[[int, str], bool | None] | None = None) -> dict[str, Any]:
        """One generation. Calls share one bus session, so a call whose prompt extends the last
        one (a chat turn) reuses the KV caches the stages hold and prefills only the new tokens.

        If the bus restarts (or loses the session) mid-generation, the request is resubmitted
        with the tokens received so far appended to the prompt, once the pipeline is ready again:
        sampling depends only on (seed, position), so the tokens are those of an uninterrupted run
        and none is delivered twice. `resume_timeout` bounds the wait. The text is the bus's (its
        `token` pieces and `done` text): nothing is decoded here."""
        got: list[int] = []
        pieces: list[str] = []

        def note(tok: int, piece: str) -> bool | None:
            got.append(tok)
            pieces.append(piece)
            return on_token(tok, piece) if on_token is not None else None

        deadline = time.monotonic() + self.resume_timeout
        while True:
            done_before, text_before = list(got), "".join(pieces)
            try:
                r = self._generate(list(prompt_ids) + done_before, params, max_tokens - len(done_before),
                                   stop_ids, note)
            except BusError as e:
                if e.code not in (P.E_UNKNOWN_SESSION, P.E_BUS_RESTARTED) or time.monotonic() > deadline:
                    raise
                self._sid = None  # that session died with the old bus
                self.client.wait_ready(max(1.0, deadline - time.monotonic()))
                continue
            r["ids"] = done_before + list(r["ids"])
            if done_before:
                r["resumed_at"] = len(done_before)
                r["text"] = text_before + r["text"]
            return r

    def _generate(self, prompt_ids: list[int], params: Any, max_tokens: int, stop_ids: set[int],
                  on_token: Callable[[int, str], bool | None] | None) -> dict[str, Any]:
        p = params.to_dict() if hasattr(params, "to_dict") else dict(params)
        if self._sid is None:
            self._sid = self.client.open_session(p)
        req = self.client.start_generate(ids=list(prompt_ids), sid=self._sid, params=p, max_tokens=max_tokens,
                                         stop_ids=sorted(stop_ids))
        cancelled = False
        for ev in self.client.events(req):
            if ev["type"] == P.TOKEN and on_token is not None and not cancelled:
                if on_token(ev["id"], ev["text"]) is False:
                    cancelled = True
                    self.client.cancel(ev["sid"])
            elif ev["type"] == P.DONE:
                return {"ids": list(ev["ids"]), "timings": dict(ev["timings"]), "stop": ev["stop"],
                        "text": ev["text"]}
        raise DairError("bus ended the stream without a result")  # pragma: no cover

    def score(self, ids: list[int], top_k: int) -> dict[str, Any]:
        positions = self.client.score(ids=list(ids), top_k=top_k)
        return {"positions": [{"top": [[int(i), float(v)] for i, v in p["top"]],
                               "logprob_next": p["logprob_next"]} for p in positions]}

    def close(self) -> None:
        if self._sid is not None:
            try:
                self.client.close_session(self._sid, timeout=2.0)
            except DairError:
                pass  # the bus is gone: it dropped the session with itself
            self._sid = None
        self.client.close()


class AsyncBusClient:
    """The same requests for asyncio programs (the TUI): zmq.asyncio sockets, answers matched by
    `req`, so a token stream and a status request can be awaited from different tasks."""

    def __init__(self, addr: str, timeout: float = 30.0, name: str = "client",
                 keys: security.PeerKeys | None = None) -> None:
        import asyncio

        import zmq.asyncio

        self.addr = addr
        self.timeout = timeout
        self.name = name
        self.ctx = zmq.asyncio.Context.instance()
        self.keys = keys
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        security.apply_client_keys(self.sock, keys)
        self.sock.connect(addr)
        self._req = 0
        self._queues: dict[int | None, asyncio.Queue[dict[str, Any]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        from dair.config import defaults

        self.heartbeat_s = int(defaults("bus")["heartbeat_interval_ms"]) / 1000.0

    def _queue(self, req: int | None) -> Any:
        import asyncio

        return self._queues.setdefault(req, asyncio.Queue())

    async def _read(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            try:
                h, _ = P.decode(frames)
            except P.ProtocolError:
                continue
            if h["type"] == P.HEARTBEAT:
                continue  # the answer to our own beat
            if h["type"] == P.WELCOME and isinstance(h.get("heartbeat_ms"), int) and h["heartbeat_ms"] > 0:
                self.heartbeat_s = h["heartbeat_ms"] / 1000.0
            await self._queue(h.get("req")).put(h)

    async def _heartbeats(self) -> None:
        # The bus closes the idle sessions of a client silent for heartbeat_ms x liveness.
        import asyncio

        while True:
            await self.sock.send_multipart(P.encode({"type": P.HEARTBEAT, "t": time.time()}))
            await asyncio.sleep(self.heartbeat_s)

    async def send(self, header: dict[str, Any]) -> int:
        import asyncio

        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
            self._beater = asyncio.ensure_future(self._heartbeats())
        if "req" not in header and "req" in P.SCHEMAS.get(header["type"], {}):
            self._req += 1
            header = {**header, "req": self._req}
        await self.sock.send_multipart(P.encode(header))
        return header.get("req", 0)

    async def next(self, req: int | None, timeout: float | None = None) -> dict[str, Any]:
        import asyncio

        try:
            return await asyncio.wait_for(self._queue(req).get(), self.timeout if timeout is None else timeout)
        except asyncio.TimeoutError:
            raise BusTimeout(f"no answer from the bus at {self.addr}") from None

    async def call(self, header: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        reply = await self.next(await self.send(header), timeout)
        if reply["type"] == P.ERROR:
            raise BusError(reply["code"], reply["msg"])
        return reply

    async def hello(self) -> dict[str, Any]:
        await self.send({"type": P.HELLO, "name": self.name})
        while True:  # a welcome carries no req
            h = await self.next(None)
            if h["type"] == P.WELCOME:
                return h

    async def status(self) -> dict[str, Any]:
        return await self.call({"type": P.STATUS})

    async def open_session(self, params: dict[str, Any] | None = None) -> str:
        return (await self.call({"type": P.SESSION_OPEN, **({"params": params} if params else {})}))["sid"]

    async def close_session(self, sid: str) -> None:
        await self.call({"type": P.SESSION_CLOSE, "sid": sid})

    async def cancel(self, sid: str) -> None:
        await self.send({"type": P.CANCEL, "sid": sid})

    async def generate(self, **fields: Any) -> Any:
        """Async iterator of `token` messages, then `done` (fields as in BusClient.start_generate)."""
        req = await self.send({"type": P.GENERATE, **{k: v for k, v in fields.items() if v is not None}})
        while True:
            h = await self.next(req)
            if h["type"] == P.ERROR:
                raise BusError(h["code"], h["msg"])
            yield h
            if h["type"] == P.DONE:
                return

    async def stats(self, stats_addr: str | None = None) -> Any:
        """Async iterator of the bus's published stats."""
        import msgpack
        import zmq.asyncio

        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, P.STATS_TOPIC)
        security.apply_client_keys(sub, self.keys)
        sub.connect(stats_addr or P.stats_address(self.addr))
        try:
            while True:
                _, frame = await sub.recv_multipart()
                yield msgpack.unpackb(frame, raw=False)
        finally:
            sub.close(linger=0)

    def close(self) -> None:
        for task in (self._reader, self._beater):
            if task is not None:
                task.cancel()
        self.sock.close(linger=0)


def local_tokenizer(model_info: dict[str, Any], explicit: str | None = None) -> Any:
    """The tokenizer of a local file with the bus's fingerprint (every node has the model file):
    `explicit` (--model), else the bus's own path, else the default model."""
    from dair.model import open_model
    from dair.model.fetch import default_model_path
    from dair.tokenizer import load_tokenizer

    candidates = [explicit, model_info.get("path")]
    try:
        candidates.append(str(default_model_path()))
    except DairError:
        pass
    for path in candidates:
        if path and os.path.exists(path):
            mf = open_model(path)
            if mf.fingerprint == model_info.get("fingerprint"):
                return load_tokenizer(mf)
            if path == explicit:
                raise DairError(f"{path}: not the bus's model {model_info.get('name')} (fingerprints differ)")
    raise DairError(f"no local copy of the bus's model {model_info.get('name')} (give --model PATH of the same file)")
