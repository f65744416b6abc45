"""One measurement of prefill and decode speed, run in its own process so its peak RSS and
thread count are its own. `dair bench` drives it; `python -m dair.engine.bench` prints JSON."""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time

BENCH_TEXT = ("The history of computing is a story of machines that got smaller, cheaper and faster, "
              "and of people who found new uses for each generation of them. ")


def bench_prompt(tokenizer, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(BENCH_TEXT)
    return ids[:n]


def kernels_in_use(qtypes: set[str]) -> dict:
    """The kernel family selected, and per weight type present the family whose code runs its
    decode and prefill products (dair.ops.matmul.kernel_ops)."""
    from dair.ops.matmul import get_kernels, kernel_ops

    ops = kernel_ops(get_kernels())
    return {"family": get_kernels(), "by_type": {qt: ops[qt] for qt in sorted(qtypes) if qt in ops}}


def decode_weight_bytes(engine) -> int:
    """Weight bytes a dense model's decode step reads per token: every layer's and the output
    head's (the embedding gives one row). 0 for MoE layers, which read only the chosen experts."""
    if engine.moe_layers:
        return 0
    total = sum(w.nbytes() for w in engine.layers)
    return total + (engine.output.nbytes + engine.output_norm.nbytes if engine.has_head else 0)


def memory_ceiling(engine) -> dict:
    """The memory's bound on decode at the pool's thread count: read bandwidth (dair.ops.membw)
    and weight bytes per token, and their quotient in tokens/s."""
    from dair.ops.membw import read_bandwidth

    per_token = decode_weight_bytes(engine)
    bw = read_bandwidth()
    out = {"read_gb_s": bw / 1e9}
    if per_token:
        out.update(decode_weight_mb=per_token / 1e6, decode_ceiling_tok_s=bw / per_token)
    return out


def measure_dair(model: str | None, threads: int, prompt_tokens: int, gen_tokens: int, runs: int,
                 depth: int = 0, kv_type: str | None = None) -> dict:
    """Prefill of prompt_tokens, and decode of gen_tokens after a prompt of `depth` tokens
    (0: after the prompt_tokens one), as llama-bench's -p N and -n G -d D."""
    from dair.backend import LocalBackend
    from dair.engine.sampling import SamplingParams

    # The context these runs need, capped (and refused beyond) by the model's own.
    need = max(prompt_tokens, depth) + gen_tokens + 1
    backend = LocalBackend(model, threads=threads, quiet=True, kv_type=kv_type, max_context=need)
    prompt = bench_prompt(backend.tokenizer, prompt_tokens)
    deep = bench_prompt(backend.tokenizer, depth) if depth else None
    greedy = SamplingParams(temperature=0.0)
    backend.generate(prompt[:8], greedy, 4, set())  # warm caches and thread pools
    pre, dec = [], []
    for _ in range(runs):
        r = backend.generate(prompt, greedy, 1 if deep else gen_tokens, set())  # no stop ids: always gen_tokens
        pre.append(r["timings"]["prefill_tok_s"])
        if deep:
            r = backend.generate(deep, greedy, gen_tokens, set())
        dec.append(r["timings"]["decode_tok_s"])
    out = {"engine": "dair", "threads": threads, "prompt_tokens": prompt_tokens, "depth": depth or prompt_tokens,
           "kv_type": backend.engine.kv_type, "prefill_tok_s": statistics.median(pre),
           "decode_tok_s": statistics.median(dec), "arch": backend.model.config.arch}
    from dair.ops.threads import pool_summary

    out["pool"] = pool_summary()
    # taken before the bandwidth probe, whose buffer would otherwise be the peak
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out.update(memory_ceiling(backend.engine))
    out["kernels"] = kernels_in_use({t.qtype for t in backend.model.tensors.values()})
    st = backend.engine.stats()
    if "experts_per_token" in st:  # MoE: experts computed per token over all layers (prefill included)
        out["experts_per_token"] = round(st["experts_per_token"], 2)
    return out


def measure_llama_cpp(model: str | None, threads: int, prompt_tokens: int, gen_tokens: int, runs: int) -> dict:
    from llama_cpp import Llama

    from dair.model import open_model
    from dair.model.fetch import resolve_model_path
    from dair.tokenizer import load_tokenizer

    path = resolve_model_path(model)
    prompt = bench_prompt(load_tokenizer(open_model(path)), prompt_tokens)
    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                n_batch=512, verbose=False)
    pre, dec = [], []
    for _ in range(runs + 1):
        llm.reset()
        t0 = time.perf_counter()
        t1, n = t0, 0
        for _tok in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            n += 1
            if n == 1:
                t1 = time.perf_counter()
            if n >= gen_tokens:
                break
        t2 = time.perf_counter()
        pre.append(len(prompt) / (t1 - t0))
        dec.append((n - 1) / (t2 - t1))
    return {"engine": "llama.cpp", "threads": threads, "prefill_tok_s": statistics.median(pre[1:]),
            "decode_tok_s": statistics.median(dec[1:])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine", choices=["dair", "llama.cpp"], default="dair")
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--depth", type=int, default=0, help="decode after this many tokens of context (dair only)")
    ap.add_argument("--kv-type", choices=["f16", "f32", "q8_0"], default=None, help="dair's KV cache")
    a = ap.parse_args()
    if a.engine == "dair":
        out = measure_dair(a.model, a.threads, a.prompt_tokens, a.gen_tokens, a.runs, a.depth, a.kv_type)
    else:
        out = measure_llama_cpp(a.model, a.threads, a.prompt_tokens, a.gen_tokens, a.runs)
    out.setdefault("peak_rss_mb", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
