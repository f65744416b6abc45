"""Each kernel header under ops/ compiles on its own, for an AVX-512 host, an AVX2-only host
(Zen 3) and a plain x86-64 one: a module includes only the headers it needs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

OPS = Path(__file__).resolve().parent.parent.parent / "ops"
HEADERS = sorted(p.name for p in OPS.glob("*.h"))
CC = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
# the build itself covers the host; these are the other kinds (plain x86-64, AVX2-only Zen 3)
ARCHES = ["-march=x86-64", "-march=znver3"]

pytestmark = [
    pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="x86 instruction sets"),
    pytest.mark.skipif(shutil.which(CC[0]) is None, reason="needs the C compiler"),
]


def test_each_header_compiles_alone(tmp_path):
    procs = {}
    for arch in ARCHES:
        for h in HEADERS:
            src = tmp_path / f"{h}{arch}.c"
            src.write_text(f'#include "{h}"\n')
            procs[h, arch] = subprocess.Popen(
                [*CC, arch, "-fsyntax-only", "-Wall", "-Werror", "-Wno-unused-function", f"-I{OPS}",
                 f"-I{sysconfig.get_paths()['include']}", str(src)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True)
    out = {key: p.communicate()[0].strip().splitlines()[:3] for key, p in procs.items()}
    failed = {key: lines for key, lines in out.items() if procs[key].returncode}
    assert not failed, failed
