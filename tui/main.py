"""Entry point of dair-tui: the live cluster dashboard and interactive prompt."""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from dair.config import defaults

    p = argparse.ArgumentParser(prog="dair-tui", description="live dashboard and chat for a dair cluster")
    p.add_argument("--bus", metavar="ADDR", default=None,
                   help=f"bus address (default: config.toml [bus] bind, {defaults('bus')['bind']})")
    p.add_argument("--config", metavar="FILE", help="a config.toml whose [bus] bind is the default address")
    p.add_argument("--system", metavar="TEXT", help="system message at the start of every conversation")
    from dair.commands.common import add_key_args

    add_key_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dair.commands.common import keys_from_args
    from dair.config import load_config
    from dair.errors import DairError

    try:
        cfg = load_config(args.config)
        addr = args.bus or cfg["bus"]["bind"]
        keys = keys_from_args(args, cfg)
    except DairError as e:
        print(f"dair-tui: error: {e}", file=sys.stderr)
        return 2
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("dair-tui: error: the dashboard needs a terminal (for a script: dair status --bus ADDR, "
              "dair generate --bus ADDR)", file=sys.stderr)
        return 2
    if not addr.startswith("tcp://"):
        print(f"dair-tui: error: --bus {addr!r} is not tcp://HOST:PORT", file=sys.stderr)
        return 2
    from dair.tui.app import run_tui

    return run_tui(addr, system=args.system, keys=keys)


if __name__ == "__main__":
    raise SystemExit(main())
