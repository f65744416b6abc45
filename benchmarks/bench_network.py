"""Network benchmark: a 3-stage cluster on loopback vs across network namespaces, as ratios
against the loopback baseline measured in the same run (these machines are shared and noisy).

Configurations (bus, 3 stages and the client each a process; the client is the same script,
tests/support/netns_client.py, in every case):

- `loopback`: everything on 127.0.0.1 in this namespace (the baseline);
- `netns`: bus, each stage and the client on hosts of their own (network namespaces joined by
  veth pairs to a bridge, tests/support/netns.py), no rate limit: what crossing a veth/bridge costs;
- `netns-1gbit`: the same with every host's link limited to 1 Gbit (`tbf rate 1gbit burst 64kb
  latency 50ms`);
- `netns-1gbit-1ms` ("namespaces, 1 Gbit + 1 ms delay"): the same plus 1 ms one-way delay on
  every connection to the bus. These kernels have no netem, so the delay is a relay in each
  stage's and the client's namespace (tests/support/delay_relay.py) that holds every chunk 1 ms in
  each direction: a hop (bus -> stage -> bus) should take about 2 ms longer;
- `netns-1gbit-relay0`: the same relays with no delay, which tells the relay's own cost
  (a Python copy on each crossing) apart from the 1 ms (`--no-relay0` leaves it out).

For each: decode tokens/s of one greedy session (median over rounds x runs), per-hop latency as
the bus sees it (bus -> stage -> bus, p50, averaged over the stages), the part of it that is
not the stage's compute ("added"), and the transport alone: a 612-byte ZeroMQ echo round trip
between the bus's host and another host (no model running; through that host's relay in the
relayed rows). Needs root and iproute2 for the namespace rows.

    python benchmarks/bench_network.py [--tokens 64] [--runs 3] [--rounds 2] [--wire q8_0] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.netns import (  # noqa: E402
    NetnsLab,
    cleanup_stale,
    client_command,
    start_dair_cluster,
    start_relay,
    unavailable_reason,
)

from dair.bus.local import LocalCluster, free_port_pair  # noqa: E402

SPLIT = [(0, 9), (10, 19), (20, 29)]
# Transport alone: ZeroMQ round trips of a Q8_0 decode activation (612 B) between two hosts.
ECHO = """
import sys, zmq
s = zmq.Context().socket(zmq.ROUTER); s.bind(sys.argv[1]); print("ready", flush=True)
while True:
    f = s.recv_multipart()
    if f[1] == b"bye": break
    s.send_multipart(f)
"""
PING = """
import sys, time, statistics, zmq
d = zmq.Context().socket(zmq.DEALER); d.connect(sys.argv[1]); msg = b"x" * 612
for _ in range(200): d.send(msg); d.recv()
out = []
for _ in range(7):
    t0 = time.perf_counter()
    for _ in range(300): d.send(msg); d.recv()
    out.append((time.perf_counter() - t0) / 300 * 1e6)
d.send(b"bye"); print(statistics.median(out))
"""
PROMPT_IDS = [1, 504, 3458, 282, 4649, 314]  # "The capital of France is" (SmolLM2)


def _parse(r: subprocess.CompletedProcess, where: str) -> dict[str, Any]:
    try:
        out = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        raise RuntimeError(f"{where}: client gave no JSON: {r.stderr[-2000:]}") from None
    if "error" in out:
        raise RuntimeError(f"{where}: {out['error']}")
    return out


def _echo_rtt(server: list[str], client: list[str], addr: str, client_addr: str | None = None) -> float:
    """Median microseconds per 612-byte ZeroMQ round trip (server and client given as prefixes;
    the client connects to `client_addr`, a relay's, if given)."""
    srv = subprocess.Popen(server + [sys.executable, "-c", ECHO, addr], stdout=subprocess.PIPE, text=True)
    try:
        assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
        r = subprocess.run(client + [sys.executable, "-c", PING, client_addr or addr], capture_output=True,
                           text=True, timeout=120)
        return float(r.stdout.strip())
    finally:
        try:
            srv.wait(10)  # it leaves on the client's "bye"
        except subprocess.TimeoutExpired:
            srv.kill()
            srv.wait()


def run_loopback(model: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    with LocalCluster(model, SPLIT, threads=args.threads, wire=args.wire, log=log) as c:
        r = subprocess.run(client_command(c.addr, PROMPT_IDS, args.tokens, args.runs, wait=120),
                           capture_output=True, text=True, timeout=600)
        out = _parse(r, "loopback")
    out["echo_rtt_us"] = _echo_rtt([], [], f"tcp://127.0.0.1:{free_port_pair()}")
    return out


def run_netns(model: str, args: argparse.Namespace, log: Any, rate: str | None,
              delay_ms: float | None = None) -> dict[str, Any]:
    """`delay_ms` None: no relays; 0: relays that add nothing (their own cost only)."""
    with NetnsLab(len(SPLIT) + 2, rate=rate) as lab:
        addr = start_dair_cluster(lab, model, SPLIT, wire=args.wire, threads=args.threads, log=log,
                                  delay_ms=delay_ms)
        r = lab.run(lab.hosts[-1], client_command(addr, PROMPT_IDS, args.tokens, args.runs, wait=120),
                    capture_output=True, text=True, timeout=600)
        out = _parse(r, f"netns (rate {rate}, delay {delay_ms})")
        lab.stop_processes()
        # Bus host to client host: the same path a hop takes (two veths, the bridge, two tbf, and
        # the relay of the far host when there are relays).
        bus, far = lab.hosts[0], lab.hosts[-1]
        client_addr = None
        if delay_ms is not None:
            start_relay(lab, far, [("127.0.0.1:5601", f"{bus.addr}:5601")], delay_ms, log)
            client_addr = "tcp://127.0.0.1:5601"
        out["echo_rtt_us"] = _echo_rtt(bus.exec_prefix(), far.exec_prefix(), f"tcp://{bus.addr}:5601", client_addr)
        return out


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    rates = [run["decode_tok_s"] for r in results for run in r["runs"]]
    hop = [statistics.mean(n["hop_ms_p50"] for n in r["nodes"]) for r in results]
    added = [statistics.mean(n["hop_ms_p50"] - n["compute_ms_p50"] for n in r["nodes"]) for r in results]
    ids = {tuple(run["ids"]) for r in results for run in r["runs"]}
    return {"decode_tok_s": statistics.median(rates), "decode_tok_s_all": rates,
            "hop_ms_p50": statistics.median(hop), "added_ms_per_hop": statistics.median(added),
            "bytes_per_token_hop": results[-1]["bytes_per_token_hop"], "distinct_outputs": len(ids),
            "echo_rtt_us": statistics.median(r["echo_rtt_us"] for r in results),
            "ids": list(next(iter(ids)))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model file (default: the fetched default model)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per measured generation")
    ap.add_argument("--runs", type=int, default=3, help="generations per cluster start")
    ap.add_argument("--rounds", type=int, default=2, help="cluster starts per configuration, interleaved")
    ap.add_argument("--threads", type=int, default=1, help="kernel threads per stage")
    ap.add_argument("--wire", default="q8_0", choices=["q8_0", "f16", "f32"])
    ap.add_argument("--delay-ms", type=float, default=1.0, help="one-way delay of the delayed configuration")
    ap.add_argument("--no-relay0", action="store_true", help="leave out the zero-delay relay configuration")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    args = ap.parse_args(argv)
    if args.model is None:
        from dair.model.fetch import default_model_path

        args.model = str(default_model_path())
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    cleanup_stale()
    reason = unavailable_reason()
    configs: dict[str, Any] = {"loopback": lambda log: run_loopback(args.model, args, log)}
    if reason:
        say(f"namespaces skipped: {reason}")
    else:
        configs["netns"] = lambda log: run_netns(args.model, args, log, None)
        configs["netns-1gbit"] = lambda log: run_netns(args.model, args, log, "1gbit")
        if not args.no_relay0:
            configs["netns-1gbit-relay0"] = lambda log: run_netns(args.model, args, log, "1gbit", 0.0)
        configs[f"netns-1gbit-{args.delay_ms:g}ms"] = lambda log: run_netns(args.model, args, log, "1gbit",
                                                                            args.delay_ms)
    raw: dict[str, list[dict[str, Any]]] = {k: [] for k in configs}
    log_path = Path(tempfile.gettempdir()) / "dair-bench-network.log"
    with open(log_path, "w", buffering=1) as log:
        # Interleaved rounds, so that a burst of load from other work hits every configuration.
        for i in range(args.rounds):
            for name, fn in configs.items():
                say(f"round {i + 1}/{args.rounds}: {name} ...")
                raw[name].append(fn(log))
    out: dict[str, Any] = {"wire": args.wire, "tokens": args.tokens, "threads": args.threads,
                           "delay": f"{args.delay_ms:g} ms one-way in the -ms row only, added by relays in the "
                                    "test transport (tests/support/delay_relay.py: no netem in the kernel)",
                           "netns_skipped": reason}
    out["configs"] = {k: summarize(v) for k, v in raw.items()}
    base = out["configs"]["loopback"]
    out["ratios"] = {k: {"decode_tok_s": v["decode_tok_s"] / base["decode_tok_s"],
                         "hop_ms_p50": v["hop_ms_p50"] / base["hop_ms_p50"],
                         "echo_rtt_us": v["echo_rtt_us"] / base["echo_rtt_us"]}
                     for k, v in out["configs"].items() if k != "loopback"}
    out["same_tokens_everywhere"] = len({tuple(v["ids"]) for v in out["configs"].values()}) == 1 and all(
        v["distinct_outputs"] == 1 for v in out["configs"].values())
    for v in out["configs"].values():
        del v["ids"]
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"\n3 stages, {args.wire} on the wire, {args.threads} thread(s) per stage, {args.tokens} tokens, "
          f"delay only in the -{args.delay_ms:g}ms row (relays, tests/support/delay_relay.py)")
    print(f"{'config':18} {'decode tok/s':>12} {'hop p50 ms':>11} {'added ms/hop':>13} {'B/token/hop':>12}"
          f" {'echo rtt us':>12} {'tok/s vs lo':>12} {'hop vs lo':>10} {'rtt vs lo':>10}")
    for k, v in out["configs"].items():
        r = out["ratios"].get(k, {"decode_tok_s": 1.0, "hop_ms_p50": 1.0, "echo_rtt_us": 1.0})
        print(f"{k:18} {v['decode_tok_s']:>12.1f} {v['hop_ms_p50']:>11.2f} {v['added_ms_per_hop']:>13.2f} "
              f"{v['bytes_per_token_hop']:>12.0f} {v['echo_rtt_us']:>12.1f} {r['decode_tok_s']:>11.2f}x "
              f"{r['hop_ms_p50']:>9.2f}x {r['echo_rtt_us']:>9.2f}x")
    print(f"same greedy tokens in every configuration: {out['same_tokens_everywhere']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
