"""A/B of two decode-step variants in one engine, alternating round by round (the machine's load
drifts; the ratio is the median of the rounds' ratios):

    python benchmarks/bench_decode_ab.py --variant prefetch [--rounds 12] [--steps 64] [--threads 2]
    python benchmarks/bench_decode_ab.py --variant store
    python benchmarks/bench_decode_ab.py --variant glue --threads 1

- prefetch: the idle worker's read-ahead of the next matrices off (A) and on at 1 MiB (B);
- store: this step's keys and values written by numpy casts before the attention call (A, the
  previous code, f16 cache) and by the attention call itself (B, engine/kvcache.py);
- glue: a layer's Python between the kernel calls as it was (A: a method call for the projection
  and its biases, the sliding-window rule, numpy slices and an output buffer for the one
  session's attention, numpy's += for the residuals) and as engine/forward.py has it (B).
  The kernels and their order are the same, and so are the bits (checked before timing).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", choices=("prefetch", "store", "glue"), required=True)
    ap.add_argument("--model", default=None)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import dair.engine.forward as F
    import dair.engine.kvcache as K
    from dair.backend import LocalBackend
    from dair.ops.attention import attention
    from dair.ops.matmul import set_worker_prefetch
    from dair.ops.threads import set_num_threads

    b = LocalBackend(a.model, threads=a.threads, quiet=True, kv_type="f16")
    e = b.engine
    e.open_session("s")
    e.run_layers(e.embed(np.arange(8, dtype=np.int32)), [("s", np.arange(8, dtype=np.int32))])
    set_num_threads(a.threads)
    in_call = K.SessionCache.attend

    def numpy_store(self, j, q, k, v, pos, out, scale=None, window=0):
        lo, hi = int(pos[0]), int(pos[-1]) + 1
        self.k[j][lo:hi] = k
        self.v[j][lo:hi] = v
        attention(q, self.k[j], self.v[j], pos, out=out, scale=scale, window=window)

    layer_now = F.RangeEngine._layer

    def layer_before(self, j, w, x, spans, all_pos):  # engine/forward.py's _layer before the glue change
        c, n = self.cfg, x.shape[0]
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        h = F.rmsnorm(x, w.attn_norm, c.rms_eps)
        q, k, v = project(self, (w.wq, w.wk, w.wv), (w.bq, w.bk, w.bv), h)
        q, k, v = q.reshape(n, H, hd), k.reshape(n, KV, hd), v.reshape(n, KV, hd)
        if w.q_norm is not None:
            q = F.rmsnorm(q.reshape(n * H, hd), w.q_norm, c.rms_eps).reshape(n, H, hd)
            k = F.rmsnorm(k.reshape(n * KV, hd), w.k_norm, c.rms_eps).reshape(n, KV, hd)
        sliding = F.is_sliding(c, self.first + j)
        q, k = self._rotate(q, all_pos, sliding), self._rotate(k, all_pos, sliding)
        att = np.empty_like(q)
        for cache, pos, rows in spans:
            cache.attend(j, q[rows], k[rows], v[rows], pos, att[rows], scale=self.attn_scale,
                         window=c.sliding_window if sliding else 0)
        a_ = w.wo.matmul(att.reshape(n, H * hd), act_q8=self.act_q8)
        if w.attn_post_norm is not None:
            a_ = F.rmsnorm(a_, w.attn_post_norm, c.rms_eps, out=a_)
        x += a_
        h = F.rmsnorm(x, w.ffn_norm, c.rms_eps)
        f = self._moe(j, w, h) if w.router is not None else ffn_before(self, w.w_gate, w.w_up, w.w_down, h)
        if w.ffn_post_norm is not None:
            f = F.rmsnorm(f, w.ffn_post_norm, c.rms_eps, out=f)
        x += f

    def project(self, ms, biases, h):
        ys = F.matmul_many(ms, h, act_q8=self.act_q8)
        for y, bias in zip(ys, biases, strict=True):
            if bias is not None:
                y += bias
        return ys

    def ffn_before(self, gate, up, down, h):
        g, u = F.matmul_many((gate, up), h, act_q8=self.act_q8)
        if self.cfg.ffn_act == "silu":
            F.silu_mul(g, u)
        else:
            F.gelu_tanh_mul(g, u)
        return down.matmul(g, act_q8=self.act_q8)

    def use(variant_b: bool) -> None:
        if a.variant == "prefetch":
            set_worker_prefetch(1 << 20 if variant_b else 0)
        elif a.variant == "store":
            K.SessionCache.attend = in_call if variant_b else numpy_store
        else:
            F.RangeEngine._layer = layer_now if variant_b else layer_before

    def step_us() -> float:
        e.truncate_session("s", 8)
        t0 = time.perf_counter()
        for pos in range(8, 8 + a.steps):
            x = e.run_layers(e.embed(np.array([5], np.int32)), [("s", np.array([pos], np.int32))])
            e.head(x)
        return (time.perf_counter() - t0) / a.steps * 1e6

    if a.variant == "glue":
        outs = []
        for variant_b in (False, True):
            use(variant_b)
            e.truncate_session("s", 8)
            outs.append(e.run_layers(e.embed(np.array([5, 6], np.int32)), [("s", np.array([8, 9], np.int32))]))
        if not np.array_equal(*outs):
            raise SystemExit("glue: the two layer variants do not give the same bits")
    ra, rb = [], []
    for r in range(a.rounds):
        # which goes first alternates: a slow spell of the host then lands on both alike
        for variant_b in ((False, True) if r % 2 == 0 else (True, False)):
            use(variant_b)
            (rb if variant_b else ra).append(step_us())
    use(True)
    ratios = [y / x for x, y in zip(ra, rb, strict=True)]
    print(f"{a.variant}, {a.threads} threads: A {statistics.median(ra):.0f} us, B {statistics.median(rb):.0f} us "
          f"per decode step; B/A {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}; "
          f"median of {a.rounds} rounds)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
