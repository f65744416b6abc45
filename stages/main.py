"""dair-stage: own a layer range of the model file and serve it to the bus."""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from dataclasses import replace

from dair.config import BusConfig, ReconnectConfig, StageConfig, load_config, section
from dair.errors import DairError


def parse_layers(text: str) -> tuple[int, int]:
    """'10-19' -> (10, 19); '7' -> (7, 7)."""
    try:
        a, _, b = text.partition("-")
        first, last = int(a), int(b or a)
    except ValueError:
        raise DairError(f"--layers {text!r}: expected A-B, e.g. 0-9") from None
    if first < 0 or last < first:
        raise DairError(f"--layers {text!r}: expected 0 <= A <= B")
    return first, last


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dair-stage", description="serve a layer range of the model to a dair bus")
    p.add_argument("--layers", default=None,
                   help="layer range A-B (inclusive); without it the bus places this stage by --max-ram and --speed")
    p.add_argument("--standby", action="store_true",
                   help="register without layers; the bus gives this stage a dead stage's range")
    p.add_argument("--model", default=None, help="model file (default: config, then the default model)")
    p.add_argument("--bus", default=None, help="bus address (default: config [bus] bind)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads (0 = one per core)")
    p.add_argument("--wire", choices=["q8_0", "f16", "f32"], default=None, help="activation format sent")
    p.add_argument("--kv-type", choices=["f16", "f32", "q8_0"], default=None,
                   help="KV cache precision (default: config [stage] kv_type)")
    p.add_argument("--name", default=None, help="node name shown in stats")
    p.add_argument("--config", default=None, help="config file (same shape as config.toml)")
    p.add_argument("--max-ram", default=None, metavar="SIZE",
                   help="RAM budget for resident weights, e.g. 512M, 2G (default: config [stage] max_ram); "
                        "a range that does not fit streams its layers from disk")
    # Given, not measured: measuring (say, one decode step over the first layer) would need the
    # weights loaded before the bus has placed the stage.
    p.add_argument("--speed", type=float, default=None,
                   help="relative speed announced for placement without --layers (default 1)")
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="keys directory: bus.key and stages/stage.key_secret (config [security] keys)")
    p.add_argument("--secret-key", metavar="PATH", default=None, help="this stage's key pair (NAME.key_secret)")
    p.add_argument("--server-key", metavar="PATH|Z85", default=None, help="the bus's public key")
    return p


def main(argv: list[str] | None = None) -> int:
    from dair.cli import run

    return run(_main, build_parser().parse_args(argv), prog="dair-stage")


def _main(args: argparse.Namespace) -> int:
    from dair.engine.residency import parse_size
    from dair.model import open_model
    from dair.model.fetch import resolve_model_path
    from dair.stages.link import Link

    cfg = load_config(args.config)
    if args.standby and args.layers:
        raise DairError("--standby takes no --layers (the bus assigns a range when a stage dies)")
    place = not args.standby and not args.layers  # the bus assigns a range by budget and speed
    if args.speed is not None and args.speed <= 0:
        raise DairError(f"--speed {args.speed}: must be positive")
    first, last = parse_layers(args.layers) if args.layers else (-1, -1)
    path = resolve_model_path(args.model, cfg)
    if not os.path.exists(path):
        raise DairError(f"{path}: model file not found (run `dair model fetch`)")
    model = open_model(path)
    n = model.config.n_layers
    if last >= n:
        raise DairError(f"--layers {first}-{last}: {path} has {n} layers (0-{n - 1})")
    bus_cfg, reconnect = section(BusConfig, cfg), section(ReconnectConfig, cfg)
    stage_cfg = section(StageConfig, cfg)
    # Flags win over the config file.
    stage_cfg = replace(stage_cfg, threads=stage_cfg.threads if args.threads is None else args.threads,
                        wire=args.wire or stage_cfg.wire, kv_type=args.kv_type or stage_cfg.kv_type,
                        max_ram=stage_cfg.max_ram if args.max_ram is None else args.max_ram)
    parse_size(stage_cfg.max_ram)  # a bad --max-ram is an error before anything starts
    from dair import security

    keys = security.peer_keys("stage", cfg.get("security") or {}, args.keys, args.secret_key, args.server_key)
    if keys is not None:
        # Whoever runs the bus needs this to allow the stage (a NAME.key in its stage_keys).
        print(f"dair-stage: CURVE on, this stage's public key is {keys.public.decode()}", file=sys.stderr, flush=True)
    name = args.name or f"{socket.gethostname()}:{'standby' if args.standby else 'placed' if place else f'{first}-{last}'}"
    link = Link(bus_addr=args.bus or bus_cfg.bind, name=name, model=model, first=first, last=last, bus=bus_cfg,
                stage=stage_cfg, reconnect=reconnect, keys=keys, place=place, speed=args.speed or 1.0)
    # SIGTERM ends the loop cleanly (dair up stops its children with it).
    signal.signal(signal.SIGTERM, lambda *_: link.stop())
    return link.run()


if __name__ == "__main__":
    raise SystemExit(main())
