"""`dair bench`: prefill and decode tokens/s and peak RSS on the default model, beside llama.cpp
(when llama-cpp-python is installed) measured in the same run."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys

from dair.errors import DairError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="prefill/decode tokens/s and peak RSS, with llama.cpp as the in-run baseline")
    p.add_argument("--model", metavar="PATH")
    p.add_argument("--threads", type=int, action="append", help="thread count (repeatable; default: 1 and 2)")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="runs per measurement (median is reported)")
    p.add_argument("--baseline", choices=["auto", "llama.cpp", "none"], default="auto",
                   help="auto: llama.cpp if llama-cpp-python is installed")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=handle)


def _run(engine: str, args: argparse.Namespace, threads: int) -> dict:
    cmd = [sys.executable, "-m", "dair.engine.bench", "--engine", engine, "--threads", str(threads),
           "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens), "--runs", str(args.runs)]
    if args.model:
        cmd += ["--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DairError(f"benchmark of {engine} with {threads} thread(s) failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def handle(args: argparse.Namespace) -> int:
    threads = args.threads or [1, 2]
    baseline = args.baseline
    if baseline == "auto":
        baseline = "llama.cpp" if importlib.util.find_spec("llama_cpp") else "none"
    rows = []
    for t in threads:
        if not args.json:
            print(f"measuring {t} thread(s) ...", file=sys.stderr, flush=True)
        row = {"threads": t, "dair": _run("dair", args, t)}
        if baseline == "llama.cpp":
            ref = _run("llama.cpp", args, t)
            row["llama.cpp"] = ref
            row["decode_ratio"] = row["dair"]["decode_tok_s"] / ref["decode_tok_s"]
            row["prefill_ratio"] = row["dair"]["prefill_tok_s"] / ref["prefill_tok_s"]
        rows.append(row)
    if args.json:
        flat = {"prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "runs": rows}
        # top-level keys describe the last (largest by default) thread count
        flat.update({k: rows[-1]["dair"][k] for k in ("prefill_tok_s", "decode_tok_s", "peak_rss_mb")})
        print(json.dumps(flat))
        return 0
    print(f"{'threads':>7} {'engine':>10} {'prefill tok/s':>14} {'decode tok/s':>13} {'peak RSS MB':>12}")
    for row in rows:
        for eng in ("dair", "llama.cpp"):
            if eng in row:
                r = row[eng]
                print(f"{row['threads']:>7} {eng:>10} {r['prefill_tok_s']:>14.1f} {r['decode_tok_s']:>13.1f} "
                      f"{r['peak_rss_mb']:>12.0f}")
        if "decode_ratio" in row:
            print(f"{'':>7} {'ratio':>10} {row['prefill_ratio']:>13.2f}x {row['decode_ratio']:>12.2f}x")
    first = rows[0]["dair"]
    if "arch" in first:
        moe = (f", {first['experts_per_token']} experts computed per token over all layers (a prefill batch "
               "runs each chosen expert once)") if "experts_per_token" in first else ""
        print(f"model architecture {first['arch']}{moe}")
    return 0
