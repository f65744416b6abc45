"""Long context, end to end, in one run: dair beside llama.cpp's llama-bench.

    python benchmarks/bench_longctx.py --llama-bench PATH [--poll 0] [--threads 2] [--long 8000] [--runs 1] [--pairs 3]

Measures, each dair figure in its own process (`python -m dair.engine.bench`):
- prefill of 2,048 tokens (llama-bench -p 2048), and of --long tokens (its rate against the
  2,048 one: a steady rate means attention no longer falls off with length), --pairs times in
  turn, the ratio being the median of adjacent pairs'; llama-bench's own -p --long beside it;
- decode of 32 tokens after 2,000 tokens of context (llama-bench -n 32 -d 2000), with the f16
  and the Q8_0 KV cache, and after a 16-token prompt (dair's own short-context rate);
and prints dair's figures as ratios of llama-bench's. Without --llama-bench, dair's figures alone.
The machine's load average is printed first: on a shared machine only same-run ratios mean much.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def dair(threads: int, prompt: int, gen: int, depth: int, kv: str, runs: int) -> dict:
    cmd = [sys.executable, "-m", "dair.engine.bench", "--threads", str(threads), "--prompt-tokens", str(prompt),
           "--gen-tokens", str(gen), "--depth", str(depth), "--kv-type", kv, "--runs", str(runs)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def llama_bench(binary: str, model: str, threads: int, runs: int, poll: int | None = None, long: int = 0) -> dict:
    """pp2048, tg32 and tg32 @ d2000, and with `long` its own pp<long> (the same fall-off dair's
    long prompt is held to: llama.cpp's attention grows with the prompt too)."""
    prompts = "2048" + (f",{long}" if long else "")
    common = [binary, "-m", model, "-t", str(threads), "-r", str(runs), "-o", "json",
              *(["--poll", str(poll)] if poll is not None else [])]
    # two calls: -d applies to every test of a call, and the prefills are wanted at depth 0 only
    tests = []
    for extra in (["-p", prompts, "-n", "0", "-d", "0"], ["-p", "0", "-n", "32", "-d", "0,2000"]):
        tests += json.loads(subprocess.run(common + extra, capture_output=True, text=True, check=True).stdout)
    pick = {(t["n_prompt"], t["n_gen"], t["n_depth"]): float(t["avg_ts"]) for t in tests}
    out = {"pp2048": pick[(2048, 0, 0)], "tg32": pick[(0, 32, 0)], "tg32_d2000": pick[(0, 32, 2000)]}
    if long:
        out["pp_long"] = pick[(long, 0, 0)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-bench", metavar="PATH")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--long", type=int, default=8000, help="the long prompt (tokens; below the model's 8,192)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=3, help="alternating 2,048/--long prefill pairs")
    ap.add_argument("--poll", type=int, help="llama-bench --poll (0: its threads sleep instead of spinning, "
                                              "which a shared machine needs)")
    a = ap.parse_args()
    from dair.model.fetch import default_model_path
    from dair.ops.attention import get_isa
    from dair.ops.matmul import get_kernels

    print(f"load average {os.getloadavg()[0]:.1f}; dair kernels {get_kernels()}, attention {get_isa()}"
          f"{' (DAIR_KERNELS=' + os.environ['DAIR_KERNELS'] + ')' if os.environ.get('DAIR_KERNELS') else ''}; "
          f"{a.threads} threads", flush=True)
    t = a.threads
    r: dict[str, float] = {}
    # the 2,048- and the long prefill alternate, one process each, and their ratio is the median
    # of adjacent pairs': a burst of the neighbours' load then shifts both sides of a pair alike
    pairs: list[tuple[float, float]] = []
    for _ in range(max(a.pairs, 1) if a.long else 1):
        short = dair(t, 2048, 2, 0, "f16", a.runs)["prefill_tok_s"]
        long_ = dair(t, a.long, 2, 0, "f16", a.runs)["prefill_tok_s"] if a.long else 0.0
        pairs.append((short, long_))
        print(f"dair prefill 2048: {short:.1f} tok/s" + (f", {a.long}: {long_:.1f} tok/s ({long_ / short:.2f}x)"
                                                          if a.long else ""), flush=True)
    r["prefill_2048"] = statistics.median(p[0] for p in pairs)
    r["decode_short"] = dair(t, 16, 32, 0, "f16", a.runs)["decode_tok_s"]
    print(f"dair decode after 16 tokens: {r['decode_short']:.1f} tok/s", flush=True)
    for kv in ("f16", "q8_0"):
        r[f"decode_2000_{kv}"] = dair(t, 16, 32, 2000, kv, a.runs)["decode_tok_s"]
        print(f"dair decode after 2000 tokens, {kv} cache: {r[f'decode_2000_{kv}']:.1f} tok/s "
              f"({r[f'decode_2000_{kv}'] / r['decode_short']:.2f}x its short-context rate)", flush=True)
    if a.long:
        r["prefill_long"] = statistics.median(p[1] for p in pairs)
        r["prefill_long_ratio"] = statistics.median(p[1] / p[0] for p in pairs)
        print(f"dair prefill {a.long}: {r['prefill_long']:.1f} tok/s, {r['prefill_long_ratio']:.2f}x the 2048-token "
              f"rate (median of {len(pairs)} adjacent pairs)", flush=True)
    if a.llama_bench:
        ref = llama_bench(a.llama_bench, str(default_model_path()), t, max(a.runs, 1), a.poll, a.long)
        print(f"llama-bench: pp2048 {ref['pp2048']:.1f}, tg32 {ref['tg32']:.1f}, tg32 @ d2000 {ref['tg32_d2000']:.1f} "
              f"tok/s" + (f", pp{a.long} {ref['pp_long']:.1f} tok/s ({ref['pp_long'] / ref['pp2048']:.2f}x its "
                          "2048-token rate)" if a.long else ""))
        print(f"ratios dair/llama.cpp: prefill 2048 {r['prefill_2048'] / ref['pp2048']:.2f}x, decode @ 2000 (f16) "
              f"{r['decode_2000_f16'] / ref['tg32_d2000']:.2f}x, (q8_0) {r['decode_2000_q8_0'] / ref['tg32_d2000']:.2f}x, "
              f"short decode {r['decode_short'] / ref['tg32']:.2f}x"
              + (f", prefill {a.long} {r['prefill_long'] / ref['pp_long']:.2f}x" if a.long else ""))
        r.update({f"llama_{k}": v for k, v in ref.items()})
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
