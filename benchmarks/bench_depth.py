"""Decode at depth against decode at a short context, interleaved token by token in one process.

    python benchmarks/bench_depth.py [--threads 2] [--depth 2000] [--tokens 48] [--kv f16,q8_0]

Two sessions of one engine, one after 16 tokens and one after --depth tokens, decode a token in
turn, so a burst of load on a shared machine slows both alike; the medians of the per-token times
and their ratio (the depth rate over the short one) are printed per KV type,
with the attention calls' own share of each step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2000)
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--kv", default="f16,q8_0")
    a = ap.parse_args()
    import dair.engine.kvcache as kvcache
    from dair.engine.forward import RangeEngine
    from dair.model import open_model
    from dair.model.fetch import default_model_path

    spent = [0.0]
    attention = kvcache.attention

    def timed(*args, **kw):
        t0 = time.perf_counter()
        try:
            return attention(*args, **kw)
        finally:
            spent[0] += time.perf_counter() - t0

    kvcache.attention = timed
    model = open_model(default_model_path())
    rng = np.random.default_rng(16)
    print(f"load average {os.getloadavg()[0]:.1f}; {a.threads} threads; depth {a.depth} vs {a.short}", flush=True)
    out = {}
    for kv in a.kv.split(","):
        eng = RangeEngine(model, 0, model.config.n_layers - 1, threads=a.threads, kv_type=kv,
                          max_context=a.depth + a.tokens + 8)
        lens = {"short": a.short, "deep": a.depth}
        for sid, n in lens.items():
            eng.open_session(sid)
            ids = rng.integers(0, model.config.vocab_size, n).astype(np.int32)
            for s in range(0, n, 256):
                eng.run_layers(eng.embed(ids[s:s + 256]), [(sid, np.arange(s, min(n, s + 256), dtype=np.int32))])
        times = {sid: [] for sid in lens}
        attn = {sid: [] for sid in lens}
        for step in range(a.tokens):
            for sid in lens:
                pos = np.array([lens[sid] + step], np.int32)
                spent[0] = 0.0
                t0 = time.perf_counter()
                eng.head(eng.run_layers(eng.embed(np.array([step % 1000 + 10], np.int32)), [(sid, pos)]))
                times[sid].append(time.perf_counter() - t0)
                attn[sid].append(spent[0])
        med = {sid: statistics.median(v) for sid, v in times.items()}
        am = {sid: statistics.median(v) for sid, v in attn.items()}
        ratio = med["short"] / med["deep"]
        print(f"{kv}: short {1 / med['short']:.1f} tok/s (attention {am['short'] * 1e3:.2f} ms), depth {a.depth} "
              f"{1 / med['deep']:.1f} tok/s (attention {am['deep'] * 1e3:.2f} ms): {ratio:.2f}x", flush=True)
        out[kv] = {"short_tok_s": 1 / med["short"], "deep_tok_s": 1 / med["deep"], "ratio": ratio,
                   "attn_ms_short": am["short"] * 1e3, "attn_ms_deep": am["deep"] * 1e3}
        eng.close()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
