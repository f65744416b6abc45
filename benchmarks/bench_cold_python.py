"""What a pipeline hop's own Python costs when it runs cold, as it does in a pipeline.

A stage's code for one message (decode and check a one-token `act`, unpack its Q8_0 rows, pack
and encode the answer: dair.bus.protocol and dair.bus.wire, as a middle stage runs them) is timed
in one process under the conditions a hop meets it:

- warm: the same code just ran (back to back), the figure a microbenchmark gives;
- after a decode step: this process has just run its layer range (the weights streamed through
  the caches), as the stage that computed before answering;
- after sleeping: the process slept while others computed (a stage waiting for its next message,
  the bus between two steps); on a virtual machine an idle vCPU's caches do not survive that.

    python benchmarks/bench_cold_python.py [--layers 10-19] [--rounds 5] [--reps 40]

Medians of interleaved rounds, each condition's time and its ratio to warm. bench_pipeline.py's
hop overhead is made of many such pieces (the stage's, the bus's, ZeroMQ's calls), and each pays
this factor, not its warm cost.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model file (default: the fetched default model)")
    ap.add_argument("--layers", default="10-19", help="the stage's layer range")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=40, help="timed messages per condition and round")
    args = ap.parse_args(argv)

    from dair.bus import protocol as P
    from dair.bus import wire
    from dair.engine.forward import RangeEngine
    from dair.model import open_model
    from dair.model.fetch import default_model_path

    first, last = (int(v) for v in args.layers.split("-"))
    model = open_model(args.model or str(default_model_path()))
    e = RangeEngine(model, first, last, threads=args.threads, kv_type="f16", max_context=4096)
    e.open_session("s")
    dim = e.dim
    x = np.random.default_rng(0).standard_normal((1, dim)).astype(np.float32)
    step = P.Step(sid="0123456789ab", pos=100, ids=[1234], step_id=98765, out="none")
    frames = P.encode({"type": P.ACT, "layer": first, "dtype": "q8_0", "shape": [1, dim], "segs": [step],
                       "ct": 0.001}, [wire.pack(x, "q8_0")])

    def hop() -> float:
        t0 = time.perf_counter()
        h, bufs = P.decode(frames)
        rows = wire.unpack(bufs[0], h["dtype"], h["shape"][0], h["shape"][1])
        P.encode({"type": P.ACT, "layer": last + 1, "dtype": "q8_0", "shape": [1, dim], "segs": h["segs"],
                  "ct": 0.001}, [wire.pack(rows, "q8_0")])
        return time.perf_counter() - t0

    pos = [0]

    def decode_step() -> None:
        if pos[0] >= 4000:
            e.truncate_session("s", 0)
            pos[0] = 0
        e.run_layers(x, [("s", np.array([pos[0]], np.int32))])
        pos[0] += 1

    conditions = {
        "warm": lambda: None,
        f"after a decode step of layers {first}-{last}": decode_step,
        "after sleeping 0.1 ms": lambda: time.sleep(1e-4),
        "after sleeping 1 ms": lambda: time.sleep(1e-3),
        "after sleeping 3 ms": lambda: time.sleep(3e-3),
    }
    for _ in range(20):
        decode_step()
        hop()
    res: dict[str, list[float]] = {k: [] for k in conditions}
    for r in range(args.rounds):
        names = list(conditions) if r % 2 == 0 else list(conditions)[::-1]
        for name in names:
            before = conditions[name]
            ts = []
            for _ in range(args.reps):
                before()
                ts.append(hop())
            res[name].append(statistics.median(ts) * 1e6)
    warm = statistics.median(res["warm"])
    print(f"one middle-stage message's codec (decode + checks + Q8_0 unpack, pack + encode), {args.threads} "
          f"kernel threads, medians of {args.rounds} rounds x {args.reps}:")
    for name, v in res.items():
        m = statistics.median(v)
        print(f"  {name:40} {m:7.1f} us  {m / warm:5.2f}x warm")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
