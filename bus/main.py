"""dair-bus: the broker that stages, clients and the TUI connect to (docs/protocol.md)."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from urllib.parse import urlparse

from dair.config import load_config
from dair.errors import DairError

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dair-bus", description="broker of a dair cluster")
    p.add_argument("--bind", default=None, help="ROUTER address (default: config [bus] bind); stats on port + 1")
    p.add_argument("--config", default=None, help="config file (same shape as config.toml)")
    p.add_argument("--model", default=None, help="model file (default: config, then the default model)")
    p.add_argument("--insecure", action="store_true", help="allow binding a non-loopback address without keys")
    return p


def check_bind(bind: str, insecure: bool) -> None:
    u = urlparse(bind)
    if u.scheme != "tcp" or not u.port:
        raise DairError(f"--bind {bind!r}: expected tcp://HOST:PORT")
    if u.hostname not in LOOPBACK and not insecure:
        raise DairError(f"--bind {bind}: binding beyond loopback sends traffic in clear; "
                        "pass --insecure to do it anyway")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except DairError as e:
        print(f"dair-bus: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _main(args: argparse.Namespace) -> int:
    import zmq

    from dair.bus.broker import Broker
    from dair.model import open_model
    from dair.stages.main import resolve_model_path
    from dair.tokenizer import load_tokenizer

    cfg = load_config(args.config)
    bind = args.bind or cfg["bus"]["bind"]
    check_bind(bind, args.insecure)
    path = resolve_model_path(args.model, cfg)
    if not os.path.exists(path):
        raise DairError(f"{path}: model file not found (run `dair model fetch`)")
    model = open_model(path)
    tokenizer = load_tokenizer(model)
    try:
        broker = Broker(cfg, model, tokenizer, bind)
    except zmq.ZMQError as e:
        raise DairError(f"cannot bind {bind}: {e}") from None
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    print(f"dair-bus: listening on {bind} (stats on {broker.stats_bind}), model {path} "
          f"({model.config.n_layers} layers)", file=sys.stderr, flush=True)
    try:
        broker.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
