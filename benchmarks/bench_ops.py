"""Micro-benchmark of dair.ops matrix products on SmolLM2-135M's shapes.

    python benchmarks/bench_ops.py [--threads 1,2] [--prefill 128] [--quick] [--kernels avx512,avx2]
    python benchmarks/bench_ops.py --types Q4_0,Q4_K,Q6_K [--kernels avx512,avx2,scalar] [--prefill 128]
    python benchmarks/bench_ops.py --types all     # every weight type, each against Q4_0

Every run first prints the dispatch table: which kernel family serves each weight type on this
CPU (dair.ops.matmul.kernel_table). With --types, a 4096 x 4096 matrix-vector product per type,
timed in interleaved rounds, and its time relative to Q4_0's in the same run.
    python benchmarks/bench_ops.py --families [--threads 1,2]   # each family's layer vs llama's

Per shape: microseconds per call and GB/s of weight bytes read, for the
matrix-vector product (n=1, decode) and an n-row product (prefill), against
numpy float32 `x @ W.T` on the dequantized matrix measured in the same run.
A single matrix called in a loop stays in cache, so the "decode sweep" also
runs every matrix of the 30 layers plus the output head once per token, like a
real decode step whose 96 MB of weights stream from memory: that is the
number to compare with llama.cpp (~101 tok/s at 2 threads, about 9.9 ms/token
for everything, of which these products are most).

The machines are shared: the load average is printed first, times are the best
of several repeats, and the worker pool's counters (dair.ops.threads.pool_stats)
say at the end how often the second thread actually took part.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from dair.ops import threads
from dair.ops.matmul import (
    BLOCK_LAYOUTS,
    KERNELS,
    Weight,
    get_kernels,
    kernel_ops,
    kernel_table,
    set_kernels,
    simd_name,
)

# (name, rows, cols, qtype): one layer of SmolLM2-135M, then the tied output head.
LAYER = [
    ("attn_q", 576, 576, "Q4_1"),
    ("attn_k", 192, 576, "Q4_1"),
    ("attn_v", 192, 576, "Q4_1"),
    ("attn_output", 576, 576, "Q4_1"),
    ("ffn_gate", 1536, 576, "Q4_1"),
    ("ffn_up", 1536, 576, "Q4_1"),
    ("ffn_down", 576, 1536, "Q4_1"),
]
HEAD = ("output", 49152, 576, "Q8_0")
N_LAYERS = 30


# Byte offsets of the fp16 scales in each type's block: set to small values so products stay finite.
F16_FIELDS = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "IQ4_NL": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208], "IQ4_XS": [0]}
ALL_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS",
             "F16", "BF16", "F32"]


def random_weight(rng: np.random.Generator, qtype: str, rows: int, cols: int) -> Weight:
    """Random but valid blocks, written directly (quantizing 28M values in numpy would take long)."""
    if qtype in ("F32", "F16", "BF16"):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        raw = x.astype(np.float16).view(np.uint8) if qtype == "F16" else x.view(np.uint8)
        if qtype == "BF16":
            raw = np.ascontiguousarray(x.view(np.uint16)[:, 1::2]).view(np.uint8)  # high halves (little-endian)
        return Weight(np.ascontiguousarray(raw).reshape(-1), qtype, rows, cols)
    bv, bb = BLOCK_LAYOUTS[qtype]
    nb = cols // bv
    raw = rng.integers(0, 256, size=(rows, nb, bb), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        raw[..., off:off + 2] = np.full((rows, nb, 1), 0.001, np.float16).view(np.uint8)
    return Weight(np.ascontiguousarray(raw).reshape(-1), qtype, rows, cols)


def print_dispatch_table() -> None:
    """Which kernel family runs each weight type's products, for each family this CPU offers."""
    tables = {k: kernel_table(k) for k in KERNELS}
    print(f"dispatch table (rows: weight type; columns: selected family; cell: kernel that runs), "
          f"CPU best: {simd_name()}")
    print(f"  {'type':<7}" + "".join(f"{k:>9}" for k in KERNELS))
    for qt in tables[KERNELS[0]]:
        print(f"  {qt:<7}" + "".join(f"{tables[k][qt]:>9}" for k in KERNELS))
    # where a family runs another family's kernel for one operation (ops/rows16_avx512.h's table)
    for k in KERNELS:
        for qt, op in kernel_ops(k).items():
            if op["decode"] != op["prefill"]:
                print(f"  {k} family, {qt}: decode runs the {op['decode']} kernel, prefill the {op['prefill']} one")


def dequantized(w: Weight) -> np.ndarray:
    return w.get_rows(np.arange(w.rows, dtype=np.int32))


def time_call(fn, min_time: float = 0.15, repeats: int = 5) -> float:
    """Best-of-`repeats` seconds per call, each repeat looping for at least min_time."""
    fn()
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    loops = max(1, int(min_time / repeats / one))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(loops):
            fn()
        best = min(best, (time.perf_counter() - t0) / loops)
    return best


def bench_shapes(rng, thread_counts, n_prefill, quick):
    print(f"instruction set: {simd_name()}; times are best of 5, weights cache-warm")
    hdr = f"{'shape':<24}{'MB':>7} | " + " | ".join(
        f"t={t}: {'dair us':>8} {'GB/s':>6} {'numpy us':>9}" for t in thread_counts
    )
    for n in (1, n_prefill):
        print(f"\n-- n = {n} ({'decode matvec' if n == 1 else 'prefill'}) --")
        print(hdr)
        for name, rows, cols, qt in [*LAYER, HEAD]:
            if quick and rows * cols > 2_000_000 and n > 1:
                continue
            w = random_weight(rng, qt, rows, cols)
            wd = dequantized(w)
            x = rng.standard_normal((n, cols)).astype(np.float32)
            out = np.empty((n, rows), np.float32)
            cells = []
            for t in thread_counts:
                threads.set_num_threads(t)
                dt = time_call(lambda w=w, x=x, out=out: w.matmul(x, out=out))
                dt_np = time_call(lambda wd=wd, x=x: x @ wd.T)
                cells.append(f"{'':4}{dt * 1e6:8.1f} {w.nbytes / dt / 1e9:6.1f} {dt_np * 1e6:9.1f}")
            label = f"{name} {rows}x{cols} {qt}"
            print(f"{label:<24}{w.nbytes / 1e6:7.2f} | " + " | ".join(cells))


def bench_sweep(rng, thread_counts, n_tokens):
    """Every product of a decode step over distinct matrices, so weights come from memory."""
    layers = [[random_weight(rng, qt, r, c) for _, r, c, qt in LAYER] for _ in range(N_LAYERS)]
    head = random_weight(rng, HEAD[3], HEAD[1], HEAD[2])
    total = sum(w.nbytes for ws in layers for w in ws) + head.nbytes
    x576 = rng.standard_normal((1, 576)).astype(np.float32)
    x1536 = rng.standard_normal((1, 1536)).astype(np.float32)
    outs = {r: np.empty((1, r), np.float32) for r in (192, 576, 1536, 49152)}

    def step():
        for ws in layers:
            for w in ws:
                w.matmul(x1536 if w.cols == 1536 else x576, out=outs[w.rows])
        head.matmul(x576, out=outs[49152])

    print(f"\n-- decode sweep: {N_LAYERS} layers + head, {total / 1e6:.1f} MB of weights per token --")
    for t in thread_counts:
        threads.set_num_threads(t)
        step()
        times = []
        for _ in range(n_tokens):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        med = float(np.median(times))
        print(
            f"t={t}: {med * 1e3:6.2f} ms/token (median of {n_tokens}), {total / med / 1e9:5.1f} GB/s, "
            f"{1 / med:6.1f} tokens/s if products were all"
        )


def bench_types(rng, qtypes, n_prefill, rounds, rows=4096, cols=4096):
    """One rows x cols matrix per type, 1 thread: matrix-vector us and GB/s, best of `rounds`
    interleaved rounds (so a noisy neighbour hits every type alike), and the ratio to Q4_0 measured
    in the same rounds. Weights stay cache-warm or not depending on the machine's L3; all types are
    measured the same way. With n_prefill > 1, an n_prefill-row product as well."""
    threads.set_num_threads(1)
    if "Q4_0" not in qtypes:
        qtypes = ["Q4_0", *qtypes]
    x = rng.standard_normal((1, cols)).astype(np.float32)
    xp = rng.standard_normal((n_prefill, cols)).astype(np.float32)
    ws = {qt: random_weight(rng, qt, rows, cols) for qt in qtypes}
    ops = kernel_ops(get_kernels())  # the kernel column: the decode product's (the prefill's may differ, see above)
    best = {qt: float("inf") for qt in qtypes}
    best_p = {qt: float("inf") for qt in qtypes}
    for _ in range(rounds):
        for qt, w in ws.items():
            best[qt] = min(best[qt], time_call(lambda w=w: w.matmul(x), min_time=0.04, repeats=2))
            if n_prefill > 1:
                best_p[qt] = min(best_p[qt], time_call(lambda w=w: w.matmul(xp), min_time=0.05, repeats=1))
    print(f"\n{rows} x {cols} matrix-vector product, 1 thread, best of {rounds} interleaved rounds")
    head = f"  {'type':<7}{'kernel':>8}{'MB':>8}{'us':>10}{'GB/s':>7}{'x Q4_0':>8}"
    if n_prefill > 1:
        head += f"{f'n={n_prefill} us/row':>16}{'x Q4_0':>8}"
    print(head)
    for qt, w in ws.items():
        line = (f"  {qt:<7}{ops[qt]['decode']:>8}{w.nbytes / 1e6:8.2f}{best[qt] * 1e6:10.1f}{w.nbytes / best[qt] / 1e9:7.1f}"
                f"{best[qt] / best['Q4_0']:8.2f}")
        if n_prefill > 1:
            line += f"{best_p[qt] * 1e6 / n_prefill:16.1f}{best_p[qt] / best_p['Q4_0']:8.2f}"
        print(line)


def bench_families(thread_counts, n_tokens):
    """One decode step of each family's layer (RangeEngine over a synthetic 2-layer file of the
    same widths), against llama's layer measured in the same run: what the family's extra steps
    cost (q/k/v biases, q/k norms and the NEOX reorder, GELU, post-norms, the MoE router and
    its chosen experts)."""
    import tempfile
    from dataclasses import replace

    from dair.engine.forward import RangeEngine
    from dair.model import open_model
    from dair.model.synth import Shape, write_synth

    # 8 layers: ~100 MB of dense weights, more than the caches, so every family reads from memory.
    # The MoE shapes' chosen experts add up to the dense FFN's width (the same bytes per token).
    base = Shape(1024, 2816, 8, 16, 4, 512, 4096, 1e6, 1e-6)
    shapes = {
        "llama": base,
        "qwen2": replace(base, arch="qwen2"),
        "qwen3": replace(base, arch="qwen3"),
        "gemma3": replace(base, arch="gemma3", sliding_window=512),
        "mixtral 2 of 8": replace(base, n_experts=8, n_experts_used=2, expert_hidden_dim=1408),
        "qwen3moe 4 of 16": replace(base, arch="qwen3moe", n_experts=16, n_experts_used=4, expert_hidden_dim=704),
    }
    print(f"\n-- family layers: decode step per layer, dim {base.dim}, FFN {base.hidden_dim}, Q8_0; "
          f"best of {n_tokens} steps, families interleaved --")
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        for name, shp in shapes.items():
            mf = open_model(write_synth(f"{tmp}/{name.split()[0]}.gguf", shp, "q8_0", seed=1))
            engines[name] = RangeEngine(mf, 0, shp.n_layers - 1)
        for t in thread_counts:
            threads.set_num_threads(t)
            best = dict.fromkeys(engines, float("inf"))
            for eng in engines.values():
                eng.open_session("b")
            for p in range(n_tokens + 3):  # 3 warm-up steps fault the weights in
                for name, eng in engines.items():
                    x = eng.embed(np.array([1 + p], np.int32))
                    t0 = time.perf_counter()
                    eng.run_layers(x, [("b", np.array([p], np.int32))])
                    if p >= 3:
                        best[name] = min(best[name], (time.perf_counter() - t0) / eng.n_layers)
            for name, eng in engines.items():
                eng.close_session("b")
                shp, w = shapes[name], eng.layers[0]
                mb = w.nbytes() / 1e6
                if w.router is not None:  # only the chosen experts' bytes are read per token
                    mb = (w.nbytes() - sum(m.nbytes for m in w.gate_exps + w.up_exps + w.down_exps)
                          * (1 - shp.n_experts_used / shp.n_experts)) / 1e6
                print(f"t={t}: {name:<17} {best[name] * 1e6:8.1f} us/layer ({best[name] / best['llama']:4.2f}x llama), "
                      f"{mb:6.2f} MB read per token")
        for eng in engines.values():
            eng.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--prefill", type=int, default=128, help="rows of the prefill product")
    ap.add_argument("--tokens", type=int, default=30, help="decode-sweep steps")
    ap.add_argument("--quick", action="store_true", help="skip the prefill product of the output head")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of --types (best of)")
    ap.add_argument("--kernels", default=KERNELS[0], help=f"comma-separated families of {KERNELS}")
    ap.add_argument("--types", default="", help="only a 4096 x 4096 product per type, e.g. Q4_0,Q4_K,Q6_K, "
                    "or 'all'")
    ap.add_argument("--families", action="store_true", help="only the family layers (qwen, gemma3, MoE)")
    args = ap.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    print(f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())} on {os.cpu_count()} CPUs")
    print_dispatch_table()
    types = ALL_TYPES if args.types == "all" else [t for t in args.types.split(",") if t]
    old, old_k = threads.get_num_threads(), KERNELS[0]
    try:
        for k in args.kernels.split(","):
            set_kernels(k)
            print(f"\n==== quantized kernels: {k} ====")
            rng = np.random.default_rng(0)
            if types:
                bench_types(rng, types, args.prefill, args.rounds)
                continue
            if not args.families:
                if not args.sweep_only:
                    bench_shapes(rng, thread_counts, args.prefill, args.quick)
                bench_sweep(rng, thread_counts, args.tokens)
        if not args.types and not args.sweep_only:
            bench_families(thread_counts, args.tokens)
    finally:
        threads.set_num_threads(old)
        set_kernels(old_k)
    st = threads.pool_stats()
    print(
        f"\npool: {st['jobs']} parallel jobs, {st['serial_jobs']} run alone (solo after a stalled or absent "
        f"worker: {st['solo_periods']} times), workers ran {st['worker_chunks']} of {st['chunks']} chunks"
    )


if __name__ == "__main__":
    main()
