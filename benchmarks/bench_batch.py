"""Products of a few activation rows at once, as sessions decoding together make them on a stage:
the default model's 30 layers of Q4_1 matrices and its Q8_0 output head (96 MB, random values)
swept once per step with n = 1, 2, 3, 4 rows, so the weights stream from memory as in a decode
step. Prints milliseconds per sweep and each n's time against n = 1 (a perfectly memory-bound
kernel would take the same time for 4 rows as for 1).

    python benchmarks/bench_batch.py [--threads 2] [--rounds 15]
    python benchmarks/bench_batch.py --compare A.so B.so [...]   # builds of the matmul module

With --compare, each build (`ops/matmul*.so`, e.g. one built from an earlier commit) sweeps in
turn within every round, in one process; the ratios are each build's median ratio to the first,
and the outputs are checked to be the same bits (a build of an earlier commit: see
bench_attention.py).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
from bench_attention import load_build  # this folder: run as a script

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
ROWS = (1, 2, 3, 4)


def random_blocks(rng: np.random.Generator, rows: int, cols: int, qtype: str) -> np.ndarray:
    """Random Q4_1 / Q8_0 blocks with a fixed, moderate fp16 scale (and Q4_1 minimum)."""
    size = 20 if qtype == "Q4_1" else 34
    r = rng.integers(0, 255, size=(rows, cols // 32, size), dtype=np.uint8)
    r[:, :, 0:2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    if qtype == "Q4_1":
        r[:, :, 2:4] = np.frombuffer(np.float16(-0.08).tobytes(), np.uint8)
    return r.reshape(-1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--compare", nargs="+", metavar="SO", help="builds of the matmul module to time in turn")
    a = ap.parse_args()
    from dair.ops import matmul, threads

    threads.set_num_threads(a.threads)
    mods, names = [matmul], ["installed"]
    if a.compare:
        mods, names = [], []
        for p in a.compare:
            mods.append(load_build(p, "matmul", "Weight"))
            names.append(Path(p).name)
    rng = np.random.default_rng(0)
    layers = [[(random_blocks(rng, r, c, "Q4_1"), r, c) for r, c in SHAPES] for _ in range(30)]
    head = random_blocks(rng, 49152, 576, "Q8_0")
    weights = [[m.Weight(x, "Q4_1", r, c) for layer in layers for x, r, c in layer] + [m.Weight(head, "Q8_0", 49152, 576)]
               for m in mods]
    mb = sum(w.nbytes for w in weights[0]) / 1e6
    xs = {n: {c: rng.standard_normal((n, c)).astype(np.float32) for c in (576, 1536)} for n in ROWS}
    times = {(k, n): [] for k in range(len(mods)) for n in ROWS}
    last = {}
    for _ in range(a.rounds):
        for n in ROWS:
            for k in range(len(mods)):
                t0 = time.perf_counter()
                for w in weights[k]:
                    out = w.matmul(xs[n][w.cols])
                times[(k, n)].append((time.perf_counter() - t0) * 1e3)
                last[(k, n)] = out
    print(f"{mb:.1f} MB of weights per sweep, {a.threads} thread(s), medians of {a.rounds} rounds")
    for k, name in enumerate(names):
        one = statistics.median(times[(k, 1)])
        cells = [f"n={n} {statistics.median(times[(k, n)]):.2f} ms ({statistics.median(times[(k, n)]) / one:.2f}x n=1)"
                 for n in ROWS]
        print(f"{name}: " + ", ".join(cells))
    for k in range(1, len(mods)):
        for n in ROWS:
            r = statistics.median(b / x for x, b in zip(times[(0, n)], times[(k, n)], strict=True))
            same = np.array_equal(last[(k, n)], last[(0, n)])
            print(f"n={n}: {names[k]} {r:.3f}x the time of {names[0]}, {'the same bits' if same else 'DIFFERENT results'}")


if __name__ == "__main__":
    main()
