"""`dair bench`: prefill and decode tokens/s and peak RSS on the default model (or each --model),
beside llama.cpp measured in the same run: its own `llama-bench` (`--llama-bench PATH`, on PATH, or
the build that benchmarks/build_llama_bench.py caches, AVX2-only when DAIR_KERNELS=avx2), else
llama-cpp-python when installed; the output says which.

A shared machine's speed drifts by a third between minutes, so the measurements come in
`--rounds`: each round measures every model and thread count with dair and the baseline back to
back (which goes first alternates), and every ratio printed (dair against the baseline, two
threads against one) is the median of the rounds' own ratios, with their range: a ratio taken
within a round compares two runs seconds apart, not a fast minute with a slow one."""
from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import signal
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from dair.commands.llamabench import cached_binary, isa_for_dair_run
from dair.errors import DairError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill/decode tokens/s and peak RSS, with llama.cpp as the in-run baseline")
    p.add_argument("--model", metavar="PATH", action="append",
                   help="a GGUF path or a `dair model fetch` name (repeatable; default: the default model)")
    p.add_argument("--threads", type=int, action="append", help="thread count (repeatable; default: 1 and 2)")
    p.add_argument("--prompt-tokens", type=int, default=128, help="prefill this many tokens (llama-bench -p N)")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--depth", type=int, default=0, metavar="N",
                   help="decode after N tokens of context (llama-bench -d N); default: after the prompt")
    p.add_argument("--kv-type", choices=["f16", "f32", "q8_0"], default=None,
                   help="dair's KV cache (default: config [stage] kv_type)")
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median is reported)")
    p.add_argument("--rounds", type=int, default=1,
                   help="rounds of every measurement, interleaved; ratios are the median of the rounds' own")
    p.add_argument("--baseline", choices=["auto", "llama.cpp", "llama-bench", "none"], default="auto",
                   help="auto: llama-bench if given, on PATH or built by benchmarks/build_llama_bench.py, "
                        "else llama-cpp-python if installed")
    p.add_argument("--llama-bench", metavar="PATH", default=None, help="llama.cpp's llama-bench binary")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=handle)


def _why(proc: subprocess.CompletedProcess) -> str:
    """A failed run's last line of stderr, and the signal that ended it (a crash prints nothing)."""
    last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    if proc.returncode < 0:
        try:
            last += f" (killed by {signal.Signals(-proc.returncode).name})"
        except ValueError:
            last += f" (killed by signal {-proc.returncode})"
    return last


def _run(engine: str, args: argparse.Namespace, threads: int, model: str | None) -> dict:
    cmd = [sys.executable, "-m", "dair.engine.bench", "--engine", engine, "--threads", str(threads),
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--runs", str(args.runs)]
    if engine == "dair":
        cmd += ["--depth", str(args.depth)] + (["--kv-type", args.kv_type] if args.kv_type else [])
    if model:
        cmd += ["--model", model]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise DairError(f"benchmark of {engine} with {threads} thread(s) failed: {_why(proc)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _run_llama_bench(binary: str, args: argparse.Namespace, threads: int, model: str | None) -> dict:
    """llama-bench's pp N at depth 0 and tg G at depth D (its own repetitions and mean)."""
    from dair.model.fetch import resolve_model_path

    depth = args.depth or args.prompt_tokens
    cmd = [binary, "-m", str(resolve_model_path(model)), "-t", str(threads), "-p", str(args.prompt_tokens),
           "-n", str(args.gen_tokens), "-d", f"0,{depth}", "-r", str(args.runs), "-o", "json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise DairError(f"{binary}: cannot run llama-bench: {e}") from None
    if proc.returncode != 0:
        raise DairError(f"{binary} failed: {_why(proc)}")
    try:
        tests = json.loads(proc.stdout)
        pp = next(t for t in tests if t["n_prompt"] == args.prompt_tokens and t["n_gen"] == 0 and t["n_depth"] == 0)
        tg = next(t for t in tests if t["n_gen"] == args.gen_tokens and t["n_prompt"] == 0 and t["n_depth"] == depth)
    except (ValueError, KeyError, StopIteration, TypeError):
        raise DairError(f"{binary}: output is not llama-bench's JSON with pp{args.prompt_tokens} and "
                        f"tg{args.gen_tokens} @ d{depth}") from None
    return {"engine": "llama-bench", "threads": threads, "prompt_tokens": args.prompt_tokens, "depth": depth,
            "prefill_tok_s": float(pp["avg_ts"]), "decode_tok_s": float(tg["avg_ts"]), "peak_rss_mb": 0.0}


ENGINES = ("dair", "llama.cpp", "llama-bench")


def _thread_scaling(rows: list[dict]) -> dict[str, tuple[int, int, float, float]]:
    """Per engine: (fewest threads, most threads, prefill ratio, decode ratio) between those two runs."""
    if len(rows) < 2:
        return {}
    lo, hi = min(rows, key=lambda r: r["threads"]), max(rows, key=lambda r: r["threads"])
    out = {}
    for eng in ENGINES:
        if eng in lo and eng in hi and lo is not hi:
            out[eng] = (lo["threads"], hi["threads"], hi[eng]["prefill_tok_s"] / lo[eng]["prefill_tok_s"],
                        hi[eng]["decode_tok_s"] / lo[eng]["decode_tok_s"])
    return out


def _measure(args: argparse.Namespace, model: str | None, threads: int, baseline: str, binary: str | None,
             dair_first: bool) -> dict:
    """One round's row for (model, threads): dair and the baseline back to back, and their ratios."""
    row: dict[str, Any] = {"threads": threads}
    order = ["dair"] + ([] if baseline == "none" else [baseline])
    for eng in order if dair_first else order[::-1]:
        if eng == "dair":
            row["dair"] = _run("dair", args, threads, model)
        else:
            ref = _run_llama_bench(binary, args, threads, model) if eng == "llama-bench" else _run(
                "llama.cpp", args, threads, model)
            row[ref["engine"]] = ref
    ref = next((row[e] for e in ENGINES[1:] if e in row), None)
    if ref is not None:
        row["decode_ratio"] = row["dair"]["decode_tok_s"] / ref["decode_tok_s"]
        row["prefill_ratio"] = row["dair"]["prefill_tok_s"] / ref["prefill_tok_s"]
    return row


def _spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def _combine(rounds: list[list[dict]]) -> tuple[list[dict], dict[str, tuple], dict[str, tuple]]:
    """One model's rounds (each a row per thread count) -> rows of median rates and ratios (with
    each ratio's range over the rounds under "<ratio>_range"), and the median thread scaling per
    engine with its range."""
    rows = []
    for k, first in enumerate(rounds[0]):
        mine = [r[k] for r in rounds]
        row: dict[str, Any] = {"threads": first["threads"]}
        for eng in ENGINES:
            if eng in first:
                row[eng] = dict(first[eng])
                for key in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb", "read_gb_s", "decode_ceiling_tok_s"):
                    if all(key in r[eng] for r in mine):
                        row[eng][key] = statistics.median(r[eng][key] for r in mine)
        for key in ("decode_ratio", "prefill_ratio"):
            if key in first:
                row[key], lo, hi = _spread([r[key] for r in mine])
                row[key + "_range"] = (lo, hi)
        rows.append(row)
    per_round = [_thread_scaling(r) for r in rounds]
    scaling, ranges = {}, {}
    for eng, (lo, hi, _, _) in per_round[0].items():
        pre, pre_lo, pre_hi = _spread([s[eng][2] for s in per_round])
        dec, dec_lo, dec_hi = _spread([s[eng][3] for s in per_round])
        scaling[eng], ranges[eng] = (lo, hi, pre, dec), (pre_lo, pre_hi, dec_lo, dec_hi)
    return rows, scaling, ranges


def _ratio(row: dict, key: str, rounds: int) -> str:
    if rounds < 2:
        return f"{row[key]:.2f}x"
    lo, hi = row[key + "_range"]
    return f"{row[key]:.2f}x ({lo:.2f}-{hi:.2f})"


def _report(model: str, rows: list[dict], scaling: dict, ranges: dict, rounds: int) -> None:
    print(f"model {model}")
    print(f"{'threads':>7} {'engine':>11} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12}")
    for row in rows:
        for eng in ENGINES:
            if eng in row:
                r = row[eng]
                rss = f"{r['peak_rss_mb']:>12.0f}" if r.get("peak_rss_mb") else f"{'-':>12}"
                print(f"{row['threads']:>7} {eng:>11} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} {rss}")
        if "decode_ratio" in row:
            pre, dec = _ratio(row, "prefill_ratio", rounds), _ratio(row, "decode_ratio", rounds)
            print(f"{'':>7} {'ratio':>11} {pre:>14} {dec:>13}")
        ours = row["dair"]
        if "decode_ceiling_tok_s" in ours:  # the memory's bound (engine.bench.memory_ceiling)
            print(f"{'':>7} {'memory':>11} reads {ours['read_gb_s']:.1f} GB/s: {ours['decode_weight_mb']:.1f} MB of "
                  f"weights per token allow {ours['decode_ceiling_tok_s']:.0f} tok/s; dair decodes at "
                  f"{ours['decode_tok_s'] / ours['decode_ceiling_tok_s']:.0%} of that")
        pool = row["dair"].get("pool") or {}
        if pool.get("threads", 1) > 1:  # what the kernel pool chose (dair.ops.threads.pool_summary)
            print(f"{'':>7} {'dair pool':>11} workers ran {pool['worker_share']:.0%} of chunks; {pool['solo_share']:.0%} "
                  f"of the time on one thread (solo periods: {pool['solo_stalled']} after stalls, {pool['solo_absent']} "
                  f"with the workers absent)")
    kern = rows[0]["dair"].get("kernels")
    if kern:  # which kernels ran (engine.bench.kernels_in_use)
        print(f"dair kernels: {kern['family']} family; " + ", ".join(
            f"{qt} {k['decode']}" + ("" if k["decode"] == k["prefill"] else f" (decode), {k['prefill']} (prefill)")
            for qt, k in kern["by_type"].items()))
    for eng, (lo, hi, pre, dec) in scaling.items():
        spread = ""
        if rounds > 1:
            p_lo, p_hi, d_lo, d_hi = ranges[eng]
            spread = f" (rounds: prefill {p_lo:.2f}-{p_hi:.2f}x, decode {d_lo:.2f}-{d_hi:.2f}x)"
        print(f"{eng}: {hi} threads vs {lo}: prefill {pre:.2f}x, decode {dec:.2f}x{spread}")
    bw = {r["threads"]: r["dair"]["read_gb_s"] for r in rows if "read_gb_s" in r["dair"]}
    if len(bw) > 1:  # what a second thread can add to a memory-bound decode
        lo, hi = min(bw), max(bw)
        print(f"memory read bandwidth: {hi} threads vs {lo}: {bw[hi] / bw[lo]:.2f}x ({bw[lo]:.1f} -> {bw[hi]:.1f} GB/s)")
    first = rows[0]["dair"]
    if "arch" in first:
        moe = (f", {first['experts_per_token']} experts computed per token over all layers (a prefill batch "
               "runs each chosen expert once)") if "experts_per_token" in first else ""
        print(f"model architecture {first['arch']}{moe}")


def handle(args: argparse.Namespace) -> int:
    threads = args.threads or [1, 2]
    models = args.model or [None]
    if args.rounds < 1:
        raise DairError("--rounds must be at least 1")
    baseline, binary = args.baseline, args.llama_bench
    if baseline in ("auto", "llama-bench") and not binary:
        cached = cached_binary(isa_for_dair_run())
        binary = shutil.which("llama-bench") or (str(cached) if cached.exists() else None)
    if baseline == "auto":
        baseline = ("llama-bench" if binary else
                    "llama.cpp" if importlib.util.find_spec("llama_cpp") and not args.depth else "none")
    if baseline == "llama-bench" and not binary:
        raise DairError("--baseline llama-bench needs --llama-bench PATH, llama-bench on PATH, or a build by "
                        f"`python benchmarks/build_llama_bench.py --isa {isa_for_dair_run()}`")
    if baseline == "llama.cpp" and args.depth:
        raise DairError("--depth is measured against llama-bench (--llama-bench PATH), not llama-cpp-python")
    from dair.model import open_model
    from dair.model.fetch import resolve_model_path

    for model in models:  # a missing or wrong file is named now, not after minutes of the others' runs
        open_model(resolve_model_path(model))
    # rounds[m][k]: model m's k-th round, a row per thread count
    rounds: list[list[list[dict]]] = [[] for _ in models]
    for k in range(args.rounds):
        for m, model in enumerate(models):
            if not args.json:
                what = f"round {k + 1}/{args.rounds}: " if args.rounds > 1 else ""
                name = f" of {resolve_model_path(model).name}" if len(models) > 1 else ""
                print(f"{what}measuring{name} with {', '.join(map(str, threads))} thread(s) ...", file=sys.stderr,
                      flush=True)
            rounds[m].append([_measure(args, model, t, baseline, binary, dair_first=k % 2 == 0) for t in threads])
    depth = args.depth or args.prompt_tokens
    label = {"llama-bench": f"llama.cpp's llama-bench ({binary})", "llama.cpp": "llama.cpp through llama-cpp-python",
             "none": "no baseline"}[baseline]
    results = []
    for model, mine in zip(models, rounds, strict=True):
        rows, scaling, ranges = _combine(mine)
        results.append({"model": str(resolve_model_path(model)), "runs": rows, "rounds": mine,
                        "thread_scaling": scaling, "thread_scaling_range": ranges})
    if args.json:
        flat = {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "depth": depth,
                "baseline": label, "n_rounds": args.rounds, "models": results}
        # the first model's figures at the top, and of its last (largest by default) thread count
        flat.update({k: results[0][k] for k in ("runs", "thread_scaling")})
        flat.update({k: results[0]["runs"][-1]["dair"][k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")})
        print(json.dumps(flat))
        return 0
    spread = (f"; {args.rounds} interleaved rounds: rates and ratios are their medians, (a-b) the ratios' range"
              if args.rounds > 1 else "")
    print(f"prefill of {args.prompt_tokens} tokens; decode of {args.gen_tokens} after {depth} tokens of context; "
          f"dair KV cache {results[0]['runs'][-1]['dair'].get('kv_type', '?')}; baseline: {label}{spread}")
    for i, r in enumerate(results):
        if i:
            print()
        _report(Path(r["model"]).name, r["runs"], r["thread_scaling"], r["thread_scaling_range"], args.rounds)
    return 0
