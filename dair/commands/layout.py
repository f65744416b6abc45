"""The layer ranges of `dair up`'s stages, checked against the model before any process starts.

A layout the bus would refuse (a gap, an overlap, a range given twice, a layer the model lacks)
is an error here, naming the layers, instead of a cluster that never becomes ready.
"""
from __future__ import annotations

from dair.errors import DairError

Span = tuple[int, int]


def _span(a: int, b: int) -> str:
    return str(a) if a == b else f"{a}-{b}"


def _runs(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    out: list[str] = []
    start = prev = None
    for x in sorted(layers):
        if prev is not None and x == prev + 1:
            prev = x
            continue
        if start is not None:
            out.append(_span(start, prev))  # type: ignore[arg-type]
        start = prev = x
    if start is not None:
        out.append(_span(start, prev))  # type: ignore[arg-type]
    return ", ".join(out)


def parse_split(text: str, what: str | None = None) -> list[Span]:
    """'0-9,10-19,20-29' -> [(0, 9), (10, 19), (20, 29)]; the syntax only, not the model."""
    what = what or f"--split {text!r}"
    spans = []
    for part in text.split(","):
        a, sep, b = part.strip().partition("-")
        try:
            first, last = int(a), int(b if sep else a)
        except ValueError:
            raise DairError(f"{what}: expected layer ranges like 0-9,10-19,20-29") from None
        if first < 0 or last < first:
            raise DairError(f"{what}: range {part.strip()!r} must be A-B with 0 <= A <= B")
        spans.append((first, last))
    return spans


def check_tiling(spans: list[Span], n_layers: int, what: str) -> None:
    """Every layer 0..n_layers-1 in exactly one span, else DairError naming the layers."""
    outside = [f"{a}-{b}" for a, b in spans if b >= n_layers]
    if outside:
        raise DairError(f"{what}: layer range(s) {', '.join(outside)} outside the model's layers 0-{n_layers - 1}")
    seen: dict[Span, int] = {}
    for s in spans:
        if s in seen:
            raise DairError(f"{what}: range {_span(*s)} is given twice")
        seen[s] = 1
    owners: list[list[Span]] = [[] for _ in range(n_layers)]
    for s in spans:
        for layer in range(s[0], s[1] + 1):
            owners[layer].append(s)
    shared = [i for i, o in enumerate(owners) if len(o) > 1]
    if shared:
        pairs = sorted({o for i in shared for o in owners[i]})
        raise DairError(f"{what}: ranges {' and '.join(_span(*p) for p in pairs)} overlap on "
                        f"layer{'s' if len(shared) > 1 else ''} {_runs(shared)}")
    missing = [i for i, o in enumerate(owners) if not o]
    if missing:
        raise DairError(f"{what}: layer{'s' if len(missing) > 1 else ''} {_runs(missing)} "
                        f"{'are' if len(missing) > 1 else 'is'} in no range (the model's layers are 0-{n_layers - 1})")


def even_split(n_layers: int, n_stages: int) -> list[Span]:
    """n_stages contiguous ranges of (nearly) equal size."""
    if n_stages < 1:
        raise DairError(f"--stages {n_stages}: expected at least 1 stage")
    if n_stages > n_layers:
        raise DairError(f"--stages {n_stages}: the model has only {n_layers} layers (at most one stage per layer)")
    base, extra = divmod(n_layers, n_stages)
    out, start = [], 0
    for i in range(n_stages):
        size = base + (1 if i < extra else 0)
        out.append((start, start + size - 1))
        start += size
    return out


def stage_layout(n_layers: int, stages: int | None = None, split: str | None = None,
                 config_stages: list[dict] | None = None, default_stages: int = 3) -> list[Span]:
    """The ranges `dair up` starts: --split, else the config's [[stages]], else --stages evenly."""
    if split is not None:
        if not split.strip():
            raise DairError("--split '': expected layer ranges like 0-9,10-19,20-29")
        what = f"--split {split}"
        spans = parse_split(split, what)
    elif config_stages and stages is None:
        try:
            text = ",".join(str(s["layers"]) for s in config_stages)
        except (KeyError, TypeError):
            raise DairError("config [[stages]]: every entry needs layers = \"A-B\"") from None
        what = f"config [[stages]] {text}"
        spans = parse_split(text, what)
    else:
        return even_split(n_layers, default_stages if stages is None else stages)
    check_tiling(spans, n_layers, what)
    return spans
