"""What the pipeline's topology costs with no dair code in it: the floor under bench_pipeline.

A broker (ROUTER) sends each token's step to 1 or N stage processes (DEALER) in turn over TCP on
loopback, each stage busy-waits its share of the token's compute and answers with an
activation-sized frame, as dair's bus and stages do with real work. The ratio of N stages to one
is the best `bench_pipeline.py`'s "3 stages vs 1 stage" can be on this machine for the same
compute per token; the time per hop is what ZeroMQ, the kernel and the scheduler take.

    python benchmarks/bench_zmq_floor.py [--work-ms 3.6] [--stages 3] [--tokens 1000]

It also times, warm in a loop, what dair's own hop adds to each message: encoding and decoding
(with every check) a one-token `act` of the default model's width in Q8_0 (dair.bus.protocol).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time

import zmq


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _stage(addr: str, work_s: float) -> None:
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.connect(addr)
    d.send(b"hello")
    while True:
        frames = d.recv_multipart()
        if frames[0] == b"stop":
            return
        _spin(work_s)
        d.send_multipart(frames)


def token_time(n_stages: int, work_s: float, tokens: int) -> float:
    """Median seconds per token through n_stages stages sharing work_s of compute."""
    ctx = zmq.Context.instance()
    r = ctx.socket(zmq.ROUTER)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    procs = [mp.Process(target=_stage, args=(f"tcp://127.0.0.1:{port}", work_s / n_stages), daemon=True)
             for _ in range(n_stages)]
    for p in procs:
        p.start()
    ids = [r.recv_multipart()[0] for _ in procs]
    payload = bytes(612)  # a Q8_0 row of the default model's 576 values
    times = []
    for _ in range(tokens):
        t0 = time.perf_counter()
        for ident in ids:
            r.send_multipart([ident, b"act", payload])
            r.recv_multipart()
        times.append(time.perf_counter() - t0)
    for ident in ids:
        r.send_multipart([ident, b"stop"])
    for p in procs:
        p.join(5)
    r.close(linger=0)
    return statistics.median(times)


def codec_us(n: int = 20000) -> tuple[float, float]:
    """Microseconds to encode and to decode-and-check a one-token Q8_0 `act`, warm."""
    import timeit

    import numpy as np

    from dair.bus import protocol as P
    from dair.bus import wire

    step = P.Step(sid="abcd1234abcd", pos=100, ids=[1234], step_id=98765, out="none")
    y = np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)

    def enc() -> list:
        return P.encode({"type": P.ACT, "layer": 10, "dtype": "q8_0", "shape": [1, 576], "segs": [step],
                         "ct": 0.001}, [wire.pack(y, "q8_0")])

    frames = enc()
    best = [min(timeit.repeat(f, number=n, repeat=5)) / n * 1e6 for f in (enc, lambda: P.decode(frames))]
    return best[0], best[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-ms", type=float, default=3.6,
                    help="compute per token (default: about the default model's one-stage decode here)")
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1000, help="tokens per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians)")
    args = ap.parse_args(argv)
    work = args.work_ms / 1e3
    one, many = [], []
    for _ in range(args.rounds):
        one.append(token_time(1, work, args.tokens))
        many.append(token_time(args.stages, work, args.tokens))
    t1, tn = statistics.median(one), statistics.median(many)
    print(f"compute {args.work_ms:.2f} ms per token; 1 stage {t1 * 1e3:.3f} ms, {args.stages} stages {tn * 1e3:.3f} ms")
    print(f"per hop (a stage's answer to the next stage's step): {(tn - t1) / (args.stages - 1) * 1e6:.0f} us")
    print(f"{args.stages} stages vs 1 stage, the floor for this compute: {t1 / tn:.2f}x")
    e, d = codec_us()
    print(f"dair's act message, warm: encode {e:.1f} us, decode with its checks {d:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
