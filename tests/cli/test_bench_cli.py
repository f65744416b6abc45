"""`dair bench` end to end on the default model: its figures and its baseline's failures.

The runs are tiny (8 prompt tokens, 4 decoded, one run, one thread): what is checked is the
command's contract (what it measures and names, and that a broken baseline is one clear error),
not speed. The baselines here are stand-in programs, because the point is how dair reports a
llama-bench that crashes or prints something else; the real llama-bench comparison is the
benchmark itself (README, Performance).
"""
from __future__ import annotations

import json
import os
import stat
import statistics
import subprocess
from pathlib import Path

from dair.bus.local import _command

DAIR = _command("dair", "dair.cli")
TINY = ["--threads", "1", "--prompt-tokens", "8", "--gen-tokens", "4", "--runs", "1"]


def _bench(default_model: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    return subprocess.run(DAIR + ["bench", "--model", str(default_model), *TINY, *extra], capture_output=True,
                          text=True, timeout=300, env=env)


def _program(tmp_path: Path, body: str) -> str:
    p = tmp_path / "llama-bench"
    p.write_text("#!/bin/sh\n" + body + "\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return str(p)


def test_bench_reports_dair_rates_and_kernels(default_model):
    r = _bench(default_model, "--baseline", "none", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    row = out["runs"][0]["dair"]
    assert out["baseline"] == "no baseline" and out["prompt_tokens"] == 8 and out["gen_tokens"] == 4
    assert row["threads"] == 1 and row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0
    assert row["kernels"]["family"] in ("avx512", "avx2", "neon", "scalar")
    # the memory's bound beside it: weight bytes per token over the measured read bandwidth
    assert row["read_gb_s"] > 0 and row["decode_weight_mb"] > 90
    assert abs(row["decode_ceiling_tok_s"] - row["read_gb_s"] * 1e3 / row["decode_weight_mb"]) < 1e-6


def test_a_crashing_llama_bench_is_named_with_its_signal(default_model, tmp_path):
    # a baseline killed by a signal prints nothing: the error says which signal ended it
    binary = _program(tmp_path, "kill -SEGV $$")
    r = _bench(default_model, "--llama-bench", binary)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{binary} failed: no output (killed by SIGSEGV)" in r.stderr


def test_a_llama_bench_that_prints_something_else_is_refused(default_model, tmp_path):
    binary = _program(tmp_path, "echo 'not json'")
    r = _bench(default_model, "--llama-bench", binary)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert "output is not llama-bench's JSON with pp8 and tg4 @ d8" in r.stderr


def test_rounds_interleave_every_model_and_ratios_are_the_rounds_medians(default_model):
    # Two rounds of two models (the same file twice) at 1 and 2 threads: every measurement is
    # kept per round, and the thread scaling printed is the median of the rounds' own ratios.
    r = subprocess.run(DAIR + ["bench", "--model", str(default_model), "--model", str(default_model),
                               "--threads", "1", "--threads", "2", "--prompt-tokens", "8", "--gen-tokens", "4",
                               "--runs", "1", "--rounds", "2", "--baseline", "none", "--json"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["n_rounds"] == 2 and len(out["models"]) == 2
    for m in out["models"]:
        assert m["model"] == str(default_model) and len(m["rounds"]) == 2
        per_round = [rows[1]["dair"]["decode_tok_s"] / rows[0]["dair"]["decode_tok_s"] for rows in m["rounds"]]
        lo, hi, _, dec = m["thread_scaling"]["dair"]
        assert (lo, hi) == (1, 2) and abs(dec - statistics.median(per_round)) < 1e-9
        d_lo, d_hi = m["thread_scaling_range"]["dair"][2:]
        assert d_lo == min(per_round) and d_hi == max(per_round)
        rates = [rows[0]["dair"]["prefill_tok_s"] for rows in m["rounds"]]
        assert m["runs"][0]["dair"]["prefill_tok_s"] == statistics.median(rates)
    assert out["runs"] == out["models"][0]["runs"]


def test_rounds_must_be_positive(default_model):
    r = _bench(default_model, "--rounds", "0", "--baseline", "none")
    assert r.returncode != 0 and "--rounds must be at least 1" in r.stderr and "Traceback" not in r.stderr


def test_a_wrong_model_file_is_named_before_any_measurement(default_model, tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_bytes(b"not a model at all")
    r = _bench(default_model, "--model", str(bad), "--baseline", "none")
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert str(bad) in r.stderr and "bad magic" in r.stderr
    assert "measuring" not in r.stderr  # refused up front, not after the good model's runs
