"""`dair plan`: the layer placement dair would choose for nodes of given RAM budgets."""
from __future__ import annotations

import argparse
import json
from typing import Any

from dair.errors import DairError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="place the model's layers on nodes in proportion to their RAM budgets")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--budgets", metavar="SIZES", default=None,
                     help="RAM budget of each node, e.g. 1G,2G,512M ('-' = unlimited)")
    src.add_argument("--config", metavar="FILE", default=None,
                     help="config file whose [[stages]] entries give max_ram (and optionally speed, name)")
    src.add_argument("--bus", metavar="ADDR", default=None,
                     help="the stages registered with this running bus (their announced budgets and speeds)")
    from dair.commands.common import add_key_args

    add_key_args(p)
    p.add_argument("--speeds", metavar="X,Y,...", default=None,
                   help="relative speed of each node (measured tokens/s or any ratio; default 1 each)")
    p.add_argument("--model", metavar="PATH", default=None, help="model file (default: config, then the default model)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=handle)


def _nodes_from_args(args: argparse.Namespace) -> list[Any]:
    from dair.config import load_config
    from dair.engine.placement import NodeCapacity
    from dair.engine.residency import parse_size

    if args.bus:
        nodes = _nodes_from_bus(args)
    elif args.budgets:
        budgets = [b.strip() for b in args.budgets.split(",")]
        nodes = [NodeCapacity(f"node{i}", None if b in ("-", "") else parse_size(b)) for i, b in enumerate(budgets)]
    else:
        cfg = load_config(args.config)
        stages = cfg.get("stages") or []
        if not stages:
            where = args.config or "the default config"
            raise DairError(f"{where}: no [[stages]] entries to plan for (or give --budgets 1G,2G,...)")
        default_ram = cfg.get("stage", {}).get("max_ram", "")
        nodes = []
        for i, st in enumerate(stages):
            name = str(st.get("name") or st.get("host") or f"node{i}")
            if st.get("host") and not st.get("name"):
                name = f"{name}#{i}"
            nodes.append(NodeCapacity(name, parse_size(st.get("max_ram", default_ram)), float(st.get("speed", 1.0))))
    if args.speeds:
        speeds = [float(s) for s in args.speeds.split(",")]
        if len(speeds) != len(nodes):
            raise DairError(f"--speeds gives {len(speeds)} values for {len(nodes)} nodes")
        for nd, s in zip(nodes, speeds, strict=True):
            nd.speed = s
    return nodes


def _nodes_from_bus(args: argparse.Namespace) -> list[Any]:
    from dair.bus.client import BusClient
    from dair.bus.stats import nodes_of
    from dair.commands.common import keys_from_args
    from dair.engine.placement import NodeCapacity

    with BusClient(args.bus, timeout=10.0, keys=keys_from_args(args)) as c:
        st = c.status()
    # In registration order (n1, n2, ...), as the bus places them.
    live = sorted((n for n in nodes_of(st) if not n.dead),
                  key=lambda n: int(n.node[1:]) if n.node[1:].isdigit() else 0)
    if not live:
        raise DairError(f"no stages registered with the bus at {args.bus}")
    if args.model is None and st.get("model", {}).get("path"):
        import os

        if os.path.exists(st["model"]["path"]):
            args.model = st["model"]["path"]
    return [NodeCapacity(n.name, n.max_ram or None, n.speed or 1.0) for n in live]


def handle(args: argparse.Namespace) -> int:
    from dair.engine.placement import kv_reserve, model_unit_bytes, place
    from dair.model import open_model
    from dair.model.fetch import resolve_model_path
    from dair.units import format_bytes

    nodes = _nodes_from_args(args)
    path = resolve_model_path(args.model)
    with open_model(path) as mf:
        layer_bytes, head_bytes = model_unit_bytes(mf)
        kv, kv_tokens, kv_type = kv_reserve(mf)
        n_layers = mf.config.n_layers
    plan = place(layer_bytes, nodes, head_bytes)
    if args.json:
        print(json.dumps({"model": str(path), "n_layers": n_layers, "layer_bytes_max": max(layer_bytes),
                          "head_bytes": head_bytes, "stages": [p.to_dict() for p in plan]}, indent=2))
        return 0
    total = sum(layer_bytes) + head_bytes
    print(f"model {path} ({n_layers} layers, {format_bytes(total)} of weights and KV cache: a {kv_type} "
          f"cache of {kv // max(kv_tokens, 1)} bytes per token per layer for {kv_tokens} tokens)")
    print(f"{'node':14} {'budget':>10} {'speed':>6} {'layers':>8} {'n':>3} {'weights':>10} {'share':>6}  mode")
    for p in plan:
        budget = "unlimited" if p.budget is None else format_bytes(p.budget)
        print(f"{p.name[:14]:14} {budget:>10} {p.speed:>6.2g} {p.layers:>8} {p.last - p.first + 1:>3} "
              f"{format_bytes(p.nbytes):>10} {p.nbytes / total:>6.1%}  {p.mode}")
    print("split: " + ",".join(p.layers for p in plan))
    return 0
