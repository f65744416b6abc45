"""Pipeline benchmark: what the network between stages costs, as ratios against baselines
measured in the same run (these machines are shared and noisy).

- bytes on the wire per token per hop, f32 vs Q8_0;
- added latency per hop on loopback (hop time seen by the bus minus the stage's compute time);
- decode tokens/s of 3 stages vs 1 stage (and 1 stage vs the in-process engine), beside the
  floor for the same compute on this machine: bench_zmq_floor.py's broker and stages with no dair
  code in them, each stage busy for its share of the in-process time per token (--no-floor skips it);
- aggregate tokens/s of 4 concurrent sessions vs 1 (batched decode on the stages);
- RSS of each stage against its share of the weights.

    python benchmarks/bench_pipeline.py [--tokens 64] [--threads 2] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dair.bus.client import BusClient
from dair.bus.local import LocalCluster

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}


def start(model: str, split: list[tuple[int, int]], threads: int, wire: str, log: Any) -> LocalCluster:
    c = LocalCluster(model, split, threads=threads, wire=wire, log=log).start()
    c.wait_ready(180)
    return c


def decode_rate(addr: str, tokens: int, runs: int) -> float:
    """Median decode tok/s of one session, as the bus times it."""
    rates = []
    with BusClient(addr, timeout=300) as c:
        list(c.generate(text=PROMPT, max_tokens=4, params=GREEDY))  # warm-up
        for _ in range(runs):
            done = list(c.generate(text=PROMPT, max_tokens=tokens, params=GREEDY, stop_ids=[]))[-1]
            rates.append(done["timings"]["decode_tok_s"])
    return statistics.median(rates)


def aggregate_rate(addr: str, sessions: int, tokens: int) -> float:
    """Tokens/s summed over `sessions` generations running at once."""
    prompts = [PROMPT, "Once upon a time", "The best way to learn", "In 1492,", "Water boils at",
               "My favourite food is"][:sessions]
    with BusClient(addr, timeout=300) as c:
        t0 = time.perf_counter()
        reqs = [c.start_generate(text=p, max_tokens=tokens, params=GREEDY, stop_ids=[]) for p in prompts]
        total = 0
        for r in reqs:
            for ev in c.events(r):
                if ev["type"] == "done":
                    total += len(ev["ids"])
        return total / (time.perf_counter() - t0)


def stats(addr: str) -> dict[str, Any]:
    with BusClient(addr) as c:
        return c.status()


class InProcess:
    """The baseline: the whole model in this process (dair.backend.LocalBackend)."""

    def __init__(self, model: str, threads: int) -> None:
        from dair.backend import LocalBackend
        from dair.engine.sampling import SamplingParams

        self.b = LocalBackend(model, threads=threads, quiet=True)
        self.ids = self.b.tokenizer.encode(PROMPT)
        self.p = SamplingParams(temperature=0.0)
        self.b.generate(self.ids, self.p, 4, set())

    def rate(self, tokens: int) -> float:
        return self.b.generate(self.ids, self.p, tokens, set())["timings"]["decode_tok_s"]


def floor(work_s: float, rounds: int, tokens: int = 150) -> float:
    """3 stages vs 1 through bench_zmq_floor's topology alone, for work_s of compute per token:
    the best this machine's ZeroMQ, kernel and scheduler allow the ratio to be (interleaved
    rounds, median)."""
    from bench_zmq_floor import token_time

    one, three = [], []
    for _ in range(rounds):
        one.append(token_time(1, work_s, tokens))
        three.append(token_time(3, work_s, tokens))
    return statistics.median(one) / statistics.median(three)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model file (default: the fetched default model)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens decoded per measured generation")
    ap.add_argument("--runs", type=int, default=5, help="rounds; each measures every configuration once")
    ap.add_argument("--threads", type=int, default=2, help="kernel threads per stage")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--no-floor", action="store_true", help="skip the ZeroMQ floor (bench_zmq_floor.py)")
    args = ap.parse_args(argv)
    if args.model is None:
        from dair.model.fetch import default_model_path

        args.model = str(default_model_path())
    log = open(Path(tempfile.gettempdir()) / "dair-bench-pipeline.log", "w", buffering=1)  # noqa: SIM115
    r: dict[str, Any] = {"threads": args.threads, "tokens": args.tokens}
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print

    say("starting clusters: 1 stage (q8_0), 3 stages (q8_0), 3 stages (f32) ...")
    from dair.model import open_model

    n = open_model(args.model).config.n_layers
    sizes = [n // 3 + (i < n % 3) for i in range(3)]  # thirds, the first ones a layer more
    three = [(sum(sizes[:i]), sum(sizes[:i + 1]) - 1) for i in range(3)]
    clusters = {"one": start(args.model, [(0, n - 1)], args.threads, "q8_0", log),
                "three_q8_0": start(args.model, three, args.threads, "q8_0", log),
                "three_f32": start(args.model, three, args.threads, "f32", log)}
    local = InProcess(args.model, args.threads)
    try:
        # Alternate the configurations round by round and keep medians: the machine's load drifts,
        # and interleaving puts every configuration under the same drift.
        rates: dict[str, list[float]] = {k: [] for k in ("in_process", *clusters, "agg1", "agg4", "agg1_one",
                                                         "agg4_one")}
        for rnd in range(args.runs):
            say(f"round {rnd + 1}/{args.runs} ...")
            rates["in_process"].append(local.rate(args.tokens))
            for k, c in clusters.items():
                rates[k].append(decode_rate(c.addr, args.tokens, 1))
            rates["agg1"].append(aggregate_rate(clusters["three_q8_0"].addr, 1, args.tokens))
            rates["agg4"].append(aggregate_rate(clusters["three_q8_0"].addr, 4, args.tokens))
            rates["agg1_one"].append(aggregate_rate(clusters["one"].addr, 1, args.tokens))
            rates["agg4_one"].append(aggregate_rate(clusters["one"].addr, 4, args.tokens))
        med = {k: statistics.median(v) for k, v in rates.items()}
        r["rates_all_rounds"] = rates
        r["in_process_decode_tok_s"] = med["in_process"]
        r["one_stage_decode_tok_s"] = med["one"]
        r["three_stage_q8_0_decode_tok_s"] = med["three_q8_0"]
        r["three_stage_f32_decode_tok_s"] = med["three_f32"]
        r["three_stage_1_session_agg_tok_s"], r["three_stage_4_sessions_tok_s"] = med["agg1"], med["agg4"]
        r["one_stage_1_session_agg_tok_s"], r["one_stage_4_sessions_tok_s"] = med["agg1_one"], med["agg4_one"]
        for wire in ("f32", "q8_0"):
            nodes = stats(clusters[f"three_{wire}"].addr)["nodes"]
            r[f"bytes_per_token_hop_{wire}"] = stats(clusters[f"three_{wire}"].addr)["totals"]["bytes_per_token_hop"]
            r[f"three_stage_{wire}_hop_ms_p50"] = [n["hop_ms_p50"] for n in nodes]
            r[f"three_stage_{wire}_compute_ms_p50"] = [n["compute_ms_p50"] for n in nodes]
            r[f"three_stage_{wire}_added_ms_per_hop"] = statistics.median(
                n["hop_ms_p50"] - n["compute_ms_p50"] for n in nodes)
            r[f"three_stage_{wire}_max_batch"] = max(n["max_batch"] for n in nodes)
            if wire == "q8_0":
                r["rss"] = [{"layers": f"{n['first']}-{n['last']}", "rss_mb": n["rss"] / 2**20,
                             "rss_before_weights_mb": n["rss_at_register"] / 2**20,
                             "weights_share_mb": n["resident_bytes"] / 2**20,
                             "growth_over_share": (n["rss"] - n["rss_at_register"]) / max(1, n["resident_bytes"])}
                            for n in nodes]
    finally:
        for c in clusters.values():
            c.stop()
    log.close()
    if not args.no_floor:
        say("the ZeroMQ floor for this compute ...")
        r["floor_three_vs_one"] = floor(1.0 / r["in_process_decode_tok_s"], args.runs)
    r["load_average_1m"] = os.getloadavg()[0]

    ratios = {
        "bytes/token/hop q8_0 vs f32": r["bytes_per_token_hop_q8_0"] / r["bytes_per_token_hop_f32"],
        "decode 3 stages (q8_0) vs 1 stage": r["three_stage_q8_0_decode_tok_s"] / r["one_stage_decode_tok_s"],
        "decode 3 stages (f32) vs 1 stage": r["three_stage_f32_decode_tok_s"] / r["one_stage_decode_tok_s"],
        **({"3 stages vs 1, ZeroMQ alone (floor)": r["floor_three_vs_one"]}
           if "floor_three_vs_one" in r else {}),
        "decode 1 stage vs in-process": r["one_stage_decode_tok_s"] / r["in_process_decode_tok_s"],
        "aggregate 4 sessions vs 1 (3 stages)": r["three_stage_4_sessions_tok_s"] / r["three_stage_1_session_agg_tok_s"],
        "aggregate 4 sessions vs 1 (1 stage)": r["one_stage_4_sessions_tok_s"] / r["one_stage_1_session_agg_tok_s"],
    }
    r["ratios"] = ratios
    if args.json:
        print(json.dumps(r, indent=2))
        return 0
    print()
    print(f"bytes per token per hop: f32 {r['bytes_per_token_hop_f32']:.0f}, q8_0 {r['bytes_per_token_hop_q8_0']:.0f}")
    print(f"added latency per hop on loopback (bus hop minus stage compute, p50): "
          f"{r['three_stage_q8_0_added_ms_per_hop']:.2f} ms (q8_0), {r['three_stage_f32_added_ms_per_hop']:.2f} ms (f32)")
    print(f"decode tok/s: in-process {r['in_process_decode_tok_s']:.1f}, 1 stage {r['one_stage_decode_tok_s']:.1f}, "
          f"3 stages q8_0 {r['three_stage_q8_0_decode_tok_s']:.1f}, f32 {r['three_stage_f32_decode_tok_s']:.1f}")
    print(f"aggregate tok/s, 3 stages: 4 sessions {r['three_stage_4_sessions_tok_s']:.1f}, "
          f"1 session {r['three_stage_1_session_agg_tok_s']:.1f} (largest batch {r['three_stage_q8_0_max_batch']})")
    for row in r["rss"]:
        print(f"stage {row['layers']:>6}: RSS {row['rss_mb']:.0f} MB ({row['rss_before_weights_mb']:.0f} MB before "
              f"weights), weights share {row['weights_share_mb']:.1f} MB, growth/share {row['growth_over_share']:.2f}")
    print()
    for k, v in ratios.items():
        print(f"{k:40} {v:.2f}x")
    print(f"(medians of {args.runs} interleaved rounds; 1-minute load average at the end: {r['load_average_1m']:.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
