"""Build llama.cpp's `llama-bench` for this CPU, the baseline `dair bench` compares against.

    python benchmarks/build_llama_bench.py [--isa native|avx2] [--version 0.3.36] [--jobs N]

llama.cpp comes from the llama-cpp-python sdist on PyPI, which vendors it, built with cmake:
`--isa native` (-DGGML_NATIVE=ON, as a user's own build) or `--isa avx2` (AVX2/FMA/F16C only, as
on an AVX2-only CPU, to set beside `DAIR_KERNELS=avx2`). The binary is cached under
~/.cache/dair/llama-bench/<version>-<isa>-<cpu hash>/bin/ (dair/commands/llamabench.py), where
`dair bench` finds it without --llama-bench; its path is printed last, so
`dair bench --llama-bench "$(python benchmarks/build_llama_bench.py)"` also works.
"""
from __future__ import annotations

import argparse
import sys

from dair.commands.llamabench import DEFAULT_VERSION, ISA_FLAGS, build


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--isa", choices=sorted(ISA_FLAGS), default="native",
                    help="native: this CPU's best; avx2: AVX2/FMA/F16C only, as on an AVX2-only CPU")
    ap.add_argument("--version", default=DEFAULT_VERSION, help="llama-cpp-python release whose llama.cpp is built")
    ap.add_argument("--jobs", type=int, default=None)
    a = ap.parse_args()
    print(build(a.isa, a.version, a.jobs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
