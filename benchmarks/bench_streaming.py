"""Resident vs streaming (AirLLM mode) on the default model: tokens/s, peak RSS, disk MB/s, disk wait.

Every configuration runs in a fresh process (peak RSS = its VmHWM); ratios are against the
resident run measured in the same invocation, since the machine is shared and timings drift.

    python benchmarks/bench_streaming.py [--model PATH] [--budget 40M] [--tokens 32]

`bench_streaming.py child ...` is the measuring process, also used by bench_scale.py.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def _map_rss(addr: int) -> int:
    """Rss of the mapping containing addr (/proc/self/smaps): the model's pages mapped in."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and head.replace("-", "").isalnum() and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= addr < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    return 0


def child(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--layers", default=None, help="A-B (default: all)")
    p.add_argument("--budget", default="")
    p.add_argument("--method", default="mmap")
    p.add_argument("--drop-cache", action="store_true")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--prompt", type=int, default=8)
    p.add_argument("--meta-only", action="store_true")
    p.add_argument("--hold", type=float, default=0.0, help="seconds to stay alive after the run (concurrent runs)")
    a = p.parse_args(argv)
    import numpy as np

    from dair.engine.forward import RangeEngine
    from dair.engine.residency import parse_size, storage_read_bytes
    from dair.model import open_model

    io0 = storage_read_bytes()
    mf = open_model(a.model)
    from dair.engine.residency import _addr

    map_addr = _addr(mf._map)
    out: dict = {"open_hwm": _status("VmHWM"), "open_map_rss": _map_rss(map_addr)}
    out["base_rss"] = _status("VmRSS") - out["open_map_rss"]  # the process without the model's pages
    if a.meta_only:
        out["hwm"] = _status("VmHWM")
        print(json.dumps(out))
        return
    n = mf.config.n_layers
    first, last = (int(v) for v in a.layers.split("-")) if a.layers else (0, n - 1)
    t0 = time.perf_counter()
    eng = RangeEngine(mf, first, last, max_ram=parse_size(a.budget), residency=a.method, drop_cache=a.drop_cache)
    out["build_s"] = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    eng.open_session("s")

    def step(ids: list[int], pos: int) -> int:
        if eng.has_embedding:
            x = eng.embed(np.array(ids, np.int32))
        else:
            x = rng.standard_normal((len(ids), eng.dim)).astype(np.float32)
        x = eng.run_layers(x, [("s", np.arange(pos, pos + len(ids), dtype=np.int32))])
        return int(np.argmax(eng.head(x)[-1])) if eng.has_head else int(rng.integers(100, 200))

    tok = step(list(range(100, 100 + a.prompt)), 0)
    s0 = eng.stats()
    times = []
    for i in range(a.tokens):
        t = time.perf_counter()
        tok = step([tok], a.prompt + i)
        times.append(time.perf_counter() - t)
    s1 = eng.stats()
    decode_s = sum(times)
    read = s1["disk_read_bytes"] - s0["disk_read_bytes"]
    wait = s1["disk_wait_s"] - s0["disk_wait_s"]
    out.update(
        mode=s1["mode"], method=a.method, drop_cache=a.drop_cache, layers=f"{first}-{last}",
        budget=s1["max_ram"], range_bytes=s1["range_bytes"], pinned=s1["pinned_units"],
        streamed=s1["streamed_units"], prefetch=s1["prefetch"],
        tok_s=a.tokens / decode_s, ms_per_token=1e3 * decode_s / a.tokens,
        ms_median=1e3 * float(np.median(times)),
        disk_mb_per_token=read / 1e6 / a.tokens,
        disk_read_mb_s=s1["disk_read_mb_s"],
        disk_mb_s_wall=read / 1e6 / decode_s,
        disk_wait_share=wait / decode_s,
        storage_read_mb=(storage_read_bytes() - io0) / 1e6,
        hwm=_status("VmHWM"), rss=_status("VmRSS"), map_rss=_map_rss(map_addr),
    )
    if a.hold:
        time.sleep(a.hold)
    print(json.dumps(out))


def run_child(*args: str) -> dict:
    r = subprocess.run([sys.executable, __file__, "child", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"child {args} failed:\n{r.stderr}")
    return json.loads(r.stdout)


def row(label: str, d: dict, base: dict | None, overhead: int) -> str:
    ratio = f"{d['tok_s'] / base['tok_s']:.2f}x" if base else "1.00x"
    return (f"{label:26} {d['tok_s']:7.1f} {ratio:>6} {d['hwm'] / 2**20:8.1f} "
            f"{(d['hwm'] - overhead) / 2**20:8.1f} {d['disk_mb_per_token']:8.1f} {d['disk_read_mb_s']:9.0f} "
            f"{d['storage_read_mb']:8.1f} {d['disk_wait_share']:6.1%}")


HEADER = (f"{'run':26} {'tok/s':>7} {'ratio':>6} {'peakRSS':>8} {'-ovh':>8} {'MB/tok':>8} {'read MB/s':>9} "
          f"{'storage':>8} {'wait':>6}")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--budget", default="40M")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    if a.model is None:
        from dair.model.fetch import default_model_path

        a.model = str(default_model_path())
    model = str(Path(a.model))
    tk = ["--tokens", str(a.tokens)]
    meta = run_child(model, "--meta-only")
    overhead = meta["hwm"]
    print(f"model {model}; budget {a.budget}; {a.tokens} decode tokens per run")
    print(f"fixed overhead (peak RSS of a process that only opens the model): {overhead / 2**20:.1f} MiB, of which "
          f"{meta['open_map_rss'] / 2**20:.1f} MiB are model pages opening mapped (the header is read without "
          f"mapping it; what the fingerprint reads of the weights, if anything; the engine unmaps them) and "
          f"{meta['base_rss'] / 2**20:.1f} MiB the process itself")
    print("peakRSS = VmHWM; -ovh = minus that overhead; MB/tok = weight bytes streamed per token; "
          "read MB/s = while reading; storage = bytes fetched from storage (/proc/self/io); "
          "wait = share of decode time waiting for the disk")
    print(HEADER)
    configs = [("resident", [])]
    configs += [(f"stream {a.budget} {m}", ["--budget", a.budget, "--method", m]) for m in ("mmap", "pread")]
    configs += [(f"stream {a.budget} {m} cold", ["--budget", a.budget, "--method", m, "--drop-cache"])
                for m in ("mmap", "pread")]
    # Interleaved repeats, median per configuration: the machine is shared, runs drift.
    results: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for _ in range(a.repeat):
        for label, extra in configs:
            results[label].append(run_child(model, *extra, *tk))
    med = {label: _median_run(rs) for label, rs in results.items()}
    for label, _ in configs:
        d = med[label]
        extra = f"  ({d['pinned']} pinned, {d['streamed']} streamed)" if d["mode"] == "streaming" else ""
        print(row(label, d, None if label == "resident" else med["resident"], overhead) + extra)
    print(f"(median of {a.repeat} interleaved runs; peak RSS is the largest of them)")


def _median_run(runs: list[dict]) -> dict:
    import statistics

    d = dict(sorted(runs, key=lambda r: r["tok_s"])[len(runs) // 2])
    d["disk_wait_share"] = statistics.median(r["disk_wait_share"] for r in runs)
    d["hwm"] = max(r["hwm"] for r in runs)
    return d


if __name__ == "__main__":
    main()
