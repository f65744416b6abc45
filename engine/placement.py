"""Capacity-aware placement: contiguous layer ranges in proportion to each node's capacity.

A node's capacity is its RAM budget for weights and KV cache (bytes; None = unlimited) times an optional
measured speed (tokens/s or any relative figure; 1.0 when unknown). Layer bytes, not layer
counts, are what gets shared out, and the head (final norm + output matrix) is counted with the
last layer since the last stage must hold it. Used by `dair plan` and by the bus for stages
that register without --layers.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from dair.errors import DairError
from dair.units import format_bytes


@dataclass
class NodeCapacity:
    name: str
    budget: int | None = None  # bytes of weights it may hold resident; None = unlimited
    speed: float = 1.0
    # KV cache bytes per layer of one full-length session with this node's own cache type (a
    # Q8_0 stage holds about half of an f16 one's). None: already in the caller's layer bytes.
    kv_layer: int | None = None


@dataclass
class Placement:
    name: str
    first: int
    last: int
    nbytes: int  # weight bytes of its range (with the head on the last node)
    budget: int | None
    speed: float
    mode: str  # "resident" if nbytes fits the budget, else "streaming"

    @property
    def layers(self) -> str:
        return f"{self.first}-{self.last}"

    def to_dict(self) -> dict[str, Any]:
        return dict(asdict(self), layers=self.layers)


def kv_reserve(model: Any, kv_type: str | None = None, kv_tokens: int | None = None) -> tuple[int, int, str]:
    """(KV cache bytes per layer of one full-length session, its context, its type): what a stage
    holds per layer beside the weights. Defaults: config [stage] kv_type and [bus] max_context
    (0 = the model's own), never beyond the model's context_length."""
    from dair.config import load_config
    from dair.engine.kvcache import check_kv_type, kv_bytes_per_token

    c, cfg = model.config, load_config()
    kv_type = check_kv_type(kv_type or cfg["stage"]["kv_type"], c.head_dim)
    tokens = int(cfg["bus"]["max_context"]) if kv_tokens is None else kv_tokens
    tokens = min(tokens or c.context_length, c.context_length)
    return tokens * kv_bytes_per_token(kv_type, c.n_kv_heads, c.head_dim), tokens, kv_type


def model_unit_bytes(model: Any, kv_type: str | None = None, kv_tokens: int | None = None) -> tuple[list[int], int]:
    """(bytes of each layer: weights and the KV cache of one full-length session (kv_reserve),
    bytes of the head) of an open model file."""
    c = model.config
    kv = kv_reserve(model, kv_type, kv_tokens)[0]
    layers = [b - a + kv for a, b in (model.layer_byte_range(i) for i in range(c.n_layers))]
    return layers, model.output.nbytes + model.output_norm.nbytes


def place(layer_bytes: Sequence[int], nodes: Sequence[NodeCapacity], head_bytes: int = 0) -> list[Placement]:
    """Contiguous ranges covering every layer once, node k's share of the bytes proportional to
    its capacity (the node with the largest budget goes last if the last one cannot hold the
    head). DairError if a node cannot hold even one layer (or the head, when it is the
    last node), or if there are more nodes than layers.

    Where nodes state different kv_layer, layer_bytes are the weights alone and a node's bytes
    are its layers' weights plus kv_layer for each of them: ranges then fill every node to the
    same fraction of its capacity."""
    n, k = len(layer_bytes), len(nodes)
    if k == 0:
        raise DairError("no nodes to place layers on")
    if n < k:
        raise DairError(f"{k} nodes but only {n} layers: every node needs at least one layer")
    for node in nodes:
        if node.budget is not None and node.budget <= 0:
            raise DairError(f"node {node.name}: budget must be positive")
        if node.speed <= 0:
            raise DairError(f"node {node.name}: speed must be positive")
    nodes = list(nodes)
    if head_bytes and nodes[-1].budget is not None and nodes[-1].budget < head_bytes:
        # The head is indivisible and must sit on the last node: give that place to the
        # node with the largest budget rather than fail.
        big = max(range(k), key=lambda i: float("inf") if nodes[i].budget is None else nodes[i].budget)
        nodes.append(nodes.pop(big))
    kvs = [nd.kv_layer or 0 for nd in nodes]
    mixed = len(set(kvs)) > 1
    if not mixed:  # the same per layer everywhere: part of each layer's bytes
        layer_bytes, kvs = [b + kvs[0] for b in layer_bytes], [0] * k
    sizes = list(layer_bytes)
    sizes[-1] += head_bytes
    total = sum(sizes) + (n * max(kvs) if mixed else 0)
    finite = [nd.budget for nd in nodes if nd.budget is not None]
    # An unlimited node is worth the whole model (or the largest stated budget, if larger).
    unlimited = max([total, *finite])
    caps = [(nd.budget if nd.budget is not None else unlimited) * nd.speed for nd in nodes]
    cum_bytes = [0]
    for s in sizes:
        cum_bytes.append(cum_bytes[-1] + s)
    bounds = _mixed_bounds(cum_bytes, kvs, caps) if mixed else _bounds(cum_bytes, caps)
    out = []
    for j, nd in enumerate(nodes):
        first, last = bounds[j], bounds[j + 1] - 1
        nbytes = cum_bytes[last + 1] - cum_bytes[first] + (last + 1 - first) * kvs[j]
        unit = max(layer_bytes[first:last + 1]) + kvs[j]
        if last == n - 1 and head_bytes > unit:
            unit = head_bytes
        if nd.budget is not None and nd.budget < unit:
            what = "the head" if unit == head_bytes and last == n - 1 else "one layer"
            raise DairError(f"node {nd.name}: budget {_mib(nd.budget)} cannot hold even {what} "
                            f"({_mib(unit)}); give it at least {_mib(unit)}")
        mode = "resident" if nd.budget is None or nbytes <= nd.budget else "streaming"
        out.append(Placement(nd.name, first, last, nbytes, nd.budget, nd.speed, mode))
    return out


def _bounds(cum_bytes: list[int], caps: list[float]) -> list[int]:
    """Boundary j (after node j) at the layer whose cumulative bytes are nearest node j's share
    of the total, kept strictly increasing so that every node gets at least one layer."""
    n, k, total = len(cum_bytes) - 1, len(caps), cum_bytes[-1]
    bounds, acc = [0], 0.0
    for j in range(k - 1):
        acc += caps[j]
        target = total * acc / sum(caps)
        lo, hi = bounds[-1] + 1, n - (k - 1 - j)
        bounds.append(min(range(lo, hi + 1), key=lambda b: (abs(cum_bytes[b] - target), b)))
    bounds.append(n)
    return bounds


def _mixed_bounds(cum_bytes: list[int], kvs: list[int], caps: list[float]) -> list[int]:
    """Boundaries that fill each node to the same fraction f of its capacity, node j's bytes being
    its layers' weights plus kvs[j] per layer: for a trial f each node in turn takes the range
    nearest f * its capacity, and f is bisected until the last node's remainder fits f too."""
    n, k = len(cum_bytes) - 1, len(caps)

    def cost(j: int, a: int, b: int) -> int:
        return cum_bytes[b] - cum_bytes[a] + (b - a) * kvs[j]

    def trial(f: float) -> tuple[list[int], float]:
        bounds = [0]
        for j in range(k - 1):
            lo, hi = bounds[-1] + 1, n - (k - 1 - j)
            bounds.append(min(range(lo, hi + 1), key=lambda b: (abs(cost(j, bounds[-1], b) - f * caps[j]), b)))
        bounds.append(n)
        return bounds, cost(k - 1, bounds[-2], n) - f * caps[-1]

    lo, hi = 0.0, 2.0 * (cum_bytes[-1] + n * max(kvs)) / min(caps)
    best = trial(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        b, excess = trial(mid)
        if abs(excess) < abs(best[1]):
            best = (b, excess)
        if excess > 0:  # the last node is left too much: fill the others more
            lo = mid
        else:
            hi = mid
    return best[0]


def _mib(n: int) -> str:
    return format_bytes(n, unit="MiB")
