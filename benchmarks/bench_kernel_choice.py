"""The avx512 family's kernel table (ops/rows16_avx512.h) end to end: decode tok/s of the default
model with the 16-row AVX-512 kernel and with the AVX2 8-row kernel for one (type, operation),
the two alternating in one process (`matmul._set_avx512_op`), so that the machine's drift hits
both alike. Both kernels give the same bits; only the speed differs.

    python benchmarks/bench_kernel_choice.py [--type Q4_1] [--op decode] [--threads 2] [--rounds 6]
"""
from __future__ import annotations

import argparse
import statistics
import time

from dair.backend import LocalBackend
from dair.engine.sampling import SamplingParams
from dair.model.fetch import default_model_path
from dair.ops import matmul


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None)
    ap.add_argument("--type", default="Q4_1", choices=("Q4_0", "Q4_1", "Q8_0"))
    ap.add_argument("--op", default="decode", choices=("decode", "prefill"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args(argv)
    if matmul.kernel_table()["Q4_1"] != "avx512":
        print("the avx512 family is not in use here (no AVX-512, or DAIR_KERNELS caps it): nothing to compare")
        return 1
    b = LocalBackend(args.model or str(default_model_path()), threads=args.threads, quiet=True)
    ids = b.tokenizer.encode("The capital of France is")
    p = SamplingParams(temperature=0.0, repeat_penalty=1.0)
    b.generate(ids, p, 4, set())
    was = matmul._set_avx512_op(args.type, args.op, True)
    rates: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(args.rounds):
            for use16 in (True, False):
                matmul._set_avx512_op(args.type, args.op, use16)
                t0 = time.perf_counter()
                b.generate(ids, p, args.tokens, set())
                rates[use16].append(args.tokens / (time.perf_counter() - t0))
    finally:
        matmul._set_avx512_op(args.type, args.op, was)
    for use16, name in ((True, "AVX-512 16-row"), (False, "AVX2 8-row")):
        v = rates[use16]
        print(f"{args.type} {args.op} on the {name} kernel, {args.threads} thread(s): median {statistics.median(v):.1f} "
              f"tok/s (prompt and {args.tokens} tokens) over {args.rounds} rounds: {[round(x) for x in v]}")
    print(f"table's choice now: {'16-row' if was else 'AVX2 8-row'}; AVX2 / 16-row: "
          f"{statistics.median(rates[False]) / statistics.median(rates[True]):.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
