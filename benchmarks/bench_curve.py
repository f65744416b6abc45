"""What CurveZMQ costs a message: round trips over TCP loopback, CURVE vs plain, in the same run
(alternated, median of three each).

An echo ROUTER (the bus's socket type) in a thread, a DEALER client; message sizes of a decode
step's activation (576 values: Q8_0 612 B, f32 2304 B) and of a prefill chunk (256 x 576 f32,
590 KB). Prints microseconds per round trip and the CURVE/plain ratio.

    python benchmarks/bench_curve.py [--n 3000] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import zmq

from dair.gatekeeper import Gatekeeper, server_socket_setup
from dair.security import client_socket_setup, generate_keys

SIZES = {"q8_0 decode (612 B)": 612, "f32 decode (2304 B)": 2304, "f32 prefill chunk (590 KB)": 256 * 576 * 4}


def _echo(sock: zmq.Socket, stop: threading.Event) -> None:
    while not stop.is_set():
        if sock.poll(50):
            sock.send_multipart(sock.recv_multipart(copy=False), copy=False)


def round_trip_us(curve: bool, size: int, n: int, keys: Path) -> float:
    ctx = zmq.Context()
    gate = None
    try:
        server = ctx.socket(zmq.ROUTER)
        client = ctx.socket(zmq.DEALER)
        if curve:
            gate = Gatekeeper(ctx, {"client": keys / "clients"})
            gate.start()
            server_socket_setup(server, keys / "bus/bus.key_secret")
            client_socket_setup(client, keys / "clients/c.key_secret", keys / "bus/bus.key")
        port = server.bind_to_random_port("tcp://127.0.0.1")
        client.connect(f"tcp://127.0.0.1:{port}")
        stop = threading.Event()
        t = threading.Thread(target=_echo, args=(server, stop), daemon=True)
        t.start()
        payload = b"\x5a" * size
        reps = max(20, n if size < 65536 else n // 20)
        for _ in range(20):  # handshake and warm-up
            client.send(payload)
            client.recv()
        samples = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(reps // 5):
                client.send(payload, copy=False)
                client.recv(copy=False)
            samples.append((time.perf_counter() - t0) / (reps // 5) * 1e6)
        stop.set()
        t.join()
        server.close(0)
        client.close(0)
        return statistics.median(samples)
    finally:
        if gate is not None:
            gate.stop()
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="round trips per small-message measurement")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp)
        generate_keys(keys / "bus", "bus")
        generate_keys(keys / "clients", "c")
        for name, size in SIZES.items():
            # Alternated, median of three each: other work on the machine comes and goes.
            runs: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(3):
                for curve_on in (False, True):
                    runs[curve_on].append(round_trip_us(curve_on, size, args.n, keys))
            plain, curve = statistics.median(runs[False]), statistics.median(runs[True])
            out[name] = {"plain_us": plain, "curve_us": curve, "ratio": curve / plain, "added_us": curve - plain}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"{'message':28} {'plain us/rt':>12} {'CURVE us/rt':>12} {'ratio':>7} {'added us':>9}")
    for name, r in out.items():
        print(f"{name:28} {r['plain_us']:>12.1f} {r['curve_us']:>12.1f} {r['ratio']:>6.2f}x {r['added_us']:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
