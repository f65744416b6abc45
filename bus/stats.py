"""What the bus publishes about its cluster (the `stats` message on its PUB socket, and the
`cluster` answer to `status`), described once: the registry fills `NodeStats`, the TUI, `dair
status` and `dair serve` read it back with `NodeStats.from_wire`.

Field names are those of docs/protocol.md, "Stats". `from_wire` never raises: a field missing or
of the wrong type takes its default, so a bus of another version (or a garbled map) cannot take a
dashboard down.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, get_args, get_type_hints

from dair.bus import states


@dataclass
class NodeStats:
    """One stage as the bus sees it."""

    node: str = "?"
    name: str = "?"
    host: str = "?"
    pid: int = 0
    first: int = 0
    last: int = -1
    state: str = "?"  # a liveness or display state (bus/states.py)
    rss: int = 0
    rss_at_register: int = 0  # before the stage touched its weights: the process's own overhead
    max_ram: int = 0  # its RAM budget for weights (0 = unlimited)
    cpu: float | None = None  # percent of one core
    threads: int = 0
    # The kernel pool: threads configured, in use, share of chunks run in parallel, why it runs alone.
    pool_threads: int = 0
    pool_using: int = 0
    pool_parallel_share: float | None = None
    pool_why: str = ""  # "", "stalled" or "absent"
    wire: str = ""
    msgs_in: int = 0
    msgs_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    hop_ms_p50: float | None = None
    hop_ms_p95: float | None = None
    compute_ms_p50: float | None = None
    heartbeat_age_s: float | None = None
    bad_frames: int = 0
    sessions: int = 0
    resident_bytes: int = 0
    batches: int = 0
    max_batch: int = 0
    key: str = ""  # the CURVE key it joined with (role:name), "" without keys
    place: bool = False  # placed by the bus (started without --layers)
    speed: float = 1.0
    refused: int = 0
    stale: int = 0
    rate_limited: int = 0
    # Residency: "resident" or "streaming" (its range streams from disk under max_ram).
    mode: str = ""
    range_bytes: int = 0
    disk_read_bytes: int = 0
    disk_read_mb_s: float = 0.0
    storage_read_bytes: int = 0
    disk_wait_fraction: float = 0.0
    disk_bytes_per_token: float = 0.0
    # Mixture-of-experts ranges: experts computed per token over the range's MoE layers.
    moe_layers: int = 0
    experts_per_layer: int = 0
    experts_per_token: float = 0.0
    # The KV cache.
    kv_type: str = ""
    kv_bytes: int = 0
    kv_bytes_per_token: int = 0
    max_context: int = 0

    @property
    def live(self) -> bool:
        return states.is_live(self.state)

    @property
    def dead(self) -> bool:
        return self.state == states.DEAD

    @property
    def has_range(self) -> bool:
        return self.first >= 0

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, d: Any) -> NodeStats:
        """A NodeStats from a published map, tolerating missing and mistyped fields."""
        out = cls()
        if not isinstance(d, dict):
            return out
        for f in _FIELDS:
            if f.name in d:
                v = _coerce(d[f.name], _KINDS[f.name])
                if v is not _BAD:
                    setattr(out, f.name, v)
        return out


_FIELDS = fields(NodeStats)


def _kind(hint: Any) -> tuple[type, bool]:
    """(python type, may be None) of a field's annotation."""
    args = get_args(hint)
    if not args:
        return hint, False
    return next(a for a in args if a is not type(None)), type(None) in args


_KINDS = {name: _kind(hint) for name, hint in get_type_hints(NodeStats).items()}
_BAD = object()


def _coerce(v: Any, kind: tuple[type, bool]) -> Any:
    want, nullable = kind
    if v is None:
        return None if nullable else _BAD
    if want is bool:
        return v if isinstance(v, bool) else _BAD
    if isinstance(v, bool):
        return _BAD  # a bool where a number is expected is a type error on the wire
    if want is float:
        return float(v) if isinstance(v, (int, float)) else _BAD
    if want is int:
        return v if isinstance(v, int) else (int(v) if isinstance(v, float) and v.is_integer() else _BAD)
    return v if isinstance(v, str) else _BAD


def nodes_of(stats: dict[str, Any]) -> list[NodeStats]:
    """The NodeStats of a `stats` or `cluster` map (entries that are not maps are skipped)."""
    nodes = stats.get("nodes")
    return [NodeStats.from_wire(n) for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []
