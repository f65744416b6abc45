"""A dair client for one test host: waits for the pipeline, generates greedily, prints JSON.

Run inside a network namespace (`ip netns exec NS python tests/support/netns_client.py --bus ADDR ...`)
by tests/cluster/test_netns.py and benchmarks/bench_network.py, or directly for a loopback baseline, so
that both measure through the same client. Output (one JSON object on stdout):

    {"ready_s": ..., "runs": [{"ids": [...], "decode_tok_s": ..., "prefill_s": ..., "wall_s": ...}],
     "nodes": [{"name", "first", "last", "hop_ms_p50", "hop_ms_p95", "compute_ms_p50",
                "bytes_in", "bytes_out"}], "bytes_per_token_hop": ...}
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from dair.bus.client import BusClient

GREEDY = {"temperature": 0.0, "repeat_penalty": 1.0}


def measure(addr: str, ids: list[int], tokens: int, runs: int, wait: float) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": []}
    t0 = time.monotonic()
    with BusClient(addr, timeout=120) as c:
        c.wait_ready(wait)
        out["ready_s"] = time.monotonic() - t0
        # Warm-up: first touches of each stage's weights and KV cache are not network costs.
        list(c.generate(ids=ids, max_tokens=2, params=GREEDY, stop_ids=[]))
        for _ in range(runs):
            t = time.perf_counter()
            done = list(c.generate(ids=ids, max_tokens=tokens, params=GREEDY, stop_ids=[]))[-1]
            out["runs"].append({"ids": done["ids"], "wall_s": time.perf_counter() - t,
                                "decode_tok_s": done["timings"]["decode_tok_s"],
                                "prefill_s": done["timings"]["prefill_s"]})
        st = c.status()
    keys = ("name", "first", "last", "hop_ms_p50", "hop_ms_p95", "compute_ms_p50", "bytes_in", "bytes_out")
    out["nodes"] = [{k: n.get(k) for k in keys} for n in st["nodes"]]
    out["bytes_per_token_hop"] = st["totals"]["bytes_per_token_hop"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bus", required=True)
    ap.add_argument("--ids", required=True, help="prompt token ids, comma-separated")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the pipeline to be ready")
    args = ap.parse_args(argv)
    ids = [int(x) for x in args.ids.split(",")]
    try:
        r = measure(args.bus, ids, args.tokens, args.runs, args.wait)
    except Exception as e:  # the caller reads stdout: say what failed there too
        print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
        return 1
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
