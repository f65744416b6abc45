"""`dair`: the umbrella command. Each subcommand lives in dair/commands/<name>.py and
registers itself through `register(subparsers)`; its handler returns an exit code."""
from __future__ import annotations

import argparse
import importlib
import sys

from dair import __version__
from dair.errors import DairError

COMMANDS = ["model", "tokenize", "generate", "chat", "score", "bench", "up", "status", "plan", "keys", "serve"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dair", description="distributed AirLLM: one model, several CPU machines")
    parser.add_argument("--version", action="version", version=f"dair {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dair.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dair.commands.{name}":
                raise
            continue
        module.register(sub)
    return parser


def run(handler, args: argparse.Namespace, prog: str = "dair") -> int:
    """Run a handler, turning DairError into one line on stderr and exit code 2."""
    try:
        return int(handler(args) or 0)
    except DairError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    return run(args.func, args)


if __name__ == "__main__":
    raise SystemExit(main())
