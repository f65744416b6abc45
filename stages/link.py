"""A stage's link to the bus: one DEALER, registration, heartbeats both ways, reconnection.

This loop never computes, so heartbeats keep flowing while the compute thread runs a long
prefill (the kernels release the GIL). It validates every frame from the bus before handing it
to the compute thread, and forwards the compute thread's answers to the bus.
"""
from __future__ import annotations

import os
import socket
import sys
import time
from typing import Any

import psutil
import zmq

from dair.bus import protocol as P
from dair.stages.compute import STOP, Compute


class StageRefused(Exception):
    """The bus refused this stage (fatal error reply)."""


class Link:
    def __init__(self, bus_addr: str, name: str, model: Any, first: int, last: int, threads: int,
                 wire_dtype: str, heartbeat_ms: int, liveness: int, max_frame_bytes: int,
                 max_batch: int, lz4_min_bytes: int) -> None:
        self.bus_addr = bus_addr
        self.name = name
        self.model = model
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.liveness = liveness
        self.max_frame_bytes = max_frame_bytes
        self.lz4_min_bytes = lz4_min_bytes
        self.ctx = zmq.Context.instance()
        self.proc = psutil.Process()
        self.proc.cpu_percent(None)
        self.node = ""
        self.msgs_in = self.msgs_out = self.bytes_in = self.bytes_out = 0
        self._conn = 0
        self._inproc = f"inproc://stage-out-{id(self)}"
        self._pair = self.ctx.socket(zmq.PAIR)
        self._pair.bind(self._inproc)
        self.compute = Compute(self.ctx, self._inproc, model, first, last, threads, wire_dtype,
                               max_batch, lz4_min_bytes)
        self.dealer: zmq.Socket | None = None
        self._stopping = False
        self._lost = False

    # --- socket -----------------------------------------------------------------------------
    def _connect(self) -> None:
        if self.dealer is not None:
            self.dealer.close(linger=0)
        self._conn += 1
        d = self.ctx.socket(zmq.DEALER)
        # A fresh identity per connection: the bus must not confuse us with our previous socket.
        d.setsockopt(zmq.IDENTITY, f"{self.name}.{os.getpid()}.{self._conn}".encode())
        d.setsockopt(zmq.MAXMSGSIZE, self.max_frame_bytes)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(self.bus_addr)
        self.dealer = d
        self._send({"type": P.REGISTER, "name": self.name, "first": self.compute.first,
                    "last": self.compute.last, "n_layers": self.model.config.n_layers,
                    "fingerprint": self.model.fingerprint, "host": socket.gethostname(),
                    "pid": os.getpid(), "rss": self.proc.memory_info().rss,
                    "threads": self.compute.threads, "wire": self.compute.wire,
                    "state": self.compute.state})

    def _send(self, header: dict[str, Any], buffers: list[Any] = ()) -> None:
        assert self.dealer is not None
        frames = P.encode(header, buffers, self.lz4_min_bytes)
        self._send_frames(frames)

    def _send_frames(self, frames: list[Any]) -> None:
        assert self.dealer is not None
        self.msgs_out += 1
        self.bytes_out += sum(len(f.buffer) if hasattr(f, "buffer") else memoryview(f).nbytes for f in frames)
        try:
            self.dealer.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.compute.count("send_dropped")

    def stats(self) -> dict[str, Any]:
        c = self.compute
        eng = c.engine
        return {"rss": self.proc.memory_info().rss, "cpu": self.proc.cpu_percent(None),
                "sessions": len(c.sessions), "bad_frames": sum(v for k, v in c.counters.items()
                                                               if k not in ("send_dropped", P.E_ENGINE)),
                "counters": dict(c.counters), "msgs_in": self.msgs_in, "msgs_out": self.msgs_out,
                "bytes_in": self.bytes_in, "bytes_out": self.bytes_out, "batches": c.batches,
                "batched_segments": c.batched_segments, "max_batch": c.max_batch_seen,
                "compute_s": round(c.compute_s, 4), "first": c.first, "last": c.last,
                "resident_bytes": int(eng.resident_bytes()) if eng is not None else 0}

    def _heartbeat(self) -> None:
        self._send({"type": P.HEARTBEAT, "t": time.time(), "state": self.compute.state, "stats": self.stats()})

    # --- loop -------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stopping = True

    def run(self) -> int:
        self._connect()  # registers first, so that its RSS is the process without its weights
        self.compute.start()
        poller = zmq.Poller()
        poller.register(self.dealer, zmq.POLLIN)
        poller.register(self._pair, zmq.POLLIN)
        last_heard = time.monotonic()
        next_hb = time.monotonic()
        reported_state = self.compute.state
        try:
            while not self._stopping:
                if self.compute.fatal:
                    print(f"dair-stage: error: {self.compute.fatal}", file=sys.stderr)
                    return 2
                timeout = max(0.0, next_hb - time.monotonic())
                events = dict(poller.poll(min(timeout, 0.1) * 1000))
                now = time.monotonic()
                if events.get(self._pair):
                    # Drain: the compute thread's answers go out in the order they were made.
                    while True:
                        try:
                            frames = self._pair.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._send_frames(frames)
                if events.get(self.dealer):
                    while True:
                        try:
                            frames = self.dealer.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        last_heard = now
                        self._lost = False
                        self._on_bus(frames)
                if self.compute.state != reported_state or now >= next_hb:
                    reported_state = self.compute.state
                    self._heartbeat()
                    next_hb = now + self.heartbeat_s
                if now - last_heard > self.heartbeat_s * self.liveness:
                    # Paranoid Pirate: the bus is gone or restarted; start over with a new socket.
                    if not self._lost:
                        print(f"dair-stage: no word from the bus at {self.bus_addr}; reconnecting",
                              file=sys.stderr, flush=True)
                    self._lost = True
                    poller.unregister(self.dealer)
                    self._connect()
                    poller.register(self.dealer, zmq.POLLIN)
                    last_heard = now
        except StageRefused as e:
            print(f"dair-stage: error: refused by the bus: {e}", file=sys.stderr)
            return 2
        finally:
            self.compute.inbox.put((STOP, []))
            if self.dealer is not None:
                self.dealer.close(linger=0)
        return 0

    def _on_bus(self, frames: list[Any]) -> None:
        self.msgs_in += 1
        self.bytes_in += sum(len(f.buffer) for f in frames)
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
            self._send(P.error(e.code, e.msg))
            return
        if t == P.HEARTBEAT:
            return
        if t == P.ERROR:
            if header.get("fatal"):
                raise StageRefused(header["msg"])
            print(f"dair-stage: bus says: {header['code']}: {header['msg']}", file=sys.stderr)
            return
        if t == P.ASSIGN:
            self.node = header["node"]
            self.heartbeat_s = header["heartbeat_ms"] / 1000.0
            self.liveness = header["liveness"]
            if not 0 <= header["first"] <= header["last"] < self.model.config.n_layers:
                self.compute.count(P.E_LAYER)
                self._send(P.error(P.E_LAYER, f"assign {header['first']}-{header['last']} is outside the model"))
                return
        self.compute.inbox.put((header, buffers))
