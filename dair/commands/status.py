"""`dair status --bus ADDR`: the cluster as the bus sees it (stages, ranges, state, readiness)."""
from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a running cluster: stages, layer ranges, state, ready")
    p.add_argument("--bus", metavar="ADDR", default=None, help="bus address (default: config [bus] bind)")
    p.add_argument("--json", action="store_true", help="print the bus's full status as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the bus")
    from dair.commands.common import add_key_args

    add_key_args(p)
    p.set_defaults(func=handle)


def _mb(n: int | None) -> str:
    return f"{(n or 0) / 2**20:.0f}M"


def _kv(n: dict) -> str:
    """'f16 12M 23K/t': the stage's KV cache type, bytes held, bytes per token of its layers."""
    if not n.get("kv_type"):
        return "-"
    return f"{n['kv_type']} {_mb(n.get('kv_bytes'))} {(n.get('kv_bytes_per_token') or 0) / 1024:.0f}K/t"


def _threads(n: dict) -> str:
    """'2/2', or '1/2 absent': kernel threads in use of those configured, and why the pool runs
    alone when it does (see dair.ops.threads.pool_choice); the configured count before the stage
    has reported."""
    p = n.get("pool") or {}
    if not p.get("threads"):
        return str(n.get("threads", "-"))
    return f"{p['using']}/{p['threads']}" + (f" {p['why']}" if p.get("why") else "")


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
    print(f"bus {addr}: model {m['name']} ({m['n_layers']} layers), ready: {'yes' if st['ready'] else 'no'}")
    print(f"{'node':5} {'name':14} {'layers':>7} {'state':9} {'pid':>7} {'rss/budget':>11} {'mode':9} {'cpu%':>5} "
          f"{'threads':>13} {'hop p50/p95 ms':>15} {'in':>7} {'out':>7} {'hb age':>6} {'kv cache':>13}")
    for n in st["nodes"]:
        hop = "-" if n["hop_ms_p50"] is None else f"{n['hop_ms_p50']:.1f}/{n['hop_ms_p95']:.1f}"
        ram = _mb(n["rss"]) + ("/" + _mb(n["max_ram"]) if n.get("max_ram") else "")
        layers = f"{n['first']:>3}-{n['last']:<3}" if n["first"] >= 0 else f"{'-':>7}"
        print(f"{n['node']:5} {n['name'][:14]:14} {layers} {n['state']:9} {n['pid']:>7} "
              f"{ram:>11} {n.get('mode') or '-':9} {n['cpu']:>5.0f} {_threads(n):>13} {hop:>15} {_mb(n['bytes_in']):>7} "
              f"{_mb(n['bytes_out']):>7} "
              f"{n['heartbeat_age_s']:>6.1f} {_kv(n):>13}")
    for n in st["nodes"]:
        if n.get("moe_layers"):
            print(f"{n['node']}: experts {n['experts_per_token']:.1f} per token over {n['moe_layers']} MoE layers "
                  f"(of {n['experts_per_layer']} each), disk {n['disk_bytes_per_token'] / 2**20:.2f} MiB per token")
    keys = sorted({n["key"] for n in st["nodes"] if n.get("key")})
    if keys:
        print(f"CURVE keys: {', '.join(keys)}; refused peers: {st['counters'].get('refused_keys', 0)}")
    for p in st["problems"]:
        print(f"problem: {p}")
    if st["sessions"]:
        print(f"sessions: {len(st['sessions'])}, tokens served: {st['totals']['tokens']}")
    return 0 if st["ready"] else 1
