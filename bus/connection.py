"""What every client of the bus shares, whichever face it shows (bus/client.py: blocking calls;
bus/aclient.py: asyncio): the sockets and their keys, the requests' numbers, what a message from
the bus means for the requests waiting on it, the bus's timing, and the resubmission of a
generation that a bus restart interrupted.

`ClientCore` holds no socket and never blocks: the faces read frames from their sockets and
hand them to `receive`, which decodes them with `protocol.decode` and keeps track of the bus
process (`boot`) answering; a new one means every outstanding request was lost with the old.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import zmq

from dair import security
from dair.bus import protocol as P
from dair.bus.backoff import zmq_reconnect_options
from dair.config import BusConfig, section
from dair.errors import DairError

NO_ANSWER_HINT = " (is `dair-bus` running? if it uses keys, pass --keys or --server-key and --secret-key)"

# Codes after which a generation can be sent again unchanged once the pipeline is whole: the
# request, its session or the connection was lost, not refused.
RESUMABLE = frozenset({P.E_BUS_RESTARTED, P.E_UNKNOWN_SESSION, P.E_DISCONNECTED})


class BusError(DairError):
    """An error reply from the bus (`code` is one of protocol.E_*)."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(f"bus: {msg}" if code != P.E_NOT_READY else f"bus: {msg} (is every stage up?)")
        self.code = code


class BusTimeout(DairError):
    pass


# --- sockets ------------------------------------------------------------------------------------
def open_dealer(ctx: zmq.Context, addr: str, keys: security.PeerKeys | None = None,
                identity: bytes | None = None, cfg: dict[str, Any] | None = None) -> zmq.Socket:
    """A DEALER connected to the bus (zmq.Context or zmq.asyncio.Context): CURVE keys set before
    connecting, no linger, ZeroMQ's reconnects paced by config.toml's [reconnect]."""
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    for opt, value in zmq_reconnect_options(cfg).items():
        sock.setsockopt(opt, value)
    security.apply_client_keys(sock, keys)
    sock.connect(addr)
    return sock


def open_subscriber(ctx: zmq.Context, stats_addr: str, keys: security.PeerKeys | None = None,
                    cfg: dict[str, Any] | None = None) -> zmq.Socket:
    """A SUB on the bus's stats (connect it to `protocol.stats_address`)."""
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    for opt, value in zmq_reconnect_options(cfg).items():
        sock.setsockopt(opt, value)
    security.apply_client_keys(sock, keys)
    sock.setsockopt(zmq.SUBSCRIBE, P.STATS_TOPIC)
    sock.connect(stats_addr)
    return sock


def decode_stats(frames: list[Any]) -> dict[str, Any] | None:
    """A published `stats` message ([topic, header]) decoded and validated by protocol.decode;
    None for anything else (a stray or garbled frame is skipped, the next one will do)."""
    if len(frames) != 2 or bytes(frames[0]) != P.STATS_TOPIC:
        return None
    try:
        h, _ = P.decode(frames[1:])
    except P.ProtocolError:
        return None
    return h if h["type"] == P.STATS else None


# --- the state of one connection ----------------------------------------------------------------
@dataclass
class Heard:
    """What a message from the bus is: "beat" (a heartbeat's answer), "welcome", or "reply" (an
    answer to a request). `restarted`: it came from a new bus process (see ClientCore.receive)."""

    kind: str
    header: dict[str, Any]
    restarted: bool = False


@dataclass
class ClientCore:
    """A connection's bookkeeping, without sockets: shared by the sync and asyncio clients."""

    addr: str
    name: str = "client"
    cfg: dict[str, Any] | None = None
    welcome: dict[str, Any] | None = None
    boot: str | None = None  # the bus process answering (welcome and heartbeat answers carry it)
    last_heard: float = 0.0  # monotonic time of the bus's last message (0: never)
    heartbeat_s: float = field(init=False)
    liveness: int = field(init=False)
    stats_s: float = field(init=False)
    _req: int = 0

    def __post_init__(self) -> None:
        bus = section(BusConfig, self.cfg)
        # Until a welcome states the bus's own settings, config.toml's.
        self.heartbeat_s, self.liveness, self.stats_s = bus.heartbeat_s, bus.heartbeat_liveness, bus.stats_s

    # --- timing -----------------------------------------------------------------------------------
    @property
    def dead_after_s(self) -> float:
        """Silence after which the bus counts as gone: its heartbeat interval x liveness."""
        return self.heartbeat_s * self.liveness

    @property
    def stale_after_s(self) -> float:
        """Silence after which a client drops its connection: the bus's death timeout, and never
        less than three stats intervals (a follower of the stats hears at least that often)."""
        return max(self.dead_after_s, 3 * self.stats_s)

    def silent(self, now: float | None = None) -> bool:
        """No word from the bus for a heartbeat timeout: it is down or unreachable."""
        return (time.monotonic() if now is None else now) - self.last_heard > self.dead_after_s

    def _adopt(self, welcome: dict[str, Any]) -> None:
        """The bus's own heartbeat settings, when it states them, beat config.toml's."""
        hb, live, stats = welcome.get("heartbeat_ms"), welcome.get("liveness"), welcome.get("stats_interval_ms")
        if isinstance(hb, int) and hb > 0:
            self.heartbeat_s = hb / 1000.0
        if isinstance(live, int) and live > 0:
            self.liveness = live
        if isinstance(stats, int) and stats > 0:
            self.stats_s = stats / 1000.0

    # --- outgoing ---------------------------------------------------------------------------------
    def next_req(self) -> int:
        self._req += 1
        return self._req

    def number(self, header: dict[str, Any]) -> dict[str, Any]:
        """The header with a fresh `req` if its type carries one and it has none."""
        if "req" not in header and "req" in P.SCHEMAS.get(header["type"], {}):
            return {**header, "req": self.next_req()}
        return header

    def hello(self) -> list[Any]:
        return P.encode({"type": P.HELLO, "name": self.name})

    def beat(self) -> list[Any]:
        return P.encode({"type": P.HEARTBEAT, "t": time.time()})

    def new_connection(self) -> None:
        """A fresh socket: whichever bus answers it holds only what is sent on it from now on."""
        self.boot = None
        self.welcome = None

    # --- incoming ---------------------------------------------------------------------------------
    def receive(self, frames: list[Any]) -> Heard | None:
        """Decode a message from the bus (None: not a valid message, skipped)."""
        try:
            h, _ = P.decode(frames)
        except P.ProtocolError:
            return None  # the bus never sends garbage; a stray frame must not stop a reader
        self.last_heard = time.monotonic()
        kind = h["type"]
        if kind not in (P.HEARTBEAT, P.WELCOME):
            return Heard("reply", h)
        boot = h.get("boot")
        restarted = isinstance(boot, str) and self.boot is not None and boot != self.boot
        if isinstance(boot, str):
            self.boot = boot
        if kind == P.WELCOME:
            self.welcome = h
            self._adopt(h)
            return Heard("welcome", h, restarted)
        return Heard("beat", h, restarted)

    def lost(self, req: int, code: str = P.E_BUS_RESTARTED) -> dict[str, Any]:
        """The error a client gives a request the bus will never answer."""
        why = ("restarted and lost this request and its session; send it again (in a new session)"
               if code == P.E_BUS_RESTARTED else "fell silent; the connection was dropped")
        return P.error(code, f"the bus at {self.addr} {why}", req=req)


# --- a generation resubmitted across restarts -----------------------------------------------------
class Resume:
    """One generation that may be sent again after a bus restart or a lost session: each attempt
    asks for the prompt plus the tokens received so far, and for that many fewer. Sampling depends
    only on (seed, position), so the tokens are those of an uninterrupted run, none twice."""

    def __init__(self, prompt: list[int], max_tokens: int, timeout_s: float) -> None:
        self.prompt = list(prompt)
        self.max_tokens = max_tokens
        self.got: list[int] = []
        self.pieces: list[str] = []
        self.before: list[int] = []
        self.text_before = ""
        self.deadline = time.monotonic() + timeout_s

    def attempt(self) -> tuple[list[int], int]:
        """(prompt ids, max tokens) of the next attempt."""
        self.before = list(self.got)
        self.text_before = "".join(self.pieces)
        return self.prompt + self.before, self.max_tokens - len(self.before)

    def token(self, tok: int, piece: str = "") -> None:
        self.got.append(int(tok))
        self.pieces.append(piece)

    def may_retry(self, e: BusError) -> bool:
        return e.code in RESUMABLE and time.monotonic() <= self.deadline

    def wait_left(self) -> float:
        return max(1.0, self.deadline - time.monotonic())

    def ids(self, done_ids: list[int]) -> list[int]:
        """Every token generated, from the ids of the last attempt's `done`."""
        return self.before + list(done_ids)

    def text(self, done_text: str) -> str:
        """The whole completion's text, from the `text` of the last attempt's `done` (the bus's
        pieces, joined: nothing is decoded again here)."""
        return self.text_before + done_text

    @property
    def resumed_at(self) -> int | None:
        """Tokens that came before the last attempt (None: it was the first)."""
        return len(self.before) if self.before else None
