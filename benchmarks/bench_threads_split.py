"""Where a decode step's time goes at one and at two threads, and how each part scales.

Every kernel call of the forward pass (the fused q/k/v and gate/up products, the down and output
projections, the head, attention, norms, rope, the activation) is timed on its way through Python;
the rest of the step is the Python between them. One and two threads alternate round by round in
the same process (the machine's load drifts), medians of the rounds, per decode step:

    python benchmarks/bench_threads_split.py [--model PATH] [--rounds 6] [--steps 48]
    python benchmarks/bench_threads_split.py --prefill 128 [--model PATH]

With --prefill N, each round times one prefill of N tokens (a fresh session) instead of the decode
steps, and the table is per prefill; each weight's GGUF type is listed first (which kernels the
rows are).

The timers add about a microsecond per call, which lands in the "python" row.
"""
from __future__ import annotations

import argparse
import collections
import statistics
import time
from typing import Any

import numpy as np

PARTS = ("qkv", "gate_up", "down", "wo", "head", "attention", "norm", "rope", "activation")


class _Timed:
    """A Weight whose matmul adds its time to `acc[name]`."""

    def __init__(self, w: Any, name: str, acc: dict[str, float]) -> None:
        self.w, self.name, self.acc = w, name, acc

    def matmul(self, x: np.ndarray, **kw: Any) -> np.ndarray:
        t = time.perf_counter()
        y = self.w.matmul(x, **kw)
        self.acc[self.name] += time.perf_counter() - t
        return y


def _wrap(fn: Any, name: str, acc: dict[str, float]) -> Any:
    def timed(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        r = fn(*a, **kw)
        acc[name] += time.perf_counter() - t
        return r
    return timed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model file (default: the fetched default model)")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--steps", type=int, default=48, help="decode steps per round and thread count")
    ap.add_argument("--prefill", type=int, default=0, metavar="N",
                    help="time a prefill of N tokens per round instead of decode steps")
    args = ap.parse_args(argv)

    import dair.engine.forward as F
    import dair.engine.kvcache as K
    from dair.backend import LocalBackend
    from dair.ops.threads import set_num_threads

    acc: dict[str, float] = collections.defaultdict(float)
    F.rmsnorm = _wrap(F.rmsnorm, "norm", acc)
    F.rope_inplace = _wrap(F.rope_inplace, "rope", acc)
    F.silu_mul = _wrap(F.silu_mul, "activation", acc)
    F.gelu_tanh_mul = _wrap(F.gelu_tanh_mul, "activation", acc)
    fused = F.matmul_many

    def matmul_many(ms: Any, h: np.ndarray, **kw: Any) -> Any:
        t = time.perf_counter()
        ys = fused(ms, h, **kw)
        acc["qkv" if len(ms) == 3 else "gate_up"] += time.perf_counter() - t
        return ys

    F.matmul_many = matmul_many
    K.SessionCache.attend = _wrap(K.SessionCache.attend, "attention", acc)
    b = LocalBackend(args.model, threads=2, quiet=True)
    e = b.engine
    kinds = collections.Counter((f, getattr(layer, f).qtype) for layer in e.layers
                                for f in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
                                if getattr(layer, f, None) is not None)
    head = f"; head {e.output.qtype}" if e.has_head else ""
    print("weights (layers): " + ", ".join(f"{f} {t} ({n})" for (f, t), n in sorted(kinds.items())) + head)
    for layer in e.layers:
        layer.wo, layer.w_down = _Timed(layer.wo, "wo", acc), _Timed(layer.w_down, "down", acc)
    e.output = _Timed(e.output, "head", acc)
    e.open_session("s")
    e.run_layers(e.embed(np.arange(8, dtype=np.int32)), [("s", np.arange(8, dtype=np.int32))])
    per: dict[int, dict[str, list[float]]] = {1: collections.defaultdict(list), 2: collections.defaultdict(list)}
    for _ in range(args.rounds):
        for threads in (1, 2):
            set_num_threads(threads)
            if args.prefill:
                ids = np.arange(100, 100 + args.prefill, dtype=np.int32) % e.vocab_size
                e.open_session("p")
                acc.clear()
                t0 = time.perf_counter()
                x = e.run_layers(e.embed(ids), [("p", np.arange(args.prefill, dtype=np.int32))])
                e.head(x[-1:])
                count = 1
                e.close_session("p")
            else:
                e.truncate_session("s", 8)
                acc.clear()
                t0 = time.perf_counter()
                for pos in range(8, 8 + args.steps):
                    x = e.run_layers(e.embed(np.array([5], np.int32)), [("s", np.array([pos], np.int32))])
                    e.head(x)
                count = args.steps
            step = (time.perf_counter() - t0) / count
            for k in PARTS:
                per[threads][k].append(acc.get(k, 0.0) / count * 1e6)
            per[threads]["step"].append(step * 1e6)
    med = {t: {k: statistics.median(v) for k, v in per[t].items()} for t in (1, 2)}
    for t in (1, 2):
        med[t]["python"] = med[t]["step"] - sum(med[t][k] for k in PARTS)
    what = f"per prefill of {args.prefill} tokens" if args.prefill else f"per decode step (context 8..{8 + args.steps})"
    print(f"{what}, medians of {args.rounds} rounds")
    print(f"{'part':12} {'1 thread us':>12} {'2 threads us':>13} {'scale':>6}")
    for k in ("step", *PARTS, "python"):
        a, c = med[1][k], med[2][k]
        print(f"{k:12} {a:12.0f} {c:13.0f} {a / c if c > 0 else 0.0:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
