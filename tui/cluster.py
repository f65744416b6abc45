"""What the dashboard knows about the cluster, folded from the bus's stats maps.

Pure Python (no Textual), so the arithmetic (rates, tokens/s, who owns which layer) is tested
without a terminal. The bus's field names are those of docs/protocol.md, "Stats".
"""
from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from dair.bus import states
from dair.bus.stats import NodeStats

MAX_LAYERS = 4096

# Owner colours; red is never one of them because red means dead or uncovered.
PALETTE = ("#4e9a06", "#3465a4", "#c4a000", "#75507b", "#06989a", "#ce5c00", "#8ae234", "#729fcf",
           "#ad7fa8", "#34e2e2", "#fce94f", "#b8860b")


@dataclass
class NodeView(NodeStats):
    """A stage as the bus published it (bus/stats.py), with what the dashboard works out: its
    traffic rates since the last map and its colour."""

    rate_in: float | None = None
    rate_out: float | None = None
    colour: str = PALETTE[0]


@dataclass
class LayerCell:
    """One layer of the map: `kind` is "live", "loading", "dead" (only dead owners) or "gap"."""

    kind: str
    node: NodeView | None = None


def _num(d: dict[str, Any], key: str, default: Any = None) -> Any:
    v = d.get(key, default)
    # A malformed stats map must not take the UI down: anything non-numeric counts as missing.
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else default


@dataclass
class ClusterModel:
    """Fold successive stats maps; `dead_after_s` marks a silent node dead before the bus does."""

    dead_after_s: float = 3.0
    history: int = 120
    n_layers: int = 0
    ready: bool = False
    problems: list[str] = field(default_factory=list)
    nodes: list[NodeView] = field(default_factory=list)
    tok_s: deque[float] = field(default_factory=deque)
    tokens_total: int = 0
    act_bytes: int = 0
    bytes_per_token: float | None = None
    bytes_per_token_hop: float | None = None
    hops: int = 0
    sessions: int = 0
    _prev_t: float | None = None
    _prev_tokens: int | None = None
    _prev_bytes: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    _colours: dict[str, str] = field(default_factory=dict)

    def ingest(self, stats: dict[str, Any], now: float) -> None:
        """Take one stats map; `now` is used when the map carries no `t` of its own."""
        t = _num(stats, "t", now)
        # Bounded so that a corrupt figure cannot make the layer map allocate without end.
        self.n_layers = max(0, min(MAX_LAYERS, int(_num(stats, "n_layers", self.n_layers) or 0)))
        self.ready = bool(stats.get("ready", False))
        problems = stats.get("problems")
        self.problems = [str(p) for p in problems] if isinstance(problems, list) else []
        nodes = stats.get("nodes")
        self.nodes = [self._node(n, t) for n in nodes if isinstance(n, dict)] if isinstance(nodes, list) else []
        self.nodes.sort(key=lambda n: (n.first, n.last, n.name))
        gaps = self.uncovered()
        if gaps:
            # A node we already count as dead (silent too long) makes the pipeline not ready even
            # before the bus's next verdict says so.
            self.ready = False
            if not self.problems:
                self.problems = [f"layers {a}-{b} {kind}" if a != b else f"layer {a} {kind}" for a, b, kind in gaps]
        sessions = stats.get("sessions")
        self.sessions = len(sessions) if isinstance(sessions, list) else 0
        totals = stats.get("totals") if isinstance(stats.get("totals"), dict) else {}
        tokens = int(_num(totals, "tokens", 0) or 0)
        self.act_bytes = int(_num(totals, "act_bytes", 0) or 0)
        # The bus reports activation bytes per token per hop; a sum over hops is what one token costs.
        per_hop = _num(totals, "bytes_per_token_hop")
        # Hops of the whole pipeline (dead stages included), so a death does not halve the figure.
        hops = max(0, len({(n.first, n.last) for n in self.nodes}) - 1)
        self.hops = hops
        self.bytes_per_token = _num(totals, "bytes_per_token")
        if self.bytes_per_token is None and per_hop:
            self.bytes_per_token = per_hop * max(1, hops)
        self.bytes_per_token_hop = per_hop
        if self._prev_t is not None and self._prev_tokens is not None and t > self._prev_t:
            # A restarted bus starts its totals again from zero: never a negative rate.
            self.tok_s.append(max(0.0, (tokens - self._prev_tokens) / (t - self._prev_t)))
        elif self._prev_t is None:
            self.tok_s.append(0.0)
        while len(self.tok_s) > self.history:
            self.tok_s.popleft()
        self._prev_t, self._prev_tokens = t, tokens
        self.tokens_total = tokens

    def _node(self, d: dict[str, Any], t: float) -> NodeView:
        ns = NodeStats.from_wire(d)
        if ns.node == "?" and ns.name != "?":
            ns.node = ns.name
        if ns.name == "?":
            ns.name = ns.node
        key = ns.node
        rate_in = rate_out = None
        prev = self._prev_bytes.get(key)
        if prev is not None and t > prev[0]:
            rate_in = max(0.0, (ns.bytes_in - prev[1]) / (t - prev[0]))
            rate_out = max(0.0, (ns.bytes_out - prev[2]) / (t - prev[0]))
        self._prev_bytes[key] = (t, ns.bytes_in, ns.bytes_out)
        hb = ns.heartbeat_age_s
        if ns.state != states.DEAD and hb is not None and hb > self.dead_after_s:
            ns.state = states.DEAD
        if key not in self._colours:
            self._colours[key] = PALETTE[len(self._colours) % len(PALETTE)]
        return NodeView(**asdict(ns), rate_in=rate_in, rate_out=rate_out, colour=self._colours[key])

    def layer_cells(self) -> list[LayerCell]:
        """Per layer 0..L-1: its live owner, else a loading owner, else a dead one, else a gap."""
        cells = [LayerCell("gap") for _ in range(self.n_layers)]
        rank = {states.DEAD: 1, states.LOADING: 2}
        for n in self.nodes:
            kind = "live" if n.live else ("dead" if n.dead else "loading")
            for i in range(max(0, n.first), min(self.n_layers - 1, n.last) + 1):
                have = cells[i]
                # A live owner wins over a loading one, which wins over a dead one: a range
                # taken over by a new stage is no longer shown as dead.
                if have.kind == "gap" or rank.get(kind, 3) > rank.get(have.kind, 3):
                    cells[i] = LayerCell(kind, n)
        return cells

    def uncovered(self) -> list[tuple[int, int, str]]:
        """Runs of layers with no live owner: (first, last, "dead" | "gap" | "loading")."""
        runs: list[tuple[int, int, str]] = []
        for i, c in enumerate(self.layer_cells()):
            if c.kind == "live":
                continue
            if runs and runs[-1][1] == i - 1 and runs[-1][2] == c.kind:
                runs[-1] = (runs[-1][0], i, c.kind)
            else:
                runs.append((i, i, c.kind))
        return runs

    @property
    def current_tok_s(self) -> float:
        return self.tok_s[-1] if self.tok_s else 0.0
