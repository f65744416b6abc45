"""What the HTTP API costs: time to first token and decode tokens/s of a streamed answer through
`dair serve` (OpenAI /v1/completions, server-sent events) against `dair generate --bus`'s client
(BusBackend) on the same 3-stage cluster, in the same run, as ratios.

    python benchmarks/bench_serve.py [--tokens 48] [--runs 5] [--threads 1] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from dair.bus.client import BusBackend
from dair.bus.local import LocalCluster, _command, free_port_pair
from dair.engine.sampling import SamplingParams

PROMPT = "The history of the Roman Empire began"


def via_bus(addr: str, tokens: int) -> tuple[float, float, int]:
    """(time to first token s, decode tok/s after it, tokens) through BusBackend, as `dair generate --bus`."""
    b = BusBackend(addr, timeout=300)
    try:
        ids = b.tokenizer.encode(PROMPT)
        stamps: list[float] = []
        t0 = time.perf_counter()
        b.generate(ids, SamplingParams(temperature=0.0), tokens, set(b.model_info["eos_ids"]),
                   on_token=lambda _id, _piece: stamps.append(time.perf_counter()) and None)
    finally:
        b.close()
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def via_api(http: httpx.Client, url: str, model: str, tokens: int) -> tuple[float, float, int]:
    """The same through the HTTP API: a streamed completion read chunk by chunk, on a kept-alive
    connection (a new httpx client per request would time its SSL set-up, not the server)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    stamps: list[float] = []
    t0 = time.perf_counter()
    with http.stream("POST", url + "/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                stamps.append(time.perf_counter())
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def server_ttft(url: str) -> tuple[float, int]:
    """The server's own sum and count of times to first token (from request to the bus's first token)."""
    m = dict(ln.rsplit(" ", 1) for ln in httpx.get(url + "/metrics").text.splitlines() if ln and ln[0] != "#")
    return float(m["dair_time_to_first_token_seconds_sum"]), int(float(m["dair_time_to_first_token_seconds_count"]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from dair.model.fetch import resolve_model_path

    model = str(resolve_model_path(args.model))
    log = open(Path(tempfile.gettempdir()) / f"bench-serve-{os.getpid()}.log", "w")  # noqa: SIM115
    cluster = LocalCluster(model, [(0, 9), (10, 19), (20, 29)], threads=args.threads, log=log).start()
    port = free_port_pair()
    url = f"http://127.0.0.1:{port}"
    serve = None
    try:
        cluster.wait_ready(180)
        serve = subprocess.Popen(_command("dair", "dair.cli") + ["serve", "--bus", cluster.addr, "--listen",
                                 f"127.0.0.1:{port}", "--model", model], stdout=log, stderr=subprocess.STDOUT)
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        name = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        http = httpx.Client()
        via_bus(cluster.addr, 4), via_api(http, url, name, 4)  # warm-up
        bus, api = [], []
        before = server_ttft(url)
        for _ in range(args.runs):  # interleaved, so that the machine's noise hits both alike
            bus.append(via_bus(cluster.addr, args.tokens))
            api.append(via_api(http, url, name, args.tokens))
        after = server_ttft(url)
        inside_ms = (after[0] - before[0]) / max(1, after[1] - before[1]) * 1000
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(10)
        cluster.stop()
        log.close()

    def med(rows: list[tuple[float, float, int]], i: int) -> float:
        return statistics.median(r[i] for r in rows)

    out = {"cpu": platform.processor() or platform.machine(), "threads_per_stage": args.threads,
           "tokens": args.tokens, "runs": args.runs,
           "bus_ttft_ms": med(bus, 0) * 1000, "api_ttft_ms": med(api, 0) * 1000,
           "api_ttft_inside_server_ms": inside_ms,
           "bus_decode_tok_s": med(bus, 1), "api_decode_tok_s": med(api, 1),
           "tokens_bus": [r[2] for r in bus], "tokens_api": [r[2] for r in api]}
    out["ttft_ratio_api_over_bus"] = out["api_ttft_ms"] / out["bus_ttft_ms"]
    out["decode_ratio_api_over_bus"] = out["api_decode_tok_s"] / out["bus_decode_tok_s"]
    if args.json:
        print(json.dumps(out))
    else:
        print(f"3 stages, {args.threads} thread(s) each, {args.tokens} tokens, median of {args.runs}:")
        print(f"  dair generate --bus : first token {out['bus_ttft_ms']:7.1f} ms, decode {out['bus_decode_tok_s']:6.1f} tok/s")
        print(f"  HTTP API (SSE)      : first token {out['api_ttft_ms']:7.1f} ms, decode {out['api_decode_tok_s']:6.1f} tok/s")
        print(f"  of which inside the server (session, prefill, first token): {inside_ms:.1f} ms (mean)")
        print(f"  API / bus           : first token x{out['ttft_ratio_api_over_bus']:.2f}, "
              f"decode x{out['decode_ratio_api_over_bus']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
