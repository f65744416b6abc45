"""Build llama.cpp's `llama-bench` for this CPU, the baseline `dair bench` compares against.

    python benchmarks/build_llama_bench.py [--isa native|avx2] [--version 0.3.36] [--cache DIR] [--jobs N]

PyPI is the only registry this project may reach, so llama.cpp comes from the llama-cpp-python
sdist, which vendors it (vendor/llama.cpp). The sdist is downloaded with pip, unpacked and built with
cmake: `--isa native` (the default) with -DGGML_NATIVE=ON, so llama.cpp picks its kernels for this
CPU as a user's build would (AMX off: its native build has crashed on Sapphire Rapids hosts here);
`--isa avx2` with AVX2, FMA and F16C and no AVX-512 or AVX-VNNI, the build an AVX2-only CPU (AMD
before Zen 4, Intel consumer cores) runs, to compare against `DAIR_KERNELS=avx2` on a host that also
has AVX-512. The binary lands in ~/.cache/dair/llama-bench/<version>-<isa>-<cpu flags hash>/bin/
and its path is printed last,
so `dair bench --llama-bench "$(python benchmarks/build_llama_bench.py)"` works. A second run with
the same version on the same CPU prints the cached path at once.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


def cpu_key() -> str:
    """Short hash of the CPU's model and flags: a native build is only valid on the CPU it was made for."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return hashlib.sha256("\n".join(sorted(set(lines))).encode()).hexdigest()[:10]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


ISA_FLAGS = {
    "native": ["-DGGML_NATIVE=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"],
}


def build(version: str, isa: str, cache: Path, jobs: int) -> Path:
    out = cache / f"{version}-{isa}-{cpu_key()}"
    binary = out / "bin" / "llama-bench"
    if binary.exists():
        return binary
    if not shutil.which("cmake"):
        raise SystemExit("cmake is needed to build llama-bench (Debian: apt-get install cmake; PyPI: pip install cmake)")
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
        log(f"downloading the llama-cpp-python {version} sdist from PyPI ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        bdir = Path(tmp) / "build"
        log(f"configuring {src} ({isa}) ...")
        subprocess.run(["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", *ISA_FLAGS[isa],
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
        log(f"building llama-bench with {jobs} jobs (several minutes on 2 cores) ...")
        subprocess.run(["cmake", "--build", str(bdir), "--target", "llama-bench", "-j", str(jobs)], check=True,
                       stdout=subprocess.DEVNULL)
        built = next(bdir.glob("**/bin/llama-bench"))
        (out / "bin").mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, binary)
    return binary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", default="0.3.36", help="llama-cpp-python release whose vendored llama.cpp is built")
    ap.add_argument("--isa", choices=sorted(ISA_FLAGS), default="native",
                    help="native: this CPU's best; avx2: AVX2/FMA/F16C only, as on an AVX2-only CPU")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                    / "dair" / "llama-bench")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2)
    a = ap.parse_args()
    print(build(a.version, a.isa, a.cache, a.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
