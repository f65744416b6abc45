"""AirLLM mode at real scale on a synthetic 7B-shape Q4_0 model (written to /tmp, deleted after).

1. one engine over all 32 layers under a 1 GiB budget: streams (tok/s, peak RSS, disk MB/s,
   disk wait vs compute), warm (file in the page cache) and cold (released layers evicted
   from the page cache with POSIX_FADV_DONTNEED, so every token reads them from storage);
2. 4 engine processes at once, each holding a quarter of the layers resident: RSS of each vs a
   quarter of the weights.

    python benchmarks/bench_scale.py [--shape llama-7b] [--type q4_0] [--budget 1G] [--tokens 4] [--keep PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_streaming import run_child  # noqa: E402


def drop_caches() -> bool:
    """Empty the page cache if this process may (root, writable /proc/sys/vm/drop_caches)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError:
        return False


def cached_fraction(path: Path) -> float:
    """Share of the file's pages in the page cache (mincore over a fresh map; maps nothing in)."""
    import ctypes
    import mmap

    import numpy as np

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = np.zeros(pages, np.uint8)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ)
    view = np.frombuffer(mm, np.uint8)
    rc = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size), ctypes.c_void_p(vec.ctypes.data))
    del view
    mm.close()
    return float("nan") if rc else float((vec & 1).mean())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="llama-7b")
    p.add_argument("--type", default="q4_0")
    p.add_argument("--budget", default="1G")
    p.add_argument("--tokens", type=int, default=4)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--keep", default=None, help="use/keep this synthetic file instead of a temporary one")
    a = p.parse_args()
    from dair.model import open_model
    from dair.model.synth import write_synth

    path = Path(a.keep or f"/tmp/dair-bench-{a.shape}-{a.type}.gguf")
    if not path.exists():
        t = time.perf_counter()
        write_synth(path, a.shape, a.type)
        dt = time.perf_counter() - t
        print(f"wrote {path}: {path.stat().st_size / 1e9:.2f} GB in {dt:.1f} s "
              f"({path.stat().st_size / 1e6 / dt:.0f} MB/s)")
    try:
        with open_model(path) as mf:
            n = mf.config.n_layers
            layer = [b - a_ for a_, b in (mf.layer_byte_range(i) for i in range(n))]
            head = mf.output.nbytes
            embd = mf.embedding.nbytes
        weights = sum(layer) + head
        print(f"model {a.shape} {a.type}: {n} layers of {layer[0] / 2**20:.1f} MiB, head {head / 2**20:.1f} MiB, "
              f"embedding {embd / 2**20:.1f} MiB; layers + head {weights / 2**30:.2f} GiB")
        meta = run_child(str(path), "--meta-only")
        overhead = meta["hwm"]
        print(f"fixed overhead (peak RSS of a process that only opens the model): {overhead / 2**20:.1f} MiB, of "
              f"which {meta['open_map_rss'] / 2**20:.1f} MiB are model pages the reader touched (the engine unmaps "
              f"them) and {meta['base_rss'] / 2**20:.1f} MiB the process itself")
        base = meta["base_rss"]

        print(f"\n1. one engine, layers 0-{n - 1}, budget {a.budget}, {a.tokens} decode tokens")
        runs = [("resident", []), ("warm mmap", ["--method", "mmap"]), ("warm pread", ["--method", "pread"]),
                ("cold mmap", ["--method", "mmap", "--drop-cache"]),
                ("cold pread", ["--method", "pread", "--drop-cache"])]
        for label, extra in runs:
            if label.startswith("cold"):
                dropped = drop_caches()
            cached = cached_fraction(path)
            budget = [] if label == "resident" else ["--budget", a.budget]
            d = run_child(str(path), *budget, "--tokens", str(a.tokens), *extra)
            if label == "resident":
                resident_tok_s = d["tok_s"]
            ratio = d["tok_s"] / resident_tok_s
            note = f"file {cached:.0%} cached at start" + (", caches dropped" if label.startswith("cold") and dropped else "")
            print(f"  {label:10} {d['mode']}: {d['tok_s']:.3f} tok/s = {ratio:.2f}x resident ({d['ms_per_token']:.0f} ms/token), "
                  f"peak RSS {d['hwm'] / 2**20:.0f} MiB (overhead + {(d['hwm'] - overhead) / 2**20:.0f} MiB), "
                  f"{d['pinned']} pinned / {d['streamed']} streamed units, "
                  f"{d['disk_mb_per_token']:.0f} MB/token streamed at {d['disk_read_mb_s']:.0f} MB/s "
                  f"({d['disk_mb_s_wall']:.0f} MB/s over the run), storage reads {d['storage_read_mb']:.0f} MB, "
                  f"disk wait {d['disk_wait_share']:.0%} / compute {1 - d['disk_wait_share']:.0%} of token time; {note}")

        k = a.stages
        bounds = [round(i * n / k) for i in range(k + 1)]
        ranges = [f"{bounds[i]}-{bounds[i + 1] - 1}" for i in range(k)]
        print(f"\n2. {k} engine processes at once, resident: {', '.join(ranges)}")
        procs = [subprocess.Popen([sys.executable, str(HERE / "bench_streaming.py"), "child", str(path),
                                   "--layers", r, "--tokens", str(a.tokens), "--hold", "5"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in ranges]
        total_rss = 0
        for r, pr in zip(ranges, procs, strict=True):
            outs, errs = pr.communicate()
            if pr.returncode:
                raise SystemExit(f"stage {r} failed:\n{errs}")
            d = json.loads(outs)
            f, l_ = (int(v) for v in r.split("-"))
            share = sum(layer[f:l_ + 1]) + (head if l_ == n - 1 else 0)
            total_rss += d["hwm"]
            print(f"  layers {r:6} weights {share / 2**20:7.0f} MiB  peak RSS {d['hwm'] / 2**20:7.0f} MiB "
                  f"= {d['hwm'] / share:.2f}x its weights; model pages mapped {d['map_rss'] / 2**20:.0f} MiB "
                  f"= {d['map_rss'] / share:.3f}x; RSS - process base {(d['rss'] - base) / share:.2f}x "
                  f"(a quarter of the model: {weights / k / 2**20:.0f} MiB); {d['tok_s']:.2f} steps/s")
        print(f"  sum of peak RSS {total_rss / 2**30:.2f} GiB for {weights / 2**30:.2f} GiB of weights")
    finally:
        if not a.keep:
            path.unlink(missing_ok=True)
            print(f"\ndeleted {path}")


if __name__ == "__main__":
    main()
