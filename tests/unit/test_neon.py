"""ARM NEON kernels (ops/neon_quants.h) against the plain-C kernels, cross-compiled and run under qemu.

There is no ARM machine here: tests/support/neon/harness.c is built for aarch64 with Debian's
gcc-aarch64-linux-gnu, once with the dot-product extension and once as plain ARMv8 NEON, and run
under qemu-user's qemu-aarch64 (on an aarch64 host it is built and run natively). It checks Q8_0,
Q4_0, Q4_1, Q4_K and Q6_K products bit for bit where the sums are exact in float and within float
summation error elsewhere, and dair_mm_q's dispatch with each family (see the harness).
Correctness only: qemu says nothing about speed.
"""
from __future__ import annotations

import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
OPS = ROOT / "ops"
HARNESS = Path(__file__).resolve().parent.parent / "support" / "neon" / "harness.c"
SYSROOT = Path("/usr/aarch64-linux-gnu")
NATIVE = platform.machine() in ("aarch64", "arm64")
CC = "cc" if NATIVE else "aarch64-linux-gnu-gcc"
OBJDUMP = "objdump" if NATIVE else "aarch64-linux-gnu-objdump"
# -march values: with SDOT (__ARM_FEATURE_DOTPROD) and without (SMULL + pairwise adds)
MARCHES = {"dotprod": "armv8.2-a+dotprod", "plain": "armv8-a"}


def _missing() -> str | None:
    if NATIVE:
        return None if shutil.which(CC) else "no C compiler (cc) on this aarch64 host"
    if not shutil.which(CC):
        return "aarch64 cross compiler not installed (Debian: apt-get install gcc-aarch64-linux-gnu)"
    if not shutil.which("qemu-aarch64"):
        return "qemu-aarch64 not installed (Debian: apt-get install qemu-user)"
    if not (SYSROOT / "lib").is_dir():
        return f"no aarch64 C library under {SYSROOT} (Debian: libc6-dev-arm64-cross)"
    return None


pytestmark = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


def _run(exe: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [str(exe), *args] if NATIVE else ["qemu-aarch64", "-L", str(SYSROOT), str(exe), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", params=sorted(MARCHES))
def harness(request, tmp_path_factory) -> tuple[str, Path]:
    exe = tmp_path_factory.mktemp("neon") / f"harness_{request.param}"
    # setup.py's optimisation flags: the kernels must agree as the extension is built
    cmd = [CC, "-O3", "-ffast-math", "-fno-finite-math-only", f"-march={MARCHES[request.param]}", "-Wall", "-Werror",
           "-Wno-unused-function",
           f"-I{OPS}", str(HARNESS), "-o", str(exe), "-lm"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    return request.param, exe


def test_neon_kernels_agree_with_plain_c(harness):
    variant, exe = harness
    res = _run(exe)
    assert res.returncode == 0, f"NEON ({variant}) differs from plain C:\n{res.stdout[-4000:]}{res.stderr[-2000:]}"
    first = res.stdout.splitlines()[0]
    assert first == ("kernels: neon+dotprod (neon)" if variant == "dotprod" else "kernels: neon (neon)"), first
    assert " 0 failures" in res.stdout and "7628 checks" in res.stdout, res.stdout[-500:]


def test_harness_catches_a_wrong_product(harness):
    """An activation value off by one on the NEON side only is flagged for every type."""
    _, exe = harness
    res = _run(exe, "perturb")
    assert res.returncode == 3 and "mismatches found for 5 of 5 types" in res.stdout, res.stdout[-2000:]


@pytest.mark.skipif(not shutil.which(OBJDUMP), reason=f"{OBJDUMP} not installed (binutils-aarch64-linux-gnu)")
def test_dotprod_build_uses_sdot_and_plain_build_does_not(harness):
    variant, exe = harness
    dis = subprocess.run([OBJDUMP, "-d", str(exe)], capture_output=True, text=True, timeout=120).stdout
    assert ("\tsdot\t" in dis) == (variant == "dotprod")


def test_matmul_extension_compiles_for_aarch64_with_neon_kernels(tmp_path):
    """The Cython matmul module's C (as setup.py builds it) compiles for aarch64 and holds the NEON
    kernels: no x86 intrinsic leaks outside its guards, and cpu.h's family list names "neon"."""
    src = OPS / "matmul.c"
    deps = [OPS / "matmul.pyx", OPS / "_common.pxi", *OPS.glob("*.h")]
    if not src.exists() or src.stat().st_mtime < max(p.stat().st_mtime for p in deps):
        pytest.skip("ops/matmul.c missing or older than its sources (rebuild: pip install -e .)")
    obj = tmp_path / "matmul.o"
    inc = Path(sysconfig.get_paths()["include"])
    # Debian's pyconfig.h picks <aarch64-linux-gnu/pythonX.Y/pyconfig.h> by target; lend it the
    # host's (both LP64, nothing here depends on the difference)
    multiarch = Path("/usr/include") / f"{platform.machine()}-linux-gnu" / inc.name / "pyconfig.h"
    if multiarch.exists():
        shim = tmp_path / "aarch64-linux-gnu" / inc.name
        shim.mkdir(parents=True)
        shutil.copy(multiarch, shim / "pyconfig.h")
    cmd = [CC, "-c", "-O1", "-fopenmp", f"-march={MARCHES['dotprod']}", f"-I{inc}", f"-I{tmp_path}",
           f"-I{np.get_include()}", f"-I{OPS}", "-DNPY_NO_DEPRECATED_API=NPY_1_7_API_VERSION", str(src), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    assert b"neon+dotprod\0" in obj.read_bytes() and b"neon\0" in obj.read_bytes()
    if shutil.which(OBJDUMP):
        dis = subprocess.run([OBJDUMP, "-d", str(obj)], capture_output=True, text=True, timeout=120).stdout
        assert "\tsdot\t" in dis


def test_each_header_compiles_alone_for_aarch64(tmp_path):
    """As tests/unit/test_ops_headers.py does for x86: no x86 intrinsic outside its guards, on both ARM targets."""
    procs = {}
    for variant, march in MARCHES.items():
        for h in sorted(p.name for p in OPS.glob("*.h")):
            src = tmp_path / f"{h}.{variant}.c"
            src.write_text(f'#include "{h}"\n')
            procs[h, variant] = subprocess.Popen(
                [CC, f"-march={march}", "-fsyntax-only", "-Wall", "-Werror", "-Wno-unused-function", f"-I{OPS}",
                 f"-I{sysconfig.get_paths()['include']}", str(src)], stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True)
    out = {key: p.communicate()[0].strip().splitlines()[:3] for key, p in procs.items()}
    failed = {key: lines for key, lines in out.items() if procs[key].returncode}
    assert not failed, failed
