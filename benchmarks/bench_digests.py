"""What the per-tensor digests (model/digests.py) cost: the hash, a first start, a cached start.

    python benchmarks/bench_digests.py [--layers 8] [--model PATH] [--keep]

1. The hash alone over a 64 MiB buffer in memory: XXH3-128 (the one dair uses) against BLAKE3
   single-threaded (if the `blake3` package is installed), best of 5, GB/s and the ratio.
2. A model file: by default a synthetic GGUF of llama-7b width with --layers layers (real
   tensor sizes, random weights; ~113 MB per layer in Q4_0), or --model PATH. Hashed three ways:
   - first start, cold: the file's pages dropped from the page cache first (fsync +
     POSIX_FADV_DONTNEED; the disk's read speed bounds this one),
   - first start, warm page cache (no digest cache): pread + hash,
   - cached start: the digest cache file read back, nothing hashed.
   and the same figures scaled to a 40 GB file.
The machine is shared: the load average is printed first; every figure comes from this run.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _in_memory() -> None:
    import xxhash

    buf = os.urandom(64 << 20)

    def rate(fn) -> float:
        best = min(_timed(fn) for _ in range(5))
        return len(buf) / best / 1e9

    x = rate(lambda: xxhash.xxh3_128(buf).digest())
    print(f"hash in memory (64 MiB): xxh3_128 {x:.2f} GB/s", end="")
    try:
        import blake3
    except ImportError:
        print("  (blake3 not installed: pip install blake3 to compare)")
        return
    b = rate(lambda: blake3.blake3(buf).digest())
    print(f", blake3 (1 thread) {b:.2f} GB/s: xxh3_128 is {x / b:.2f}x")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _read_only(path: Path) -> None:
    """The same preads into one buffer, no hash: how much of a first start is the hash."""
    from dair.model.digests import CHUNK

    view = memoryview(bytearray(CHUNK))
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while (got := os.preadv(fd, [view], pos)) > 0:
            pos += got
    finally:
        os.close(fd)


def _drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8, help="layers of the synthetic llama-7b-wide file")
    ap.add_argument("--model", default=None, help="hash this model file instead of a synthetic one")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic file")
    args = ap.parse_args()

    from dair.model import open_model
    from dair.model.digests import FileDigests
    from dair.ops.matmul import simd_name

    print(f"CPU {_cpu()}, kernels built for {simd_name()}, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    _in_memory()
    tmp = Path(tempfile.mkdtemp(prefix="dair-bench-digests-"))
    try:
        if args.model:
            path = Path(args.model)
        else:
            from dair.model.synth import write_synth

            path = tmp / f"llama-7b-{args.layers}l.gguf"
            t = time.perf_counter()
            write_synth(path, "llama-7b", "Q4_0", n_layers=args.layers)
            print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f}s")
        model = open_model(path)
        n = model.config.n_layers
        size = sum({(t.offset, t.nbytes): t.nbytes for t in model.tensors.values()}.values())

        _drop_cache(path)
        cold = _timed(lambda: FileDigests(model, cache=tmp / "cold").for_range(0, n - 1))
        warm = _timed(lambda: FileDigests(model, cache=tmp / "warm").for_range(0, n - 1))
        read = _timed(lambda: _read_only(path))
        cached = min(_timed(lambda: FileDigests(model, cache=tmp / "warm").for_range(0, n - 1)) for _ in range(5))
        print(f"{path.name}: {size / 1e9:.2f} GB of tensors, {len(model.tensors)} tensors")
        rows = [("first start, page cache cold", cold), ("first start, page cache warm", warm),
                ("first: the reads alone (warm)", read), ("cached start", cached)]
        scale = 40e9 / size
        for label, s in rows:
            rate = f"{size / s / 1e6:8.0f} MB/s" if label.startswith("first") else "   (no hashing)"
            # A cached start reads one small JSON file whatever the model's size: only its
            # entries grow (one per tensor), so it is not scaled by bytes.
            at40 = s * scale if label.startswith("first") else s
            print(f"  {label:30s} {s * 1000:9.1f} ms {rate}   40 GB file: {at40:8.2f} s")
    finally:
        if args.keep and not args.model:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
