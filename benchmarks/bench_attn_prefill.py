"""Prefill attention alone (ops/attn.h) at the default model's shapes (9 query heads, 3 KV heads
of 64, f16 cache), one layer, as a long prompt's prefill calls it: `depth` positions in chunks of
256 rows, each chunk attending to every position before it.

    python benchmarks/bench_attn_prefill.py [--depths 2048,8000] [--threads 1,2] [--isa avx512,avx2]
                                            [--kv f16] [--reps 3] [--against OPS_DIR] [--rounds 3]

Prints, per (isa, threads, depth), the best time of `reps` runs and the time per (row, cached
position) pair, the unit in which attention's cost grows with the context, and the 8,000-token
figure against the 2,048 one. With --against DIR (a directory holding another build's compiled
ops/*.so), the same measures run for that build too, alternating with this one over `rounds`
rounds in separate processes, and the ratio of the two is printed per round: a shared machine's
load changes single figures, rarely a ratio measured side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np


def measure(isa: str, threads: int, depth: int, kv: str, reps: int) -> float:
    """Best seconds of one layer's prefill attention over `depth` positions."""
    from dair.ops import threads as th
    from dair.ops.attention import attention, set_isa

    th.set_num_threads(threads)
    set_isa(isa)
    rng = np.random.default_rng(0)
    H, KV, hd = 9, 3, 64
    x = rng.standard_normal((2, depth, KV, hd)).astype(np.float32)
    k, v = (x[0], x[1]) if kv == "f32" else (x[0].astype(np.float16), x[1].astype(np.float16))
    q = rng.standard_normal((depth, H, hd)).astype(np.float32)
    pos = np.arange(depth, dtype=np.int32)
    out = np.empty_like(q)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for s in range(0, depth, 256):
            attention(q[s:s + 256], k, v, pos[s:s + 256], out=out[s:s + 256])
        best = min(best, time.perf_counter() - t0)
    return best


def child(args: argparse.Namespace) -> None:
    if args.ops_dir:  # another build's extension modules in place of this checkout's
        import dair.ops

        dair.ops.__path__ = [args.ops_dir]
    res = {}
    for isa in args.isa.split(","):
        for t in map(int, args.threads.split(",")):
            for d in map(int, args.depths.split(",")):
                res[f"{isa}/{t}/{d}"] = measure(isa, t, d, args.kv, args.reps)
    print(json.dumps(res))


def run(args: argparse.Namespace, ops_dir: str) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--isa", args.isa, "--threads", args.threads,
           "--depths", args.depths, "--kv", args.kv, "--reps", str(args.reps), "--ops-dir", ops_dir]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def pairs(depth: int) -> float:
    return depth * (depth + 1) / 2.0


def show(name: str, res: dict[str, float], depths: list[int]) -> None:
    for key, sec in res.items():
        isa, t, d = key.split("/")
        line = f"{name} {isa:6s} {t} thr depth {d:>5}: {sec * 1e3:8.1f} ms, {sec / pairs(int(d)) * 1e9:6.2f} ns/pair"
        if int(d) != depths[0] and f"{isa}/{t}/{depths[0]}" in res:
            # the per-pair cost against the shortest depth's: 1.0 = attention grows only with the pairs
            base = res[f"{isa}/{t}/{depths[0]}"] / pairs(depths[0])
            line += f" ({sec / pairs(int(d)) / base:.2f}x the per-pair cost at {depths[0]})"
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="2048,8000")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--isa", default="avx512,avx2")
    ap.add_argument("--kv", default="f16", choices=["f16", "f32"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--against", default=None, help="another build's ops directory (compiled *.so)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ops-dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    depths = [int(d) for d in args.depths.split(",")]
    if not args.against:
        show("this", run(args, ""), depths)
        return
    for r in range(args.rounds):
        mine, theirs = run(args, ""), run(args, os.path.abspath(args.against))
        show(f"[{r}] this ", mine, depths)
        show(f"[{r}] other", theirs, depths)
        for key in mine:
            print(f"[{r}] {key}: this / other time {mine[key] / theirs[key]:.3f}")


if __name__ == "__main__":
    main()
