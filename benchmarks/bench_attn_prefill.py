"""Prefill attention alone (ops/attn.h) at the default model's shapes (9 query heads, 3 KV heads
of 64, f16 cache), one layer, as a long prompt's prefill calls it: `depth` positions in chunks of
256 rows, each chunk attending to every position before it.

    python benchmarks/bench_attn_prefill.py [--depths 2048,8000] [--threads 1,2] [--isa avx512,avx2]
                                            [--kv f16] [--reps 5] [--last] [--against OTHER_BUILD.so]

Prints, per (isa, threads, depth), the best time of `reps` runs and the time per (row, cached
position) pair, the unit in which attention's cost grows with the context, against the shortest
depth's. With --against (another build's compiled ops/attention*.so), that build runs too, its
runs alternating with this one's in the same process, and the ratio of the two best times is
printed: a shared machine's load moves single figures by 2x, a ratio measured side by side much
less.
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from types import ModuleType

import numpy as np


def setup(depth: int, kv: str) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    H, KV, hd = 9, 3, 64
    x = rng.standard_normal((2, depth, KV, hd)).astype(np.float32)
    k, v = (x[0], x[1]) if kv == "f32" else (x[0].astype(np.float16), x[1].astype(np.float16))
    q = rng.standard_normal((depth, H, hd)).astype(np.float32)
    return q, k, v, np.arange(depth, dtype=np.int32), np.empty_like(q)


def prefill(mod: ModuleType, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray, out: np.ndarray,
            last: bool) -> float:
    """Seconds of one layer's prefill attention over all of q's rows (last: only the last chunk's)."""
    t0 = time.perf_counter()
    for s in range(len(q) - 256 if last else 0, len(q), 256):
        mod.attention(q[s:s + 256], k, v, pos[s:s + 256], out=out[s:s + 256])
    return time.perf_counter() - t0


def pairs(depth: int, last: bool) -> float:
    """(row, cached position) pairs of a prefill to `depth` (last: of its last chunk of 256 rows)."""
    return 256 * (depth - 127.5) if last else depth * (depth + 1) / 2.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depths", default="2048,8000")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--isa", default="avx512,avx2")
    ap.add_argument("--kv", default="f16", choices=["f16", "f32"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--last", action="store_true",
                    help="time the last chunk of 256 rows only (shorter runs: more of them between bursts of load)")
    ap.add_argument("--against", default=None, help="another build's compiled attention extension (.so)")
    args = ap.parse_args()
    from dair.ops import attention as mine
    from dair.ops import threads

    mods = {"this": mine}
    if args.against:
        spec = importlib.util.spec_from_file_location("other.attention", args.against)
        other = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(other)
        mods["other"] = other
    depths = [int(d) for d in args.depths.split(",")]
    for isa in args.isa.split(","):
        for t in map(int, args.threads.split(",")):
            threads.set_num_threads(t)
            for m in mods.values():
                m.set_isa(isa)
            per_pair: dict[str, list[float]] = {name: [] for name in mods}
            for d in depths:
                data = setup(d, args.kv)
                best = {name: float("inf") for name in mods}
                for _ in range(args.reps):
                    for name, m in mods.items():  # the builds in turn: a burst of load slows both
                        best[name] = min(best[name], prefill(m, *data, args.last))
                for name in mods:
                    per_pair[name].append(best[name] / pairs(d, args.last))
                    line = (f"{name:5s} {isa:6s} {t} thr depth {d:>5}: {best[name] * 1e3:8.1f} ms, "
                            f"{best[name] / pairs(d, args.last) * 1e9:6.2f} ns/pair")
                    if d != depths[0]:
                        line += f" ({per_pair[name][-1] / per_pair[name][0]:.2f}x the per-pair cost at {depths[0]})"
                    print(line, flush=True)
                if "other" in best:
                    print(f"      {isa:6s} {t} thr depth {d:>5}: this / other time {best['this'] / best['other']:.3f}",
                          flush=True)


if __name__ == "__main__":
    main()
