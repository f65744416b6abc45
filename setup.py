"""Build dair: the top-level part folders map to `dair.<part>`; ops/*.pyx become nogil OpenMP kernels."""
import os
import sys
from pathlib import Path

import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent

# The top-level part folders, installed under the `dair.` prefix so that
# site-packages never gains generic names like `ops` or `bus`.
PARTS = ["model", "tokenizer", "ops", "engine", "bus", "stages", "tui"]


def _cflags() -> list[str]:
    # DAIR_CFLAGS overrides everything, e.g. for a portable build ("-O3 -mavx2 -mfma -mf16c").
    if os.environ.get("DAIR_CFLAGS"):
        return os.environ["DAIR_CFLAGS"].split()
    flags = ["-O3", "-fopenmp", "-ffast-math", "-fno-finite-math-only", "-Wno-unused-function"]
    if sys.platform.startswith("linux") and _is_x86():
        # Native code for the machine that builds it (each node builds its own copy).
        # AMX tiles are never emitted: they trap on some hosts that advertise them.
        flags += ["-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    elif os.uname().machine in ("aarch64", "arm64"):
        flags += ["-mcpu=native"]
    return flags


def _is_x86() -> bool:
    return os.uname().machine in ("x86_64", "AMD64")


def _cc_accepts(flag: str) -> bool:
    """Whether the C compiler takes `flag` (older GCCs do not know -mno-avxvnni)."""
    import subprocess
    import sysconfig
    import tempfile

    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "t.c"
        src.write_text("int main(void) { return 0; }\n")
        try:
            return subprocess.run([*cc, flag, "-c", str(src), "-o", str(Path(tmp) / "t.o")],
                                  capture_output=True).returncode == 0
        except OSError:
            return False


def _module_cflags(stem: str) -> list[str]:
    flags = _cflags()
    if stem == "matmul" and _is_x86():
        # The quantized kernels: the build machine's ISA minus AVX-512 (and the VEX AVX-VNNI that
        # comes with it), so plain-C and AVX2 code holds no AVX-512 instruction and an AVX-512
        # machine tests the AVX2 family too; AVX-512 kernels are enabled per function
        # (ops/cpu.h) and chosen at run time by cpuid. Also under DAIR_CFLAGS: these only remove.
        flags += [f for f in ("-mno-avx512f", "-mno-avxvnni") if _cc_accepts(f)]
    return flags


def _extensions() -> list[Extension]:
    exts = []
    for pyx in sorted((HERE / "ops").glob("*.pyx")):
        exts.append(
            Extension(
                f"dair.ops.{pyx.stem}",
                [str(pyx.relative_to(HERE))],
                include_dirs=[numpy.get_include(), "ops"],
                extra_compile_args=_module_cflags(pyx.stem),
                # rebuild when a kernel header changes (cythonize only tracks what a .pyx names)
                depends=sorted(str(h.relative_to(HERE)) for h in (HERE / "ops").glob("*.h")),
                extra_link_args=["-fopenmp"],
                define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
            )
        )
    return cythonize(
        exts,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True,
                             "initializedcheck": False},
    )


class BuildPyWithConfig(build_py):
    """Ship the top-level config.toml inside the package (it is the single source of defaults)."""

    def run(self) -> None:
        super().run()
        if not self.editable_mode:
            target = Path(self.build_lib) / "dair" / "config.toml"
            target.parent.mkdir(parents=True, exist_ok=True)
            self.copy_file(str(HERE / "config.toml"), str(target))


def _packages() -> dict[str, str]:
    """Every package under the part folders (subfolders with an __init__.py included)."""
    found = {"dair": "dair"}
    for top in ["dair", *PARTS]:
        for init in sorted((HERE / top).rglob("__init__.py")):
            rel = init.parent.relative_to(HERE)
            parts = rel.parts if top == "dair" else ("dair", *rel.parts)
            found[".".join(parts)] = str(rel)
    return found


PACKAGES = _packages()

setup(
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    package_data={"dair.tui": ["*.tcss"], "dair.ops": ["*.h", "*.pxd"], "dair.serve": ["static/*"]},
    ext_modules=_extensions(),
    cmdclass={"build_py": BuildPyWithConfig},
)
