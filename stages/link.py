"""A stage's link to the bus: one DEALER, registration, heartbeats both ways, reconnection.

The main thread receives, validates and computes (no thread hand-off on the critical path of a
token); a heartbeat thread sends heartbeats through the same socket, under a lock, so they keep
flowing while a long prefill runs (the kernels release the GIL). The socket is never used by
two threads at once. A beat that finds the lock taken is sent by the main thread the next time
it holds the lock (`_beat_due`): Python locks are not fair, and a main thread polling in a
tight loop would otherwise starve the heartbeat thread on a loaded machine.
"""
from __future__ import annotations

import gc
import os
import socket
import sys
import threading
import time
from typing import Any

import psutil
import zmq

from dair import security
from dair.bus import protocol as P
from dair.bus import states
from dair.bus.backoff import Backoff, zmq_reconnect_options
from dair.config import BusConfig, ReconnectConfig, StageConfig
from dair.model.digests import FileDigests
from dair.ops.threads import park, pool_choice, wake
from dair.stages.compute import Compute

ZERO_COPY_MIN = 1 << 16
# Heartbeats that carry a newly assigned range's digests: the bus admits the range on the first
# that arrives; the rest cover one lost to a full queue.
DIGEST_BEATS = 3


class StageRefused(Exception):
    """The bus refused this stage (fatal error reply)."""

    def __init__(self, msg: str, code: str = "") -> None:
        super().__init__(msg)
        self.code = code


class Link:
    """`bus` and `stage` are config.toml's [bus] and [stage] (flags applied); `reconnect` its
    [reconnect]: how the stage backs off while the bus is gone."""

    def __init__(self, bus_addr: str, name: str, model: Any, first: int, last: int, bus: BusConfig,
                 stage: StageConfig, reconnect: ReconnectConfig, keys: security.PeerKeys | None = None,
                 place: bool = False, speed: float = 1.0) -> None:
        self.bus_addr = bus_addr
        self.keys = keys
        # Started without --layers: the bus places it by its budget and speed.
        self.place = place
        self.speed = speed
        self.name = name
        self.model = model
        # Until the bus's ASSIGN states its own, config.toml's heartbeat settings.
        self.heartbeat_s = bus.heartbeat_s
        self._compute_s_seen = 0.0
        self.liveness = bus.heartbeat_liveness
        self.max_frame_bytes = bus.max_frame_bytes
        self.max_batch = stage.max_batch
        self.max_queued_acts = stage.max_queued_acts
        self.lz4_min_bytes = stage.lz4_min_bytes
        self.reconnect = reconnect
        self.backoff = Backoff.from_config(reconnect)
        self.ctx = zmq.Context.instance()
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self.node = ""
        self.msgs_in = self.msgs_out = self.bytes_in = self.bytes_out = 0
        self._conn = 0
        self.compute = Compute(model, first, last, stage, bus.max_context)
        if first < 0:
            self.compute.state = states.STANDBY
        self.dealer: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._lost = False
        self._monitor: zmq.Socket | None = None
        self._dropped = False
        self._beat_due = threading.Event()
        # Given by the bus in ASSIGN over our connection: presented when we register again on a
        # new one, it proves we are the stage that held our range (see Membership.previous_connection).
        self.resume = ""
        # The bus admits a range only if these match its own file's bytes (model/digests.py).
        self.digests = FileDigests(model, progress="dair-stage")
        self._range_digests: tuple[int, int, dict[str, str]] | None = None
        self._digest_beats = 0

    def range_digests(self, first: int, last: int) -> dict[str, str]:
        """Digests of the tensors layers first..last use ({} for a standby), hashed once."""
        if first < 0:
            return {}
        if self._range_digests is None or self._range_digests[:2] != (first, last):
            self._range_digests = (first, last, self.digests.for_range(first, last))
        return self._range_digests[2]

    # --- socket (callers hold self._lock) ------------------------------------------------------
    def _connect(self) -> None:
        self._close_monitor()
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self._conn += 1
        self._dropped = False
        d = self.ctx.socket(zmq.DEALER)
        # A fresh identity per connection: the bus must not confuse us with our previous socket.
        d.setsockopt(zmq.IDENTITY, f"{self.name}.{os.getpid()}.{self._conn}".encode())
        d.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        # Messages waiting for the compute thread: beyond this the bus's queue for us fills and
        # the bus answers `busy` (max_queued_msgs) instead of our memory growing.
        d.setsockopt(zmq.RCVHWM, self.max_queued_acts)
        d.setsockopt(zmq.LINGER, 0)
        for opt, value in zmq_reconnect_options(self.reconnect).items():
            d.setsockopt(opt, value)
        security.apply_client_keys(d, self.keys)  # before connect: CURVE applies to later connects only
        try:
            # A dropped connection loses the messages in flight, and ZeroMQ's silent reconnect
            # would leave the bus waiting for them forever: register anew instead (see _receive).
            self._monitor = d.get_monitor_socket(zmq.EVENT_DISCONNECTED,
                                                 addr=f"inproc://dair-stage-{id(self)}-{self._conn}")
        except zmq.ZMQError:
            self._monitor = None  # heartbeats still notice a lost bus, only later
        d.connect(self.bus_addr)
        self.dealer = d
        # One poll for both sockets: a decode step's hop pays for a single zmq_poll.
        self._poller = zmq.Poller()
        self._poller.register(d, zmq.POLLIN)
        if self._monitor is not None:
            self._poller.register(self._monitor, zmq.POLLIN)
        self._send({"type": P.REGISTER, "name": self.name, "first": self.compute.first,
                    "last": self.compute.last, "n_layers": self.model.config.n_layers,
                    "fingerprint": self.model.fingerprint, "host": socket.gethostname(),
                    "pid": os.getpid(), "rss": self.proc.memory_info().rss,
                    "threads": self.compute.threads, "wire": self.compute.wire,
                    "state": self.compute.state, "max_ram": int(self.compute.max_ram or 0),
                    "kv_type": self.compute.kv_type,
                    **({"resume": self.resume} if self.resume else {}),
                    "digests": self.range_digests(self.compute.first, self.compute.last),
                    **({"place": True, "speed": float(self.speed)} if self.place
                       else {"standby": True} if self.compute.first < 0 else {})})

    def _send(self, header: dict[str, Any], buffers: list[Any] = ()) -> None:
        self._send_frames(P.encode(header, buffers, self.lz4_min_bytes))

    def _send_frames(self, frames: list[Any]) -> None:
        assert self.dealer is not None
        self.msgs_out += 1
        size = sum(len(f.buffer) if hasattr(f, "buffer") else memoryview(f).nbytes for f in frames)
        self.bytes_out += size
        try:
            # Zero-copy pays off only for big buffers (pyzmq tracks each one); a decode step is small.
            self.dealer.send_multipart(frames, copy=size < ZERO_COPY_MIN, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.compute.count("send_dropped")

    def stats(self) -> dict[str, Any]:
        c = self.compute
        eng = c.engine
        return {"rss": self.proc.memory_info().rss, "cpu": self.proc.cpu_percent(None),
                "sessions": len(c.sessions), "bad_frames": sum(v for k, v in c.counters.items()
                                                               if k not in ("send_dropped", P.E_ENGINE,
                                                                             "sessions_expired")),
                "counters": dict(c.counters), "msgs_in": self.msgs_in, "msgs_out": self.msgs_out,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "batches": c.batches,
                "batched_segments": c.batched_segments, "max_batch": c.max_batch_seen,
                "compute_s": round(c.compute_s, 4), "first": c.first, "last": c.last,
                "resident_bytes": int(eng.resident_bytes()) if eng is not None else 0,
                "pool": pool_choice(), **_residency_stats(eng), **_kv_stats(eng)}

    def _shown_state(self) -> str:
        """What the dashboard shows: a ready stage is "busy" if it computed since the last
        heartbeat, "streaming" if its range streams from disk (the bus counts both as live)."""
        c = self.compute
        busy = c.compute_s > self._compute_s_seen
        self._compute_s_seen = c.compute_s
        if c.state != states.READY:
            return c.state
        if busy:
            return states.BUSY
        return states.STREAMING if _residency_stats(c.engine).get("mode") == "streaming" else states.READY

    def _heartbeat(self) -> None:
        with self._lock:
            self._beat_locked()

    def _beat_locked(self) -> None:
        """Send a heartbeat (the caller holds self._lock)."""
        self._beat_due.clear()
        header = {"type": P.HEARTBEAT, "t": time.time(), "state": self._shown_state(), "stats": self.stats()}
        c, rd = self.compute, self._range_digests
        if self._digest_beats > 0 and c.state == states.READY and rd is not None and rd[:2] == (c.first, c.last):
            # A range the bus assigned after registration: it serves it only once these match.
            self._digest_beats -= 1
            header["digests"] = rd[2]
        self._send(header)

    def _heartbeats(self) -> None:
        while not self._stopping.wait(self.heartbeat_s):
            self._beat_due.set()
            # Whoever holds the lock first sends it: this thread, or the main thread between its
            # polls (see _receive).
            if self._lock.acquire(timeout=self.heartbeat_s / 2):
                try:
                    if self._beat_due.is_set() and self.dealer is not None:
                        self._beat_locked()
                except zmq.ZMQError:
                    pass  # the socket is being replaced or closed
                finally:
                    self._lock.release()

    # --- loop -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> int:
        self.range_digests(self.compute.first, self.compute.last)  # hashed (or cached) before connecting
        with self._lock:
            self._connect()  # registers first, so that its RSS is the process without its weights
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        if not self.compute.build():
            print(f"dair-stage: error: {self.compute.fatal}", file=sys.stderr)
            return 2
        self._heartbeat()  # "ready" at once
        # The engine and the model's metadata live as long as the stage: kept out of the cyclic
        # collector's walks, whose pauses would otherwise land on the token path.
        gc.freeze()
        last_heard = time.monotonic()
        # Silence that makes us reconnect: a heartbeat timeout at first, then the backoff's
        # delay for each further attempt while the bus stays away (Paranoid Pirate).
        patience = self.heartbeat_s * self.liveness
        overlap_since: float | None = None
        try:
            while not self._stopping.is_set():
                try:
                    batch = self._receive()
                except StageRefused as e:
                    now = time.monotonic()
                    overlap_since = overlap_since if overlap_since is not None else now
                    if not self._own_range_maybe(e, now - overlap_since):
                        raise
                    # Our earlier connection (closed while its register went unanswered) may still
                    # hold the range at the bus until its close is seen or its heartbeats expire:
                    # register again after the back-off rather than exit.
                    delay = self.backoff.next()
                    print(f"dair-stage: the bus says {e}; that may be this stage's own earlier connection: "
                          f"registering again in {delay:.2f}s", file=sys.stderr, flush=True)
                    if self._stopping.wait(delay):
                        break
                    with self._lock:
                        self._connect()
                    last_heard = time.monotonic()
                    continue
                now = time.monotonic()
                if self._dropped:
                    print("dair-stage: the connection to the bus dropped; registering again", file=sys.stderr,
                          flush=True)
                    with self._lock:
                        self._connect()
                    last_heard = now
                    continue
                if batch is None:
                    if now - last_heard > patience:
                        patience = self.backoff.next()
                        self._reconnect(patience)
                        last_heard = now
                    continue
                last_heard = now
                if batch and self.node:  # assigned: an overlap from now on is news
                    overlap_since = None
                if self.backoff.attempts:
                    self.backoff.reset()
                patience = self.heartbeat_s * self.liveness
                if batch:
                    # Again, now that the batch is decoded: a worker woken on arrival spins only so
                    # long (DAIR_SPIN_US), and a slow decode must not leave it asleep for the first job.
                    wake()
                    was = self.compute.state
                    self.compute.process(batch)
                    if self.compute.state != was:
                        # A standby that has just loaded its assigned range: the bus resumes the
                        # paused sessions on this word, so do not make it wait for the next beat.
                        self._heartbeat()
                if self.compute.outbox:
                    with self._lock:
                        if not self.dealer.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                            # Nothing queued: parked before the answer goes out, so that no kernel
                            # thread spins on a core the bus and the next stage are about to need.
                            park()
                        for frames in self.compute.outbox:
                            self._send_frames(frames)
                    self.compute.outbox.clear()
                if self.compute.fatal:
                    print(f"dair-stage: error: {self.compute.fatal}", file=sys.stderr)
                    return 2
        except StageRefused as e:
            print(f"dair-stage: error: refused by the bus: {e}", file=sys.stderr)
            return 2
        finally:
            self._stopping.set()
            with self._lock:
                self._close_monitor()
                if self.dealer is not None:
                    self.dealer.close(linger=0)
                    self.dealer = None
        return 0

    def _own_range_maybe(self, e: StageRefused, waited: float) -> bool:
        """Whether a refusal may be of this stage's own earlier connection: an overlap refused after
        a reconnect, for no longer than the bus takes to expire a silent stage (its liveness
        period, twice over). A stage that asks for another's layers still exits, only later."""
        return (e.code == P.E_OVERLAP and self._conn > 1
                and waited <= 2 * self.heartbeat_s * self.liveness + self.backoff.max_s)

    def _close_monitor(self) -> None:
        if self._monitor is not None and self.dealer is not None:
            try:
                self.dealer.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitor.close(linger=0)
        self._monitor = None

    def _reconnect(self, patience: float) -> None:
        # Paranoid Pirate: the bus is gone or restarted; start over with a new socket, and give
        # it `patience` seconds to answer before the next attempt.
        b = self.backoff
        attempt = b.attempts
        capped = b.ceiling(attempt - 1) >= b.max_s
        if not capped or b.ceiling(attempt - 2) < b.max_s:  # every attempt until the delay is capped
            print(f"dair-stage: no word from the bus at {self.bus_addr}; reconnecting (attempt {attempt}, "
                  f"next in {patience:.2f}s{', the longest wait' if capped else ''})", file=sys.stderr, flush=True)
        if not self._lost and self.keys is not None:
            # A refused CURVE peer hears nothing at all: say what to check.
            print(f"dair-stage: no answer: if the bus uses keys, check that this stage's public key "
                  f"{self.keys.public.decode()} is in its stage_keys, and --server-key is the bus's",
                  file=sys.stderr, flush=True)
        self._lost = True
        with self._lock:
            self._connect()

    def _receive(self) -> list[tuple[dict[str, Any], list[Any]]] | None:
        """Everything waiting from the bus, validated (None: nothing came within a short wait)."""
        raw: list[list[Any]] = []
        with self._lock:
            assert self.dealer is not None
            if self._beat_due.is_set():
                self._beat_locked()
            # Short polls: the heartbeat thread takes the lock between them.
            ready = dict(self._poller.poll(20))
            if self._monitor is not None and self._monitor in ready:
                while self._monitor.poll(0):
                    if P.monitor_event(self._monitor)[0] == zmq.EVENT_DISCONNECTED:
                        self._dropped = True
            if self.dealer not in ready:
                return None
            # Work (most likely) has come: the kernel threads wake while it is decoded, so that
            # the first matmul does not wait for the scheduler to bring them in.
            wake()
            d = self.dealer
            try:
                # EVENTS says whether another message is queued, without a zmq.Again raised to
                # end every drain.
                while True:
                    # Copied: a decode step's frames are a few hundred bytes, where bytes objects
                    # cost less than zmq.Frames (a prefill chunk's copy is small beside its compute).
                    raw.append(d.recv_multipart(flags=zmq.NOBLOCK))
                    if len(raw) >= 4 * self.max_batch or not d.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        break
            except zmq.Again:
                pass
        self._lost = False
        batch = []
        for frames in raw:
            item = self._on_bus(frames)
            if item is not None:
                batch.append(item)
        return batch

    def _on_bus(self, frames: list[Any]) -> tuple[dict[str, Any], list[Any]] | None:
        self.msgs_in += 1
        self.bytes_in += sum(map(len, frames))
        try:
            header, buffers = P.decode(frames, self.max_frame_bytes)
            t = header["type"]
            if t not in P.BUS_TO_STAGE:
                raise P.ProtocolError(P.E_UNKNOWN_TYPE, f"a stage does not take {t!r} messages")
            if t == P.ACT and header["layer"] >= self.model.config.n_layers:
                raise P.ProtocolError(P.E_LAYER, f"layer {header['layer']} beyond the model's "
                                      f"{self.model.config.n_layers} layers")
        except P.ProtocolError as e:
            self.compute.count(e.code)
            self.compute.outbox.append(P.encode(P.error(e.code, e.msg)))
            return None
        if t == P.HEARTBEAT:
            # Passed on in order with open/close: the sessions the bus held when it sent this.
            return (header, buffers) if isinstance(header.get("sids"), list) else None
        if t == P.ERROR:
            if header.get("fatal"):
                raise StageRefused(header["msg"], header["code"])
            print(f"dair-stage: bus says: {header['code']}: {header['msg']}", file=sys.stderr)
            return None
        if t == P.ASSIGN:
            self.node = header["node"]
            if isinstance(header.get("resume"), str):
                self.resume = header["resume"]
            self.heartbeat_s = header["heartbeat_ms"] / 1000.0
            self.liveness = header["liveness"]
            standby = header["first"] == header["last"] == -1
            if not standby and not 0 <= header["first"] <= header["last"] < self.model.config.n_layers:
                self.compute.count(P.E_LAYER)
                self.compute.outbox.append(P.encode(P.error(
                    P.E_LAYER, f"assign {header['first']}-{header['last']} is outside the model")))
                return None
            if not standby and (header["first"], header["last"]) != (self.compute.first, self.compute.last):
                # Hashed before the range loads, so the heartbeat that says "ready" can carry them.
                self.range_digests(header["first"], header["last"])
                self._digest_beats = DIGEST_BEATS
        return header, buffers


def _kv_stats(eng: Any) -> dict[str, Any]:
    """The KV cache: its type, bytes held now and per token, the context limit."""
    if eng is None or not hasattr(eng, "kv_stats"):
        return {}
    return eng.kv_stats()


def _residency_stats(eng: Any) -> dict[str, Any]:
    """The engine's residency figures: resident or streaming, budget, disk traffic."""
    if eng is None or not hasattr(eng, "stats"):
        return {}
    st = eng.stats()
    return {k: st[k] for k in ("mode", "max_ram", "range_bytes", "disk_read_bytes", "disk_read_mb_s",
                               "storage_read_bytes", "disk_wait_fraction", "disk_bytes_per_token",
                               "moe_layers", "experts_per_layer", "experts_per_token") if k in st}
