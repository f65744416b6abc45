"""`dair serve`: the OpenAI/Ollama HTTP API and web chat page, a separate process that is a client
of the bus (like the TUI). `dair up --http HOST:PORT` starts one with its cluster."""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from dair.commands.common import add_key_args, keys_from_args
from dair.errors import DairError

API_KEY_ENV = "DAIR_API_KEY"
DEFAULT_LISTEN = "127.0.0.1:8080"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve an OpenAI- and Ollama-compatible HTTP API and a web chat page")
    p.add_argument("--bus", metavar="ADDR", default=None, help="the bus (default: config [bus] bind)")
    p.add_argument("--listen", metavar="HOST:PORT", default=DEFAULT_LISTEN, help=f"HTTP address (default {DEFAULT_LISTEN})")
    p.add_argument("--api-key", default=None,
                   help=f"clients must send 'Authorization: Bearer KEY' (default: ${API_KEY_ENV})")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --listen without an API key (trusted network only)")
    p.add_argument("--model", metavar="PATH", default=None,
                   help="local copy of the bus's model file, for its tokenizer (default: the bus's path, "
                        "then the fetched default model)")
    p.add_argument("--config", default=None, help="config file (same shape as config.toml)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the bus at start-up")
    add_key_args(p)
    p.set_defaults(func=handle)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise DairError(f"--listen {text!r}: give HOST:PORT, e.g. {DEFAULT_LISTEN}")
    return host, int(port)


def check_listen(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve other machines without a key, as the bus refuses to bind them without CURVE."""
    from dair.security import is_loopback_bind

    if api_key or insecure or is_loopback_bind(f"tcp://{host}:1"):
        return
    raise DairError(f"refusing to listen on {host}: it is reachable from other machines, and without an API key "
                    f"anyone there could use the cluster. Set --api-key (or ${API_KEY_ENV}), or pass --insecure "
                    "(trusted network only)")


def load_model(model_info: dict[str, Any], explicit: str | None) -> tuple[Any, Any]:
    """(model file, tokenizer) of a local file with the bus's fingerprint (bus/client.py
    local_model): the tokenizer for prompts, the file's metadata for Ollama's /api/show."""
    from dair.bus.client import local_model
    from dair.tokenizer import load_tokenizer

    mf = local_model(model_info, explicit)
    return mf, load_tokenizer(mf)


def handle(args: argparse.Namespace) -> int:
    from dair.config import load_config

    cfg = load_config(args.config)
    host, port = parse_listen(args.listen)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_listen(host, api_key, args.insecure)
    bus_addr = args.bus or cfg["bus"]["bind"]
    keys = keys_from_args(args, cfg)
    try:
        asyncio.run(_serve(bus_addr, keys, host, port, api_key, args.model, args.timeout))
    except KeyboardInterrupt:
        pass
    return 0


async def _serve(bus_addr: str, keys: Any, host: str, port: int, api_key: str | None, model: str | None,
                 timeout: float) -> None:
    import uvicorn

    from dair.bus.aclient import AsyncBusClient
    from dair.serve.app import create_app
    from dair.serve.service import Service

    # Bound here, before anything else, so that a port in use is one clear error (uvicorn would
    # log it and call sys.exit inside the event loop).
    sock = _bind(host, port)
    bus = AsyncBusClient(bus_addr, keys=keys, name="serve")
    try:
        welcome = await bus.start(timeout)
        mf, tok = load_model(welcome["model"], model)
        service = Service(bus, tok, welcome["model"], model_file=mf)
        config = uvicorn.Config(create_app(service, api_key), log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=3)
        server = uvicorn.Server(config)
        # uvicorn shuts down gracefully on SIGTERM (in-flight requests get timeout_graceful_shutdown
        # to finish), then raises the signal again for the handler it found when it started: a
        # no-op, set here first, so that the process goes on to close its bus connection and exits
        # 0 (`dair up` stops us this way).
        signal.signal(signal.SIGTERM, lambda *_: None)
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        shown = f"[{host}]" if ":" in host else host
        print(f"dair serve: http://{shown}:{port}/ (model {service.model_id}, bus {bus_addr}"
              + (", API key required" if api_key else "") + ")", file=sys.stderr, flush=True)
        await task
        print("dair serve: stopped", file=sys.stderr, flush=True)
    finally:
        await bus.close()
        sock.close()


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DairError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def spawn_for_cluster(cluster: Any, listen: str, model_path: str, keys_dir: str | None, say: Any,
                      timeout: float = 60.0) -> Any:
    """`dair up --http`: a `dair serve` process in the cluster's process group, stopped with it
    (first, with SIGTERM: it finishes its requests while the bus still answers)."""
    from dair.bus.local import _command

    host, port = parse_listen(listen)
    check_listen(host, os.environ.get(API_KEY_ENV), False)
    cmd = _command("dair", "dair.cli") + ["serve", "--bus", cluster.addr, "--listen", listen, "--model", model_path]
    if keys_dir:
        cmd += ["--keys", keys_dir]
    proc = cluster.spawn_client(cmd)
    shown = f"[{host}]" if ":" in host else host
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise DairError(f"dair serve exited with status {proc.returncode} (see the log)")
        try:
            urllib.request.urlopen(f"http://{shown}:{port}/health", timeout=1.0)  # noqa: S310 - our own URL
            break
        except urllib.error.HTTPError:
            break  # it answers (503 while not ready is still an answer)
        except OSError:
            time.sleep(0.2)
    else:
        raise DairError(f"dair serve did not answer on {listen} within {timeout:.0f}s")
    say(f"dair up: HTTP API and web page on http://{shown}:{port}/ (pid {proc.pid})")
    return proc
