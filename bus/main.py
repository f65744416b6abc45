"""dair-bus: the broker that stages, clients and the TUI connect to (docs/protocol.md)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from urllib.parse import urlparse

from dair import security
from dair.config import load_config
from dair.errors import DairError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dair-bus", description="broker of a dair cluster")
    p.add_argument("--bind", default=None, help="ROUTER address (default: config [bus] bind); stats on port + 1")
    p.add_argument("--config", default=None, help="config file (same shape as config.toml)")
    p.add_argument("--model", default=None, help="model file (default: config, then the default model)")
    p.add_argument("--insecure", action="store_true", help="allow binding a non-loopback address without keys")
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="keys directory (bus.key_secret, stages/, clients/): turns CURVE on (config [security] keys)")
    p.add_argument("--bus-secret-key", metavar="PATH", default=None, help="the bus's key pair (NAME.key_secret)")
    p.add_argument("--stage-keys", metavar="DIR", default=None, help="public keys allowed to join as stages")
    p.add_argument("--client-keys", metavar="DIR", default=None, help="public keys allowed to join as clients")
    return p


def check_address(bind: str) -> None:
    # The stats PUB binds port + 1, so only tcp://HOST:PORT will do.
    u = urlparse(bind)
    try:
        port = u.port
    except ValueError:  # e.g. a source spec, tcp://127.0.0.1:7500;0.0.0.0:7600
        port = None
    if u.scheme != "tcp" or not port or not u.hostname or port > 65534 or u.path or u.query:
        raise DairError(f"--bind {bind!r}: expected tcp://HOST:PORT (one address; stats on PORT + 1)")


def main(argv: list[str] | None = None) -> int:
    from dair.cli import run

    return run(_main, build_parser().parse_args(argv), prog="dair-bus")


def _main(args: argparse.Namespace) -> int:
    import zmq

    from dair.bus.broker import Broker
    from dair.model import open_model
    from dair.model.fetch import resolve_model_path
    from dair.tokenizer import load_tokenizer

    cfg = load_config(args.config)
    bind = args.bind or cfg["bus"]["bind"]
    check_address(bind)
    keys = security.bus_keys(cfg.get("security") or {}, args.keys, args.bus_secret_key, args.stage_keys,
                             args.client_keys)
    security.check_bind(bind, keys is not None, insecure=args.insecure)
    if keys is not None:
        # Refusals are logged by the gate; give them the bus's own prefix on its stderr.
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(logging.Formatter("dair-bus: %(message)s"))
        sec_log = logging.getLogger("dair.security")
        sec_log.addHandler(h)
        sec_log.setLevel(logging.INFO)
    path = resolve_model_path(args.model, cfg)
    if not os.path.exists(path):
        raise DairError(f"{path}: model file not found (run `dair model fetch`)")
    model = open_model(path)
    tokenizer = load_tokenizer(model, background=True)  # built while the bus binds and stages join
    try:
        broker = Broker(cfg, model, tokenizer, bind, keys=keys)
    except zmq.ZMQError as e:
        raise DairError(f"cannot bind {bind}: {e}") from None
    signal.signal(signal.SIGTERM, lambda *_: broker.stop())
    if broker.gate is not None:
        signal.signal(signal.SIGHUP, lambda *_: broker.reload_keys())
    curve = f", CURVE with allowed keys in {', '.join(keys[1].values())}" if keys else ", no keys"
    print(f"dair-bus: listening on {bind} (stats on {broker.stats_bind}), model {path} "
          f"({model.config.n_layers} layers){curve}", file=sys.stderr, flush=True)
    try:
        broker.run()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
