"""The attention kernel alone (ops/attn.h) at the default model's shapes (9 query heads, 3 KV
heads of 64), one layer:

    python benchmarks/bench_attention.py [--depth 2000] [--threads 1] [--isa avx512|avx2|c] [--kv f16,q8_0]

- prefill: `depth` positions in the backends' chunks of 256 rows (each chunk attends to all
  positions before it), as a long prompt's prefill calls it per layer;
- decode, cache in L3: one row at position depth - 1, the same cache again and again;
- decode, cache cold: 30 layers' caches in turn after a 64 MiB sweep, as a decode step finds them
  after streaming every other layer's weights.
Each figure is the best of several repetitions (a shared machine's bursts only slow runs down).
"""
from __future__ import annotations

import argparse
import time

import numpy as np


def best_of(f, reps: int) -> float:
    b = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - t0)
    return b


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--isa", default=None, help="attention path (default: the best this CPU runs)")
    ap.add_argument("--kv", default="f16,q8_0")
    a = ap.parse_args()
    from dair.ops import threads
    from dair.ops.attention import attention, get_isa, q8_0_row_bytes, set_isa
    from dair.ops.wire import quantize_q8_0

    threads.set_num_threads(a.threads)
    if a.isa:
        set_isa(a.isa)
    rng = np.random.default_rng(0)
    H, KV, hd, d, L = 9, 3, 64, a.depth, 30

    def cache(kind: str) -> np.ndarray:
        x = rng.standard_normal((d, KV, hd)).astype(np.float32)
        if kind == "f32":
            return x
        if kind == "f16":
            return x.astype(np.float16)
        out = np.empty((d, KV, q8_0_row_bytes(hd)), np.uint8)
        quantize_q8_0(x.reshape(d, -1), out=out.reshape(-1))
        return out

    print(f"attention {get_isa()}, {a.threads} thread(s), depth {d}")
    q = rng.standard_normal((d, H, hd)).astype(np.float32)
    pos = np.arange(d, dtype=np.int32)
    junk = np.ones(64 << 17)  # 64 MiB
    def measure(kind: str) -> str:
        ks, vs = [cache(kind) for _ in range(L)], [cache(kind) for _ in range(L)]
        q1, p1, out = q[-1:].copy(), pos[-1:].copy(), np.empty((1, H, hd), np.float32)

        def prefill() -> None:
            for s in range(0, d, 256):
                attention(q[s:s + 256], ks[0], vs[0], pos[s:s + 256])

        def warm() -> None:
            for _ in range(20):
                attention(q1, ks[0], vs[0], p1, out=out)

        def cold() -> float:
            junk.sum()
            t0 = time.perf_counter()
            for j in range(L):
                attention(q1, ks[j], vs[j], p1, out=out)
            return (time.perf_counter() - t0) / L

        return (f"{kind}: prefill {best_of(prefill, 5) * 1e3:.1f} ms; decode {best_of(warm, 20) / 20 * 1e6:.1f} us "
                f"(cache in L3), {min(cold() for _ in range(12)) * 1e6:.1f} us (cold)")

    for kind in a.kv.split(","):
        print(measure(kind), flush=True)

if __name__ == "__main__":
    main()
