"""Instructions per quantized product under callgrind: a repeatable figure where timings on a
shared machine move by tens of percent.

Each (type, n) runs in a fresh process under `valgrind --tool=callgrind`, collecting only inside
dair_mm_q (the row loop of the 8-bit products, one thread): the instructions of one rows x cols
product with n activation rows, weights of random bytes. Valgrind runs no AVX-512, so this
counts the `avx2` family (or `scalar`).

    python benchmarks/bench_ops_callgrind.py [--types Q4_0,Q5_0,Q5_1,IQ4_NL,IQ4_XS] [--n 1,64]
        [--kernels avx2] [--rows 256] [--cols 4096]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys


def child(qtype: str, kernels: str, n: int, rows: int, cols: int) -> None:
    import numpy as np

    from dair.model import qtypes
    from dair.ops import threads
    from dair.ops.matmul import Weight, set_kernels

    threads.set_num_threads(1)
    set_kernels(kernels)
    info = qtypes.QTYPES[qtype]
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, (rows, cols // info.block_values, info.block_bytes), dtype=np.uint8)
    raw[..., 1] &= 0xBB  # the first fp16 scale of every type here kept small and finite
    w = Weight(raw.reshape(-1), qtype, rows, cols)
    w.matmul(rng.standard_normal((n, cols)).astype(np.float32))


def count(qtype: str, kernels: str, n: int, rows: int, cols: int) -> int:
    r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                        "--toggle-collect=dair_mm_q", sys.executable, __file__, "child", qtype, kernels,
                        str(n), str(rows), str(cols)], capture_output=True, text=True)
    m = re.search(r"refs:\s*([\d,]+)", r.stderr)
    if r.returncode or m is None:
        raise SystemExit(f"{qtype} n={n}: {r.stderr[-800:]}")
    return int(m.group(1).replace(",", ""))


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        q, k, n, rows, cols = sys.argv[2:7]
        child(q, k, int(n), int(rows), int(cols))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="Q4_0,Q5_0,Q5_1,IQ4_NL,IQ4_XS")
    ap.add_argument("--n", default="1,64", help="activation rows per product, comma-separated")
    ap.add_argument("--kernels", default="avx2")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=4096)
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind")
    ns = [int(x) for x in a.n.split(",")]
    types = a.types.split(",")
    print(f"{a.rows} x {a.cols} weights, {a.kernels} kernels, instructions in dair_mm_q (callgrind), "
          f"per activation row; x {types[0]} = relative to {types[0]}")
    print(f"  {'type':8}" + "".join(f"{f'n={n} Ir/row':>16}{'x ' + types[0]:>9}" for n in ns))
    per = {q: [count(q, a.kernels, n, a.rows, a.cols) / n for n in ns] for q in types}
    for q in types:
        print(f"  {q:8}" + "".join(f"{per[q][i]:16,.0f}{per[q][i] / per[types[0]][i]:9.2f}" for i in range(len(ns))))


if __name__ == "__main__":
    main()
