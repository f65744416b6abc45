"""The attention kernel alone (ops/attn.h) at the default model's shapes (9 query heads, 3 KV
heads of 64), one layer:

    python benchmarks/bench_attention.py [--depth 2000] [--threads 1] [--isa avx512|avx2|c] [--kv f16,q8_0]

- prefill: `depth` positions in the backends' chunks of 256 rows (each chunk attends to all
  positions before it), as a long prompt's prefill calls it per layer;
- decode, cache in L3: one row at position depth - 1, the same cache again and again;
- decode, cache cold: 30 layers' caches in turn after a 64 MiB sweep, as a decode step finds them
  after streaming every other layer's weights.
Each figure is the best of several repetitions (a shared machine's bursts only slow runs down).

    python benchmarks/bench_attention.py --compare A.so B.so [...] [--threads 2] [--reps 40]

times decode at `depth` (cold and in L3) with each given build of the attention module
(`ops/attention*.so`, e.g. one built from an earlier commit), all loaded in one process and called
in turn within every repetition, so the machine's drift slows them alike; it prints the medians
and each build's median ratio to the first, and checks that they give the same bits. A build of
an earlier commit: `git worktree add /tmp/old REV && cd /tmp/old && python setup.py build_ext
--build-lib /tmp/old-lib` (Cython beside dair), then /tmp/old-lib/dair/ops/attention*.so.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np


def best_of(f, reps: int) -> float:
    b = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - t0)
    return b


def load_build(path: str, module: str = "attention", needs: str = "attention"):
    """A build of dair.ops.<module> from its .so (having `needs`), beside the installed one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"dair.ops.{module}", path)
    try:
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    except (ImportError, OSError, AttributeError) as e:
        raise SystemExit(f"{path}: not a build of dair's {module} module ({e})") from None
    if not hasattr(mod, needs):
        raise SystemExit(f"{path}: not a build of dair's {module} module (no {needs})")
    return mod


def compare(paths: list[str], depth: int, reps: int, kinds: list[str]) -> None:
    from dair.ops.wire import quantize_q8_0

    mods = [load_build(p) for p in paths]
    names = [Path(p).name for p in paths]
    rng = np.random.default_rng(0)
    H, KV, hd, L = 9, 3, 64, 30
    junk = np.ones(64 << 17)  # 64 MiB
    for kind in kinds:
        def cache(kind: str = kind) -> np.ndarray:
            x = rng.standard_normal((depth, KV, hd)).astype(np.float32)
            if kind == "f16":
                return x.astype(np.float16)
            if kind == "f32":
                return x
            out = np.empty((depth, KV, mods[0].q8_0_row_bytes(hd)), np.uint8)
            quantize_q8_0(x.reshape(depth, -1), out=out.reshape(-1))
            return out

        ks, vs = [cache() for _ in range(L)], [cache() for _ in range(L)]
        q1 = rng.standard_normal((1, H, hd)).astype(np.float32)
        p1 = np.array([depth - 1], np.int32)
        outs = [np.empty((1, H, hd), np.float32) for _ in mods]
        cold: list[list[float]] = [[] for _ in mods]
        warm: list[list[float]] = [[] for _ in mods]
        for _ in range(reps):
            for i, m in enumerate(mods):
                junk.sum()
                t0 = time.perf_counter()
                for j in range(L):
                    m.attention(q1, ks[j], vs[j], p1, out=outs[i])
                cold[i].append((time.perf_counter() - t0) / L * 1e6)
                t0 = time.perf_counter()
                for _ in range(20):
                    m.attention(q1, ks[0], vs[0], p1, out=outs[i])
                warm[i].append((time.perf_counter() - t0) / 20 * 1e6)
        same = all(np.array_equal(o, outs[0]) for o in outs[1:])
        for what, t in (("cold", cold), ("in L3", warm)):
            cells = [f"{names[0]} {statistics.median(t[0]):.1f} us"]
            for i in range(1, len(mods)):
                r = statistics.median(b / a for a, b in zip(t[0], t[i], strict=True))
                cells.append(f"{names[i]} {statistics.median(t[i]):.1f} us ({r:.3f}x)")
            print(f"{kind} decode at {depth}, {what}: " + ", ".join(cells), flush=True)
        print(f"{kind}: the builds' outputs are {'the same bits' if same else 'DIFFERENT'}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--isa", default=None, help="attention path (default: the best this CPU runs)")
    ap.add_argument("--kv", default="f16,q8_0")
    ap.add_argument("--compare", nargs="+", metavar="SO", help="builds of the attention module to time in turn")
    ap.add_argument("--reps", type=int, default=40, help="with --compare: repetitions")
    a = ap.parse_args()
    if a.compare:
        from dair.ops import threads as _threads

        _threads.set_num_threads(a.threads)
        compare(a.compare, a.depth, a.reps, a.kv.split(","))
        return
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
