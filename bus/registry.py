"""The bus's registry of stages: who owns which layers, who is alive, and whether they tile 0..L-1."""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Node states as the TUI shows them.
LOADING = "loading"
READY = "ready"
BUSY = "busy"
STREAMING = "streaming"
DEAD = "dead"
# Registered without layers (dair-stage --standby): waits for the bus to assign a dead stage's range.
STANDBY = "standby"
LIVE_STATES = (READY, BUSY, STREAMING)
# How far back a stage's long silences count towards its timeout (Node.silence_limit).
GAP_WINDOW_S = 120.0


class Samples:
    """The last few hundred measurements of one quantity, for p50/p95."""

    def __init__(self, size: int = 512) -> None:
        self._v: deque[float] = deque(maxlen=size)

    def add(self, value: float) -> None:
        self._v.append(value)

    def pct(self, q: float) -> float | None:
        return float(np.percentile(np.fromiter(self._v, float), q)) if self._v else None

    def __len__(self) -> int:
        return len(self._v)


@dataclass
class Node:
    ident: bytes
    node: str
    name: str
    host: str
    pid: int
    first: int
    last: int
    threads: int
    wire: str
    state: str
    rss: int = 0
    max_ram: int = 0  # the stage's RAM budget for weights (0 = unlimited)
    rss_at_register: int = 0  # before the stage touched its weights: the process's own overhead
    cpu: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)
    msgs_in: int = 0
    msgs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    hop_s: Samples = field(default_factory=Samples)
    compute_s: Samples = field(default_factory=Samples)
    stage_stats: dict[str, Any] = field(default_factory=dict)
    user: str = ""  # the CURVE key it joined with (role:name), "" without keys
    # Placed by the bus (registered without --layers): its announced budget and speed.
    place: bool = False
    speed: float = 1.0
    fd: int = -1  # the bus-side socket of its connection (ZMQ_SRCFD), to match disconnect events
    dropped_at: float = 0.0  # monotonic time its connection closed (0: connected)
    # Given to the stage (in ASSIGN) over this connection only: a registration from a new
    # connection that presents it is the same stage process, which lost its connection to us.
    resume: str = ""
    # Messages and entries refused from this peer (work it was never given, or too much of it),
    # stale results (steps superseded by a cancel or a failover), and messages dropped unread
    # because it exceeded its budget of refusals (see trust.RefusalBudget).
    refused: int = 0
    stale: int = 0
    rate_limited: int = 0
    # Long silences between its messages (monotonic time, gap) of the last GAP_WINDOW_S: the
    # silence that declares it dead grows with them (a loaded machine is slow, not dead).
    long_gaps: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=32))

    def heard(self, now: float, long_gap: float) -> None:
        """A message from it arrived (any traffic counts as life)."""
        gap = now - self.last_seen
        if gap > long_gap:
            self.long_gaps.append((now, gap))
        self.last_seen = now

    def silence_limit(self, now: float, base: float) -> float:
        """How long it may be silent before it is declared dead: `base`, or three times the
        longest gap it has shown lately, at most 4 x base (a hung stage is still found)."""
        while self.long_gaps and now - self.long_gaps[0][0] > GAP_WINDOW_S:
            self.long_gaps.popleft()
        longest = max((g for _, g in self.long_gaps), default=0.0)
        return min(4.0 * base, max(base, 3.0 * longest))

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES

    def to_stats(self, now: float) -> dict[str, Any]:
        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000.0, 3)

        return {
            "node": self.node, "name": self.name, "host": self.host, "pid": self.pid,
            "first": self.first, "last": self.last, "state": self.state, "rss": self.rss,
            "rss_at_register": self.rss_at_register,
            # The engine's budget once it runs (the heartbeat), else the one announced at register.
            "max_ram": int(self.stage_stats.get("max_ram") or self.max_ram or 0),
            "cpu": self.cpu, "threads": self.threads, "wire": self.wire,
            "msgs_in": self.msgs_in, "msgs_out": self.msgs_out,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "hop_ms_p50": ms(self.hop_s.pct(50)), "hop_ms_p95": ms(self.hop_s.pct(95)),
            "compute_ms_p50": ms(self.compute_s.pct(50)),
            "heartbeat_age_s": round(now - self.last_seen, 3),
            "bad_frames": int(self.stage_stats.get("bad_frames", 0)),
            "sessions": int(self.stage_stats.get("sessions", 0)),
            "resident_bytes": int(self.stage_stats.get("resident_bytes", 0)),
            "batches": int(self.stage_stats.get("batches", 0)),
            "max_batch": int(self.stage_stats.get("max_batch", 0)),
            "key": self.user, "place": self.place, "speed": self.speed,
            "refused": self.refused, "stale": self.stale, "rate_limited": self.rate_limited,
            # Residency of the range's weights (resident, or streamed from disk), as the stage's engine reports it.
            "mode": str(self.stage_stats.get("mode", "")),
            "range_bytes": int(self.stage_stats.get("range_bytes", 0) or 0),
            "disk_read_bytes": int(self.stage_stats.get("disk_read_bytes", 0) or 0),
            "disk_read_mb_s": float(self.stage_stats.get("disk_read_mb_s", 0.0) or 0.0),
            "storage_read_bytes": int(self.stage_stats.get("storage_read_bytes", 0) or 0),
            "disk_wait_fraction": float(self.stage_stats.get("disk_wait_fraction", 0.0) or 0.0),
            "disk_bytes_per_token": float(self.stage_stats.get("disk_bytes_per_token", 0.0) or 0.0),
            # Mixture-of-experts ranges: experts computed per token over the range's MoE layers.
            "moe_layers": int(self.stage_stats.get("moe_layers", 0) or 0),
            "experts_per_layer": int(self.stage_stats.get("experts_per_layer", 0) or 0),
            "experts_per_token": float(self.stage_stats.get("experts_per_token", 0.0) or 0.0),
            # The KV cache (type, bytes held), as the stage's engine reports it.
            "kv_type": str(self.stage_stats.get("kv_type", "")),
            "kv_bytes": int(self.stage_stats.get("kv_bytes", 0) or 0),
            "kv_bytes_per_token": int(self.stage_stats.get("kv_bytes_per_token", 0) or 0),
            "max_context": int(self.stage_stats.get("max_context", 0) or 0),
        }


def _spans(layers: list[int]) -> list[tuple[int, int]]:
    """[3,4,5,9] -> [(3,5),(9,9)]."""
    out: list[tuple[int, int]] = []
    for i in layers:
        if out and out[-1][1] == i - 1:
            out[-1] = (out[-1][0], i)
        else:
            out.append((i, i))
    return out


def fmt_span(a: int, b: int) -> str:
    return f"layer {a}" if a == b else f"layers {a}-{b}"


def coverage_problems(ranges: list[tuple[int, int]], n_layers: int) -> list[str]:
    """Gaps and overlaps of `ranges` against 0..n_layers-1, by layer number; [] when they tile it."""
    count = [0] * n_layers
    problems = []
    for a, b in ranges:
        if a < 0 or b >= n_layers or a > b:
            problems.append(f"range {a}-{b} outside the model's layers 0-{n_layers - 1}")
            continue
        for i in range(a, b + 1):
            count[i] += 1
    problems += [f"{fmt_span(a, b)} not covered" for a, b in _spans([i for i, c in enumerate(count) if c == 0])]
    problems += [f"{fmt_span(a, b)} owned by more than one stage"
                 for a, b in _spans([i for i, c in enumerate(count) if c > 1])]
    return problems


class Registry:
    def __init__(self, n_layers: int) -> None:
        self.n_layers = n_layers
        self.nodes: dict[bytes, Node] = {}
        self._seq = 0

    def new_name(self) -> str:
        self._seq += 1
        return f"n{self._seq}"

    def add(self, node: Node) -> None:
        self.nodes[node.ident] = node

    def get(self, ident: bytes) -> Node | None:
        return self.nodes.get(ident)

    def remove(self, ident: bytes) -> None:
        self.nodes.pop(ident, None)

    def live(self) -> list[Node]:
        """Connected stages that hold (or are loading) a range: the ones that keep sessions."""
        return [n for n in self.nodes.values() if n.state != DEAD and n.first >= 0]

    def standbys(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.state == STANDBY and n.first < 0]

    def conflicts(self, first: int, last: int, ignore: bytes | None = None) -> list[Node]:
        return [n for n in self.live() if n.ident != ignore and not (last < n.first or first > n.last)]

    def owner(self, layer: int) -> Node | None:
        for n in self.nodes.values():
            if n.live and n.first <= layer <= n.last:
                return n
        return None

    def problems(self) -> list[str]:
        serving = [n for n in self.nodes.values() if n.live]
        problems = coverage_problems([(n.first, n.last) for n in serving], self.n_layers)
        problems += [f"{n.name} ({fmt_span(n.first, n.last)}) is {n.state}"
                     for n in self.nodes.values() if not n.live and n.first >= 0]
        return problems

    def ready(self) -> bool:
        serving = [n for n in self.nodes.values() if n.live]
        return not coverage_problems([(n.first, n.last) for n in serving], self.n_layers)

    def held_by(self, ident: bytes, sessions: Any) -> int:
        """Steps in flight that the bus last sent to the peer `ident` (over `sessions`)."""
        return sum(1 for s in sessions for holder in s.qs.values() if holder == ident)

    def expire(self, now: float, timeout_s: float, caught_up: float | None = None) -> list[Node]:
        """Mark silent nodes dead; return the ones that just died.

        Silence is measured up to `caught_up`, the last time the bus had read every message
        waiting for it: a message still queued in the bus's socket is not silence. A bus that
        never catches up still declares a node dead after 4 x its limit."""
        seen_upto = now if caught_up is None else min(now, caught_up)
        died = []
        for n in self.nodes.values():
            if n.state == DEAD:
                continue
            limit = n.silence_limit(now, timeout_s)
            if seen_upto - n.last_seen > limit or now - n.last_seen > 4.0 * limit:
                n.state = DEAD
                died.append(n)
        return died
