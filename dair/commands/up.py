"""`dair up`: a cluster on this machine (one dair-bus, N dair-stage processes) until Ctrl-C.

The layout (--stages, --split, the config's [[stages]]) is checked against the model before any
process starts. While it runs, dair up supervises its children (dair/commands/supervise.py): a
child's exit is one line, the others keep running, and the dead one comes back as a standby.
With --generate PROMPT it answers one prompt on the fresh cluster and stops it again: the
README's main command. Every child is stopped on Ctrl-C, SIGTERM or any error (no orphans).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import tempfile
import time
from urllib.parse import urlparse

from dair.errors import DairError

NO_TTY_QUESTION = "What is the capital of France?"

def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("up", help="start a local cluster: a bus and N stage processes")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--stages", type=int, default=None, help="number of stages, layers split evenly (default 3)")
    g.add_argument("--split", default=None, metavar="A-B,C-D,...", help="layer range of each stage, e.g. 0-9,10-19,20-29")
    p.add_argument("--model", metavar="PATH", help="model file; default: config, then the fetched default model")
    p.add_argument("--port", type=int, default=None, help="bus port on 127.0.0.1 (stats on port + 1)")
    p.add_argument("--threads", type=int, default=None, help="kernel threads per stage (0 = one per core)")
    p.add_argument("--wire", choices=["q8_0", "f16", "f32"], default=None, help="activation format between stages")
    p.add_argument("--standby", type=int, default=0, metavar="N",
                   help="also start N standby stages (no layers) that take over the range of a stage that dies")
    p.add_argument("--max-ram", default=None, metavar="SIZE",
                   help="RAM budget of each stage for resident weights, e.g. 512M (passed to dair-stage)")
    p.add_argument("--config", default=None, help="config file (same shape as config.toml)")
    p.add_argument("--generate", metavar="PROMPT", default=None,
                   help="answer this prompt (chat template) on the new cluster, then stop it")
    p.add_argument("--raw", action="store_true", help="with --generate: continue the text, no chat template")
    p.add_argument("-n", "--max-tokens", type=int, default=None, help="with --generate: most tokens")
    p.add_argument("--temperature", type=float, default=None, help="with --generate: 0 = greedy")
    p.add_argument("--http", metavar="HOST:PORT", default=None,
                   help="also serve the OpenAI/Ollama HTTP API and web page there (dair serve; key: $DAIR_API_KEY)")
    p.add_argument("--tui", action="store_true", help="open the dashboard (dair-tui) on the new cluster")
    p.add_argument("--log", default=None, help="file for the children's output (default: the terminal, "
                   "or a temporary file with --generate / --tui)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the pipeline to be ready")
    p.add_argument("--keys", metavar="DIR", default=None,
                   help="CurveZMQ on every socket, with the keys in DIR (bus, stages/stage, clients/client; "
                        "made there if missing)")
    p.set_defaults(func=handle)


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: the rest of the shutdown must not be cut short
    raise _Stop()


def _check_counts(args: argparse.Namespace) -> None:
    if args.standby < 0:
        raise DairError(f"--standby {args.standby}: expected 0 or more standby stages")
    if args.max_tokens is not None and args.max_tokens < 0:
        raise DairError(f"-n/--max-tokens {args.max_tokens}: expected 0 or more tokens")
    if args.max_ram:
        from dair.engine.residency import parse_size

        parse_size(args.max_ram)  # each stage would refuse it; say so once, before any starts
    if args.port is not None and not 1 <= args.port <= 65534:
        raise DairError(f"--port {args.port}: expected 1-65534 (the stats use port + 1)")


def _check_ports_free(port: int) -> None:
    """Before anything starts: a bus already on the port would be taken for ours (the stages
    would join it and be refused), and ours could not bind."""
    for p in (port, port + 1):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as ZeroMQ binds: TIME_WAIT is no obstacle
            try:
                s.bind(("127.0.0.1", p))
            except OSError as e:
                what = "bus" if p == port else "stats"
                raise DairError(f"port {p} (the {what} port) on 127.0.0.1 is in use ({e.strerror}): another "
                                "dair up or dair-bus? Choose other ports with --port") from None


def handle(args: argparse.Namespace) -> int:
    from dair.commands.layout import stage_layout
    from dair.commands.supervise import RestartPolicy, SupervisedCluster, Supervisor
    from dair.config import UpConfig, load_config, section
    from dair.model import open_model
    from dair.model.fetch import resolve_model_path

    _check_counts(args)
    cfg = load_config(args.config)
    policy = RestartPolicy.from_config(section(UpConfig, cfg))
    path = resolve_model_path(args.model, cfg)
    if not os.path.exists(path):
        raise DairError(f"{path}: model file not found (run `dair model fetch`)")
    # Everything about the layout is checked here, before any process starts.
    n_layers = open_model(path).config.n_layers
    split = stage_layout(n_layers, args.stages, args.split, cfg.get("stages"))
    port = args.port or urlparse(cfg["bus"]["bind"]).port
    _check_ports_free(port)
    if args.tui and not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Scripts and CI run the README's main command too: without a terminal the dashboard
        # cannot draw, so show the same pipeline answering one question instead.
        print("dair up: no terminal for the dashboard; answering one question instead", file=sys.stderr)
        args.tui = False
        if args.generate is None:
            args.generate = NO_TTY_QUESTION
    n_stages = len(split) + args.standby
    stage_key = None
    if args.keys:
        from dair import security

        foreign = security.foreign_stage_keys(args.keys)
        if foreign:  # the bus admits every key in stages/: this cluster's stages' and no other
            raise DairError(f"{', '.join(map(str, foreign))}: not made by dair up, yet the bus would admit it "
                            "as a stage; remove it from there or give dair up a keys directory of its own")
        security.make_cluster_keys(args.keys, [f"stage{i}" for i in range(n_stages)])

        def stage_key(name: str) -> str:
            return security.stage_secret_path(args.keys, name)
    quiet = args.generate is not None or args.tui
    log_path = args.log or (os.path.join(tempfile.gettempdir(), f"dair-up-{os.getpid()}.log") if quiet else None)
    log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - lives as long as the cluster

    def say(m: str) -> None:  # start-up lines: the answer of --generate owns stdout
        print(m, file=sys.stderr if quiet else sys.stdout, flush=True)

    def warn(m: str) -> None:
        # A child's exit, a restart, a give-up: diagnostics, on stderr; into the log while the
        # dashboard owns the terminal.
        print(m, file=log if args.tui and log is not None else sys.stderr, flush=True)

    cluster = SupervisedCluster(str(path), split, port=port, threads=args.threads, wire=args.wire,
                                config=args.config, log=log, keys_dir=args.keys,
                                stage_args=["--max-ram", args.max_ram] if args.max_ram else None)
    sup = Supervisor(cluster, split, args.standby, policy, warn, **({"stage_key": stage_key} if stage_key else {}))
    old_term = signal.signal(signal.SIGTERM, _raise_stop)
    # Ctrl-C stops the cluster even when a parent shell started us with SIGINT ignored (`dair up &`).
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sup.start()
        say(f"dair up: bus {cluster.addr} (pid {cluster.bus.pid}), stats {cluster.stats_addr}, model {path}")
        for s in sup.slots[1:]:
            say(f"dair up: {s.describe()}" + (f", key {s.secret_key}" if s.secret_key else ""))
        if log_path:
            say(f"dair up: logs in {log_path}")
        t0 = time.monotonic()
        from dair.bus.client import BusClient

        with BusClient(cluster.addr, timeout=5.0, keys=cluster.client_keys()) as c:
            c.wait_ready(args.timeout, alive=sup.check_started)
        sup.watch()
        say(f"dair up: ready in {time.monotonic() - t0:.1f}s — try: dair generate --bus {cluster.addr}"
            + (f" --keys {args.keys}" if args.keys else "") + " 'Hello'")
        if args.http:
            from dair.commands.serve import spawn_for_cluster

            spawn_for_cluster(cluster, args.http, path, args.keys, say)
        if args.generate is not None:
            return _generate_once(cluster.addr, args, cluster.client_keys())
        if args.tui:
            from dair.tui.app import run_tui

            code = run_tui(cluster.addr, keys=cluster.client_keys())
            if log_path:
                print(f"dair up: the cluster's log is in {log_path}", file=sys.stderr)
            return code
        say("dair up: Ctrl-C stops the cluster")
        while sup.fatal is None:
            time.sleep(0.5)
        raise DairError(f"{sup.fatal}; stopping the cluster")
    except (KeyboardInterrupt, _Stop):
        print("dair up: stopping", file=sys.stderr)
        return 0
    finally:
        # A second Ctrl-C or SIGTERM must not cut the shutdown short (children and ports left behind).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop()
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        if log is not None:
            log.close()


def _generate_once(addr: str, args: argparse.Namespace, keys: object = None) -> int:
    from dair.bus.client import BusClient

    params = {} if args.temperature is None else {"temperature": args.temperature}
    with BusClient(addr, timeout=300.0, keys=keys) as c:  # type: ignore[arg-type]
        prompt = {"text": args.generate} if args.raw else {"messages": [{"role": "user", "content": args.generate}]}
        for ev in c.generate(**prompt, params=params, max_tokens=args.max_tokens):
            if ev["type"] == "token":
                sys.stdout.write(ev["text"])
                sys.stdout.flush()
            else:
                t = ev["timings"]
                print()
                print(f"[{ev['n_prompt']} prompt tokens at {t['prefill_tok_s']:.1f} tok/s, {len(ev['ids'])} "
                      f"generated at {t['decode_tok_s']:.1f} tok/s, stop: {ev['stop']}]", file=sys.stderr)
    return 0
