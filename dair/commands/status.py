"""`dair status --bus ADDR`: the cluster as the bus sees it (stages, ranges, state, readiness)."""
from __future__ import annotations

import argparse
import json

from dair.bus.stats import NodeStats, nodes_of
from dair.units import format_bytes


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a running cluster: stages, layer ranges, state, ready")
    p.add_argument("--bus", metavar="ADDR", default=None, help="bus address (default: config [bus] bind)")
    p.add_argument("--json", action="store_true", help="print the bus's full status as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the bus")
    from dair.commands.common import add_key_args

    add_key_args(p)
    p.set_defaults(func=handle)


def _mb(n: int | None) -> str:
    return format_bytes(n or 0, compact=True, unit="MiB", digits=0)


def _kv(n: NodeStats) -> str:
    """'f16 12M 23K/t': the stage's KV cache type, bytes held, bytes per token of its layers."""
    if not n.kv_type:
        return "-"
    return f"{n.kv_type} {_mb(n.kv_bytes)} {format_bytes(n.kv_bytes_per_token, compact=True, unit='KiB', digits=0)}/t"


def _threads(n: NodeStats) -> str:
    """'2/2', or '1/2 absent': kernel threads in use of those configured, and why the pool runs
    alone when it does (see dair.ops.threads.pool_choice); the configured count before the stage
    has reported."""
    if not n.pool_threads:
        return str(n.threads or "-")
    return f"{n.pool_using}/{n.pool_threads}" + (f" {n.pool_why}" if n.pool_why else "")


def handle(args: argparse.Namespace) -> int:
    from dair.bus.client import BusClient
    from dair.commands.common import keys_from_args
    from dair.config import load_config

    cfg = load_config()
    addr = args.bus or cfg["bus"]["bind"]
    with BusClient(addr, timeout=args.timeout, keys=keys_from_args(args, cfg)) as c:
        st = c.status()
    st.pop("type", None)
    st.pop("req", None)
    st.pop("v", None)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0 if st["ready"] else 1
    m = st["model"]
    nodes = nodes_of(st)
    print(f"bus {addr}: model {m['name']} ({m['n_layers']} layers), ready: {'yes' if st['ready'] else 'no'}")
    print(f"{'node':5} {'name':14} {'layers':>7} {'state':9} {'pid':>7} {'rss/budget':>11} {'mode':9} {'cpu%':>5} "
          f"{'threads':>13} {'hop p50/p95 ms':>15} {'in':>7} {'out':>7} {'hb age':>6} {'kv cache':>13}")
    for n in nodes:
        hop = "-" if n.hop_ms_p50 is None else f"{n.hop_ms_p50:.1f}/{n.hop_ms_p95 or 0.0:.1f}"
        ram = _mb(n.rss) + ("/" + _mb(n.max_ram) if n.max_ram else "")
        layers = f"{n.first:>3}-{n.last:<3}" if n.has_range else f"{'-':>7}"
        print(f"{n.node:5} {n.name[:14]:14} {layers} {n.state:9} {n.pid:>7} "
              f"{ram:>11} {n.mode or '-':9} {n.cpu or 0.0:>5.0f} {_threads(n):>13} {hop:>15} {_mb(n.bytes_in):>7} {_mb(n.bytes_out):>7} "
              f"{n.heartbeat_age_s or 0.0:>6.1f} {_kv(n):>13}")
    for n in nodes:
        if n.moe_layers:
            print(f"{n.node}: experts {n.experts_per_token:.1f} per token over {n.moe_layers} MoE layers "
                  f"(of {n.experts_per_layer} each), disk {format_bytes(n.disk_bytes_per_token, unit='MiB', digits=2)} "
                  "per token")
    keys = sorted({n.key for n in nodes if n.key})
    if keys:
        print(f"CURVE keys: {', '.join(keys)}; refused peers: {st['counters'].get('refused_keys', 0)}")
    for p in st["problems"]:
        print(f"problem: {p}")
    if st["sessions"]:
        print(f"sessions: {len(st['sessions'])}, tokens served: {st['totals']['tokens']}")
    return 0 if st["ready"] else 1
