"""A/B of two decode-step variants in one engine, alternating round by round (the machine's load
drifts; the ratio is the median of the rounds' ratios):

    python benchmarks/bench_decode_ab.py --variant prefetch [--rounds 12] [--steps 64] [--threads 2]
    python benchmarks/bench_decode_ab.py --variant store

- prefetch: the idle worker's read-ahead of the next matrices off (A) and on at 1 MiB (B);
- store: this step's keys and values written by numpy casts before the attention call (A, the
  previous code, f16 cache) and by the attention call itself (B, engine/kvcache.py).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("prefetch", "store"), required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import dair.engine.kvcache as K
    from dair.backend import LocalBackend
    from dair.ops.attention import attention
    from dair.ops.matmul import set_worker_prefetch
    from dair.ops.threads import set_num_threads

    b = LocalBackend(a.model, threads=a.threads, quiet=True, kv_type="f16")
    e = b.engine
    e.open_session("s")
    e.run_layers(e.embed(np.arange(8, dtype=np.int32)), [("s", np.arange(8, dtype=np.int32))])
    set_num_threads(a.threads)
    in_call = K.SessionCache.attend

    def numpy_store(self, j, q, k, v, pos, out, scale=None, window=0):
        lo, hi = int(pos[0]), int(pos[-1]) + 1
        self.k[j][lo:hi] = k
        self.v[j][lo:hi] = v
        attention(q, self.k[j], self.v[j], pos, out=out, scale=scale, window=window)

    def use(variant_b: bool) -> None:
        if a.variant == "prefetch":
            set_worker_prefetch(1 << 20 if variant_b else 0)
        else:
            K.SessionCache.attend = in_call if variant_b else numpy_store

    def step_us() -> float:
        e.truncate_session("s", 8)
        t0 = time.perf_counter()
        for pos in range(8, 8 + a.steps):
            x = e.run_layers(e.embed(np.array([5], np.int32)), [("s", np.array([pos], np.int32))])
            e.head(x)
        return (time.perf_counter() - t0) / a.steps * 1e6

    ra, rb = [], []
    for _ in range(a.rounds):
        use(False)
        ra.append(step_us())
        use(True)
        rb.append(step_us())
    use(True)
    print(f"{a.variant}, {a.threads} threads: A {statistics.median(ra):.0f} us, B {statistics.median(rb):.0f} us "
          f"per decode step; B/A {statistics.median([y / x for x, y in zip(ra, rb, strict=True)]):.3f} "
          f"(median of {a.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
