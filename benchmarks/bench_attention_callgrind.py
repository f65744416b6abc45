"""Instructions of one decode attention call under callgrind: a repeatable figure where timings
on a shared machine move by tens of percent.

    python benchmarks/bench_attention_callgrind.py [--depth 2000] [--kv f16,q8_0] [--rows 1] [--so PATH]

Valgrind runs no AVX-512, and the attention module of a native build holds AVX-512 instructions
throughout (it is compiled for the build machine), so this builds the module once more for AVX2
(DAIR_CFLAGS, into a temporary directory; or --so names such a build) and counts, in a fresh
process per cache type, the instructions inside dair_attention_run: `rows` query rows ending at
position depth - 1, the default model's shapes (9 query heads, 3 kv heads of 64), one thread.
The Q8_0 cache is the rotated one of engine/kvcache.py.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AVX2_CFLAGS = "-O3 -fopenmp -ffast-math -fno-finite-math-only -Wno-unused-function -mavx2 -mfma -mf16c -mbmi2"


def build_avx2(out_dir: Path) -> Path:
    """The attention module built for AVX2 only, in out_dir; returns the .so's path."""
    import importlib.util

    if importlib.util.find_spec("Cython") is None:  # pip builds dair in an isolated environment
        sys.exit("this benchmark builds the attention module again and needs Cython beside dair: "
                 f"{sys.executable} -m pip install cython (or pass --so an AVX2-only build)")
    env = dict(os.environ, DAIR_CFLAGS=AVX2_CFLAGS)
    subprocess.run([sys.executable, "setup.py", "build_ext", "-q", "--build-lib", str(out_dir / "lib"),
                    "--build-temp", str(out_dir / "tmp")], cwd=ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return next((out_dir / "lib").rglob("attention*.so"))


def child(so: str, kind: str, depth: int, rows: int) -> None:
    import importlib.util

    import numpy as np

    import dair.ops

    spec = importlib.util.spec_from_file_location("dair.ops.attention", so)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["dair.ops.attention"] = mod
    spec.loader.exec_module(mod)
    dair.ops.attention = mod
    from dair.ops import threads

    threads.set_num_threads(1)
    mod.set_isa("avx2")
    rng = np.random.default_rng(0)
    H, KV, hd = 9, 3, 64
    x, y = (rng.standard_normal((depth, KV, hd)).astype(np.float32) for _ in range(2))
    if kind == "f16":
        k, v = x.astype(np.float16), y.astype(np.float16)
    else:
        k = np.empty((depth, KV, mod.q8_0_row_bytes(hd)), np.uint8)
        v = np.empty_like(k)
        mod.store_rotated_q8_0(x, k)
        mod.store_rotated_q8_0(y, v)
    q = rng.standard_normal((rows, H, hd)).astype(np.float32)
    mod.attention(q, k, v, np.arange(depth - rows, depth, dtype=np.int32), rotated=kind == "q8_0")


def count(so: Path, kind: str, depth: int, rows: int) -> int:
    r = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                        "--toggle-collect=dair_attention_run", sys.executable, __file__, "child", str(so), kind,
                        str(depth), str(rows)], capture_output=True, text=True, cwd=ROOT)
    m = re.search(r"Collected : (\d+)", r.stderr)
    if r.returncode != 0 or m is None:
        raise SystemExit(f"callgrind failed for {kind}:\n{r.stderr[-2000:]}")
    return int(m.group(1))


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--depth", type=int, default=2000)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--kv", default="f16,q8_0")
    ap.add_argument("--so", default=None, help="an AVX2-only build of the attention module (default: build one)")
    a = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found")
    with tempfile.TemporaryDirectory() as tmp:
        so = Path(a.so) if a.so else build_avx2(Path(tmp))
        for kind in a.kv.split(","):
            n = count(so, kind, a.depth, a.rows)
            print(f"{kind}: {a.rows} row(s) at {a.depth} positions, AVX2 family, 1 thread: {n:,} instructions",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
