"""llama.cpp's `llama-bench`, the baseline `dair bench` measures against: built from the llama.cpp
that the llama-cpp-python sdist on PyPI vendors (PyPI is the only registry dair may reach), cached
per version, instruction set and CPU, and found again by `dair bench`.

`native` is llama.cpp's -DGGML_NATIVE=ON build, the one a user compiles on their own machine, with
AMX off: on the Sapphire Rapids class VMs here the kernel grants no AMX tile state, so ggml's AMX
matmul (compiled in whenever the compiler targets AMX, whatever GGML_AMX_* says) dies on its first
`ldtilecfg`; the -mno-amx-* flags keep it out. `avx2` is AVX2 + FMA + F16C with no
AVX-512 or AVX-VNNI: what an AVX2-only CPU (AMD before Zen 4, Intel consumer cores) runs, to set
beside `DAIR_KERNELS=avx2` on a host that also has AVX-512.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from dair.errors import DairError

DEFAULT_VERSION = "0.3.36"
ISA_FLAGS = {
    "native": ["-DGGML_NATIVE=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
               "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
               "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"],
    "avx2": ["-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON",
             "-DGGML_BMI2=ON", "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"],
}


def cpu_key() -> str:
    """Short hash of the CPU's model and flags: a native build is valid only on the CPU it was made for."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return hashlib.sha256("\n".join(sorted(set(lines))).encode()).hexdigest()[:10]


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "dair" / "llama-bench"


def cached_binary(isa: str, version: str = DEFAULT_VERSION) -> Path:
    # the build flags are part of the key: a binary built with other flags is another baseline
    flags = hashlib.sha256("\n".join(ISA_FLAGS.get(isa, [])).encode()).hexdigest()[:6]
    return cache_root() / f"{version}-{isa}-{cpu_key()}-{flags}" / "bin" / "llama-bench"


def isa_for_dair_run() -> str:
    """The llama.cpp build to set beside dair's kernels: AVX2-only when dair is capped at avx2."""
    return "avx2" if os.environ.get("DAIR_KERNELS", "").strip().lower() == "avx2" else "native"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(isa: str = "native", version: str = DEFAULT_VERSION, jobs: int | None = None) -> Path:
    """Build (or find in the cache) llama-bench; returns its path. Progress goes to stderr."""
    if isa not in ISA_FLAGS:
        raise DairError(f"unknown llama.cpp build {isa!r} (choose from {', '.join(sorted(ISA_FLAGS))})")
    binary = cached_binary(isa, version)
    if binary.exists():
        return binary
    if not shutil.which("cmake"):
        raise DairError("cmake is needed to build llama-bench (Debian: apt-get install cmake; PyPI: pip install cmake)")
    jobs = jobs or os.cpu_count() or 2
    with tempfile.TemporaryDirectory(prefix="llama-bench-") as tmp:
        _log(f"downloading the llama-cpp-python {version} sdist from PyPI ...")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", tmp], check=True)
        sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tf:
            tf.extractall(tmp, filter="data")
        src = next(Path(tmp).glob("llama_cpp_python-*/vendor/llama.cpp"))
        bdir = Path(tmp) / "build"
        _log(f"configuring {src} ({isa}) ...")
        subprocess.run(["cmake", "-S", str(src), "-B", str(bdir), "-DCMAKE_BUILD_TYPE=Release", *ISA_FLAGS[isa],
                        "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                        "-DBUILD_SHARED_LIBS=OFF"], check=True, stdout=subprocess.DEVNULL)
        _log(f"building llama-bench with {jobs} jobs (several minutes on 2 cores) ...")
        subprocess.run(["cmake", "--build", str(bdir), "--target", "llama-bench", "-j", str(jobs)], check=True,
                       stdout=subprocess.DEVNULL)
        built = next(bdir.glob("**/bin/llama-bench"))
        binary.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, binary)
    return binary
