"""The blocking face of the bus client: `BusClient` (requests and token streams), `StatsSubscriber`
(the published stats) and `BusBackend` (dair.backend.Backend over a running cluster, so `dair
generate --bus`, `score --bus` and `chat --bus` behave as the in-process engine does).

The plumbing (sockets, keys, request numbers, the bus's restarts, resubmission) is
bus/connection.py's, shared with the asyncio face in bus/aclient.py.
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
from dair.bus.backoff import Backoff
from dair.bus.connection import (
    NO_ANSWER_HINT,
    BusError,
    BusTimeout,
    ClientCore,
    Resume,
    decode_stats,
    open_dealer,
    open_subscriber,
)
from dair.errors import DairError

__all__ = ["NO_ANSWER_HINT", "BusBackend", "BusClient", "BusError", "BusTimeout", "StatsSubscriber",
           "local_model", "local_tokenizer"]


class BusClient:
    """One DEALER; answers are matched to requests by `req`, so several may be outstanding."""

    def __init__(self, addr: str, timeout: float = 30.0, name: str = "client",
                 keys: security.PeerKeys | None = None, cfg: dict[str, Any] | None = None) -> None:
        self.addr = addr
        self.timeout = timeout
        self.name = name
        self.keys = keys
        self.cfg = cfg
        self.core = ClientCore(addr, name, cfg)
        self.ctx = zmq.Context.instance()
        self.sock = open_dealer(self.ctx, addr, keys, cfg=cfg)
        self._mail: dict[int | None, deque[dict[str, Any]]] = {}
        self._pending: set[int] = set()  # requests sent and not yet answered in full
        # The bus closes the sessions of a client silent for heartbeat_ms x liveness, so a thread
        # heartbeats while the caller does other things between requests. The socket is shared
        # under this lock (never used by two threads at once).
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        threading.Thread(target=self._heartbeats, name="bus-client-heartbeat", daemon=True).start()

    @property
    def welcome(self) -> dict[str, Any] | None:
        return self.core.welcome

    @property
    def boot(self) -> str | None:
        return self.core.boot

    def close(self) -> None:
        self._stopping.set()
        with self._lock:
            self.sock.close(linger=0)

    def __enter__(self) -> BusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _heartbeats(self) -> None:
        # The first beat at once: its answer tells us which bus process holds our first request,
        # so that a restart even within the first heartbeat interval is noticed.
        while True:
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self.sock.send_multipart(self.core.beat(), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # the bus is unreachable right now: the next beat tries again
            if self._stopping.wait(self.core.heartbeat_s):
                return

    # --- plumbing -----------------------------------------------------------------------------
    def send(self, header: dict[str, Any]) -> int:
        """Send a request; returns its `req` number (assigned here unless given; 0: none)."""
        header = self.core.number(header)
        self._send_frames(P.encode(header), time.monotonic() + self.timeout)
        req = header.get("req", 0)
        if req:
            self._pending.add(req)
        return req

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

    def _pump(self, timeout: float, waiting: int | None) -> bool:
        """Read what the bus sent within `timeout` into the mailboxes; False if nothing came."""
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._lock:  # short polls: the heartbeat thread takes the lock between them
                if self.sock.poll(max(0.0, min(0.05, deadline - time.monotonic())) * 1000):
                    heard = self.core.receive(self.sock.recv_multipart())
                    if heard is not None:
                        self._file(heard, waiting)
                    return True
            if time.monotonic() >= deadline:
                return False

    def _file(self, heard: Any, waiting: int | None) -> None:
        if heard.restarted:
            # A new bus process: every request we have outstanding died with the old one.
            for req in sorted(self._pending):
                self._mail.setdefault(req, deque()).append(self.core.lost(req))
        h = heard.header
        if heard.kind == "welcome":
            self._mail.setdefault(None, deque()).append(h)
        if heard.kind != "reply":
            return
        key = h.get("req") if isinstance(h.get("req"), int) else None
        if key is None and h["type"] == P.ERROR and waiting is not None and h.get("code") != P.E_UNKNOWN_SESSION:
            key = waiting  # an error without a req answers whatever we sent last (a malformed request)
        self._mail.setdefault(key, deque()).append(h)

    def next(self, req: int | None, timeout: float | None = None) -> dict[str, Any]:
        """The next message answering `req` (messages for other requests are kept for later)."""
        wait = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while True:
            box = self._mail.get(req)
            if box:
                h = box.popleft()
                if req is not None and h["type"] != P.TOKEN:
                    self._pending.discard(req)  # a request ends with its first answer that is not a token
                return h
            if not self._pump(deadline - time.monotonic(), req) and time.monotonic() >= deadline:
                raise BusTimeout(f"no answer from the bus at {self.addr} within {wait:.0f}s{NO_ANSWER_HINT}")

    def call(self, header: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
        req = self.send(header)
        reply = self.next(req, timeout)
        if reply["type"] == P.ERROR:
            raise BusError(reply["code"], reply["msg"])
        return reply

    # --- requests -----------------------------------------------------------------------------
    def hello(self, timeout: float | None = None) -> dict[str, Any]:
        """The bus's welcome. The hello is sent again, backing off, while nothing answers."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        backoff = Backoff.from_config(self.cfg)
        while True:
            self._send_frames(self.core.hello(), deadline)
            resend = min(deadline, time.monotonic() + backoff.next())
            while time.monotonic() < resend:
                self._pump(resend - time.monotonic(), None)
                for h in self._mail.pop(None, ()):
                    if h["type"] == P.ERROR:
                        # The bus answered, and said no (a stage key used by a client, say): say
                        # that, not that nothing answered.
                        raise BusError(h["code"], h["msg"])
                    if h["type"] == P.WELCOME:
                        return h
            if time.monotonic() >= deadline:
                raise BusTimeout(f"no answer from the bus at {self.addr}{NO_ANSWER_HINT}")

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
                       stop_ids: list[int] | None = None, stream: bool = True, progress: bool = False) -> int:
        h: dict[str, Any] = {"type": P.GENERATE, "stream": stream, **({"progress": True} if progress else {})}
        for k, v in (("ids", ids), ("text", text), ("messages", messages), ("sid", sid), ("params", params),
                     ("max_tokens", max_tokens), ("stop_ids", stop_ids)):
            if v is not None:
                h[k] = list(v) if k in ("ids", "stop_ids") else v
        return self.send(h)

    def events(self, req: int, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """`token` (and, if asked for, `progress`) messages of request `req`, then its `done` (an
        `error` raises BusError)."""
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
        """Poll `status` until the pipeline is ready; returns the last status. While the bus does
        not answer at all, the polls back off ([reconnect])."""
        deadline = time.monotonic() + timeout
        backoff = Backoff.from_config(self.cfg)
        st: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise DairError("a cluster process exited before the pipeline was ready")
            try:
                st = self.status(timeout=min(1.0, max(0.05, deadline - time.monotonic())))
            except BusTimeout:
                time.sleep(min(backoff.next(), max(0.0, deadline - time.monotonic())))
                continue
            backoff.reset()
            if st["ready"]:
                return st
            time.sleep(0.1)
        raise DairError(f"pipeline not ready after {timeout:.0f}s: " + "; ".join(st.get("problems", [])))


class StatsSubscriber:
    """The bus's stats as published on its PUB socket (protocol.stats_address)."""

    def __init__(self, stats_addr: str, keys: security.PeerKeys | None = None,
                 cfg: dict[str, Any] | None = None) -> None:
        self.sock = open_subscriber(zmq.Context.instance(), stats_addr, keys, cfg)

    def recv(self, timeout: float = 5.0) -> dict[str, Any] | None:
        """The next valid stats message (its `nodes` as bus/stats.py describes), None if none
        came within `timeout`."""
        deadline = time.monotonic() + timeout
        while self.sock.poll(max(0.0, deadline - time.monotonic()) * 1000):
            st = decode_stats(self.sock.recv_multipart())
            if st is not None:
                return st
        return None

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
        # (prompt tokens prefilled, of those to prefill) as each prefill step leaves the pipeline
        self.on_prefill: Callable[[int, int], None] | None = None

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
        run = Resume(prompt_ids, max_tokens, self.resume_timeout)

        def note(tok: int, piece: str) -> bool | None:
            run.token(tok, piece)
            return on_token(tok, piece) if on_token is not None else None

        while True:
            ids, left = run.attempt()
            try:
                r = self._generate(ids, params, left, stop_ids, note)
            except BusError as e:
                if not run.may_retry(e):
                    raise
                self._sid = None  # that session died with the old bus
                self.client.wait_ready(run.wait_left())
                continue
            r["ids"] = run.ids(r["ids"])
            if run.resumed_at is not None:
                r["resumed_at"] = run.resumed_at
                r["text"] = run.text(r.get("text", ""))
            return r

    def _generate(self, prompt_ids: list[int], params: Any, max_tokens: int, stop_ids: set[int],
                  on_token: Callable[[int, str], bool | None] | None) -> dict[str, Any]:
        p = params.to_dict() if hasattr(params, "to_dict") else dict(params)
        if self._sid is None:
            self._sid = self.client.open_session(p)
        req = self.client.start_generate(ids=list(prompt_ids), sid=self._sid, params=p, max_tokens=max_tokens,
                                         stop_ids=sorted(stop_ids), progress=self.on_prefill is not None)
        cancelled = False
        for ev in self.client.events(req):
            if ev["type"] == P.PROGRESS:
                if self.on_prefill is not None:
                    self.on_prefill(ev["done"], ev["total"])
            elif ev["type"] == P.TOKEN and on_token is not None and not cancelled:
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


def local_model(model_info: dict[str, Any], explicit: str | None = None) -> Any:
    """A local file with the bus's fingerprint (every node has the model file), opened:
    `explicit` (--model), else the bus's own path, else the default model."""
    from dair.model import open_model
    from dair.model.fetch import default_model_path

    candidates = [explicit, model_info.get("path")]
    try:
        candidates.append(str(default_model_path()))
    except DairError:
        pass
    for path in candidates:
        if path and os.path.exists(path):
            mf = open_model(path)
            if mf.fingerprint == model_info.get("fingerprint"):
                return mf
            mf.close()
            if path == explicit:
                raise DairError(f"{path}: not the bus's model {model_info.get('name')} (fingerprints differ)")
    raise DairError(f"no local copy of the bus's model {model_info.get('name')} (give --model PATH of the same file)")


def local_tokenizer(model_info: dict[str, Any], explicit: str | None = None) -> Any:
    """The tokenizer of local_model(model_info, explicit)."""
    from dair.tokenizer import load_tokenizer

    return load_tokenizer(local_model(model_info, explicit))
