"""`dair up`: a cluster on this machine (one dair-bus, N dair-stage processes) until Ctrl-C.

With --generate PROMPT it answers one prompt on the fresh cluster and stops it again: the
README's main command. Every child is stopped on Ctrl-C, SIGTERM or any error (no orphans).
"""
from __future__ import annotations

import argparse
import os
import signal
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


def handle(args: argparse.Namespace) -> int:
    from dair.bus.local import LocalCluster, even_split, parse_split
    from dair.config import load_config
    from dair.model import open_model
    from dair.model.fetch import resolve_model_path

    cfg = load_config(args.config)
    path = resolve_model_path(args.model, cfg)
    if not os.path.exists(path):
        raise DairError(f"{path}: model file not found (run `dair model fetch`)")
    n_layers = open_model(path).config.n_layers
    if args.split:
        split = parse_split(args.split)
    elif cfg.get("stages") and args.stages is None:
        split = parse_split(",".join(s["layers"] for s in cfg["stages"]))
    else:
        split = even_split(n_layers, args.stages or 3)
    bad = [f"{a}-{b}" for a, b in split if not 0 <= a <= b < n_layers]
    if bad:
        raise DairError(f"layer range(s) {', '.join(bad)} outside the model's layers 0-{n_layers - 1}")
    port = args.port or urlparse(cfg["bus"]["bind"]).port
    if args.tui and not (sys.stdin.isatty() and sys.stdout.isatty()):
        # Scripts and CI run the README's main command too: without a terminal the dashboard
        # cannot draw, so show the same pipeline answering one question instead.
        print("dair up: no terminal for the dashboard; answering one question instead", file=sys.stderr)
        args.tui = False
        if args.generate is None:
            args.generate = NO_TTY_QUESTION
    quiet = args.generate is not None or args.tui
    log_path = args.log or (os.path.join(tempfile.gettempdir(), f"dair-up-{os.getpid()}.log") if quiet else None)
    log = open(log_path, "a", buffering=1) if log_path else None  # noqa: SIM115 - lives as long as the cluster
    if args.keys:
        from dair.security import make_cluster_keys

        make_cluster_keys(args.keys)
    cluster = LocalCluster(path, split, port=port, threads=args.threads, wire=args.wire, config=args.config,
                           log=log, keys_dir=args.keys, standby=max(0, args.standby),
                           stage_args=["--max-ram", args.max_ram] if args.max_ram else None)
    old_term = signal.signal(signal.SIGTERM, _raise_stop)
    try:
        cluster.start()
        say = (lambda m: print(m, file=sys.stderr)) if quiet else print
        say(f"dair up: bus {cluster.addr} (pid {cluster.bus.pid}), stats {cluster.stats_addr}, model {path}")
        for (a, b), p in zip(split, cluster.stages, strict=False):
            say(f"dair up: stage layers {a}-{b} (pid {p.pid})")
        for p in cluster.stages[len(split):]:
            say(f"dair up: standby stage (pid {p.pid})")
        if log_path:
            say(f"dair up: logs in {log_path}")
        t0 = time.monotonic()
        cluster.wait_ready(args.timeout)
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
        while True:
            time.sleep(0.5)
            dead = [p for p in cluster.procs if p.poll() is not None]
            if cluster.bus.poll() is not None:
                raise DairError(f"the bus exited (status {cluster.bus.returncode})")
            for p in dead:
                if not getattr(p, "_reported", False):
                    p._reported = True  # type: ignore[attr-defined]
                    print(f"dair up: process {p.pid} ({' '.join(p.args[-8:])}) exited with status {p.returncode}",
                          file=sys.stderr)
    except (KeyboardInterrupt, _Stop):
        print("dair up: stopping", file=sys.stderr)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        cluster.stop()
        signal.signal(signal.SIGTERM, old_term)
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
