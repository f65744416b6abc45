"""The transformer forward pass over one contiguous layer range.

A stage owns layers first..last. The owner of layer 0 also embeds tokens; the owner of the
last layer also runs the head (final norm + output projection). Each step is one screen of
plain code over the kernels in dair.ops, in the spirit of llama2.c's run.c.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from dair.engine.kvcache import SessionCache, plan_kv
from dair.engine.residency import Residency, Unit, _addr
from dair.engine.rope import inv_freq, magnitude
from dair.errors import DairError
from dair.model.arch import EXPERTS, VECTORS, is_sliding
from dair.ops.activation import add_inplace, gelu_tanh_mul, silu_mul
from dair.ops.matmul import Weight, matmul_many
from dair.ops.norm import rmsnorm
from dair.ops.rope import rope_inplace
from dair.ops.threads import set_num_threads

# One session's rows in a batch: (session id, int32 positions of its consecutive rows in x).
SessionRows = tuple[str, np.ndarray]


def _merge(spans: list[tuple[int, int]], gap: int = 4096) -> list[tuple[int, int]]:
    """Sorted, with ranges less than `gap` apart (alignment padding between tensors) joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1] + gap:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _neox_order(head_dim: int, rope_dim: int) -> np.ndarray:
    """Head-dim order that puts each NEOX pair (i, i + rope_dim/2) side by side."""
    half = rope_dim // 2
    pairs = np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)
    return np.concatenate([pairs, np.arange(rope_dim, head_dim)]).astype(np.intp)


def _weight(t, raw: np.ndarray | None = None) -> Weight:
    return Weight(t.raw if raw is None else raw, t.qtype, t.shape[0], t.shape[1])


def _vector(t) -> np.ndarray:
    return np.ascontiguousarray(t.dequantize().reshape(-1), dtype=np.float32)


def _experts(t, raw: np.ndarray | None = None) -> list[Weight]:
    """One Weight per expert over the 3-D tensor [n_experts, rows, cols] (views, no copy)."""
    raw = t.raw if raw is None else raw
    e, rows, cols = t.shape
    per = t.nbytes // e
    return [Weight(raw[i * per:(i + 1) * per], t.qtype, rows, cols) for i in range(e)]


@dataclass
class LayerWeights:
    """One layer's weights by the fields of dair.model.arch.LAYER_TENSORS; a family's optional
    tensors (biases, q/k norms, post-norms) are None where it has none, and an MoE layer has
    router + experts instead of w_gate/w_up/w_down."""

    attn_norm: np.ndarray
    wq: Weight
    wk: Weight
    wv: Weight
    wo: Weight
    ffn_norm: np.ndarray
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None
    k_norm: np.ndarray | None = None
    attn_post_norm: np.ndarray | None = None
    ffn_post_norm: np.ndarray | None = None
    w_gate: Weight | None = None
    w_up: Weight | None = None
    w_down: Weight | None = None
    router: Weight | None = None
    gate_exps: list[Weight] | None = None
    up_exps: list[Weight] | None = None
    down_exps: list[Weight] | None = None

    @classmethod
    def load(cls, model, i: int) -> LayerWeights:
        return cls(**{f: _load(f, t) for f, t in model.layer_tensors(i).items()})

    def nbytes(self) -> int:
        total = 0
        for v in vars(self).values():
            if isinstance(v, list):
                total += sum(m.nbytes for m in v)
            elif v is not None:
                total += v.nbytes
        return total


def _load(field: str, t, raw: np.ndarray | None = None) -> Any:
    if field in VECTORS:
        return _vector(t)
    if field in EXPERTS:
        return _experts(t, raw)
    return _weight(t, raw)


class RangeEngine:
    """Layers first..last of a model file, with a KV cache per session.

    `max_ram` (bytes, None = unlimited) is the budget for resident weights: a range that does
    not fit streams its layers from disk (dair.engine.residency); `stats()` says which.
    """

    def __init__(self, model, first: int, last: int, threads: int = 0, act_q8: bool = True,
                 max_context: int = 0, max_ram: int | None = None, residency: str = "mmap",
                 drop_cache: bool = False, kv_f16: bool = True, kv_type: str | None = None) -> None:
        cfg = model.config
        if not (0 <= first <= last < cfg.n_layers):
            raise DairError(f"{model.path}: layer range {first}-{last} does not fit a model of "
                            f"{cfg.n_layers} layers (0-{cfg.n_layers - 1})")
        self.model, self.cfg = model, cfg
        self.first, self.last, self.n_layers = first, last, cfg.n_layers
        self.dim, self.vocab_size = cfg.dim, cfg.vocab_size
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.act_q8 = act_q8
        self.kv_type = kv_type or ("f16" if kv_f16 else "f32")
        set_num_threads(threads)
        ff_name = (cfg.rope_scaling or {}).get("freq_factors_tensor")
        ff = _vector(model.tensors[ff_name]) if ff_name else None
        self.inv_freq = inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling, ff)
        self.rope_mscale = magnitude(cfg.rope_scaling)
        self.rope_mscale_swa = magnitude(cfg.rope_scaling, sliding=True)
        # Sliding-window layers (gemma3) have their own base and no long-context scaling.
        self.inv_freq_swa = inv_freq(cfg.rope_dim, cfg.rope_theta_swa) if cfg.sliding_window else self.inv_freq
        self.rope_perm = _neox_order(self.head_dim, cfg.rope_dim) if cfg.rope_style == "neox" else None
        self.attn_scale = cfg.attn_scale or None
        self._gated_act = silu_mul if cfg.ffn_act == "silu" else gelu_tanh_mul
        self.layers = [LayerWeights.load(model, i) for i in range(first, last + 1)]
        self._sliding = [is_sliding(cfg, i) for i in range(first, last + 1)]
        self.has_embedding = first == 0
        self.has_head = last == cfg.n_layers - 1
        self.embedding = _weight(model.embedding) if self.has_embedding else None
        if self.has_head:
            self.output_norm = _vector(model.output_norm)
            tied = self.embedding is not None and model.output is model.embedding
            self.output = self.embedding if tied else _weight(model.output)
        self.sessions: dict[str, SessionCache] = {}
        self.experts_run = 0  # expert FFNs computed (each chosen expert once per layer and batch)
        self.tokens_run = 0  # rows through run_layers
        moe = [j for j, w in enumerate(self.layers) if w.router is not None]
        expert_spans = [sp for j in moe for e in range(cfg.n_experts) for sp in self._expert_spans(j, e)]
        reserve = max((sum(b - a for a, b in self._expert_spans(j, e)) for j in moe for e in range(cfg.n_experts)),
                      default=0)
        units, self.max_ram = self._units(), max_ram
        # The budget holds the KV cache of one full-length session too (engine/kvcache.py).
        self.kv_bytes_per_token, self.max_context, self.context_set_by, weights_budget = plan_kv(
            cfg, self.kv_type, len(self.layers), max_context, max_ram, [u.nbytes for u in units], reserve)
        self.residency = Residency(model, units, weights_budget, method=residency, drop_cache=drop_cache,
                                   rebuild=self._rebuild, expert_spans=expert_spans, expert_reserve=reserve)
        self.moe_layers = len(moe)
        self._streaming = self.residency.mode == "streaming"

    def _units(self) -> list[Unit]:
        """A unit per layer (for an MoE layer: all but its experts) and the head, for Residency."""
        def unit(key: int | str, tensors: list) -> Unit:
            spans = _merge([(_addr(t.raw), _addr(t.raw) + t.nbytes) for t in tensors])
            return Unit(key, spans[0][0], spans[-1][1], min(t.offset for t in tensors), tensors, spans=spans)

        units = []
        for j in range(len(self.layers)):
            t = self.model.layer_tensors(self.first + j)
            units.append(unit(j, [v for f, v in t.items() if f not in EXPERTS]))
        if self.has_head:
            units.append(unit("head", [self.model.output]))
        return units

    def _expert_spans(self, j: int, e: int) -> list[tuple[int, int]]:
        """Map ranges of expert e's three matrices in layer first + j."""
        out = []
        for m in (self.layers[j].gate_exps, self.layers[j].up_exps, self.layers[j].down_exps):
            a = _addr(m[e].raw)
            out.append((a, a + m[e].nbytes))
        return out

    def _rebuild(self, u: Unit, raw_of: Any) -> Any:
        """Weights of unit u over a read buffer (pread residency)."""
        if u.key == "head":
            return _weight(self.model.output, raw_of(self.model.output))
        t, w = self.model.layer_tensors(self.first + int(u.key)), self.layers[int(u.key)]
        # Experts stay on the map: they stream one by one (_each_expert), not with the unit.
        return replace(w, **{f: _load(f, tensor, raw_of(tensor)) for f, tensor in t.items()
                             if f not in VECTORS and f not in EXPERTS})

    def stats(self) -> dict[str, Any]:
        """Residency figures: mode ("resident" | "streaming"), resident_bytes, disk_read_bytes,
        disk_read_mb_s, disk_wait_fraction (of the time spent in run_layers/head), ...; with MoE
        layers, experts computed per token (over the range's MoE layers) and disk bytes per token."""
        st = self.residency.stats()
        tokens = max(self.tokens_run, 1)
        st["tokens"] = self.tokens_run
        st["disk_bytes_per_token"] = st["disk_read_bytes"] / tokens if self.tokens_run else 0.0
        if self.moe_layers:
            st.update(moe_layers=self.moe_layers, experts_per_layer=self.cfg.n_experts,
                      experts_run=self.experts_run, experts_per_token=self.experts_run / tokens)
        return st

    def kv_stats(self) -> dict[str, Any]:
        """The KV cache: type, bytes held by all sessions, bytes per token (all owned layers),
        the longest context and what set it."""
        return {"kv_type": self.kv_type, "kv_bytes": sum(c.nbytes() for c in self.sessions.values()),
                "max_ram": int(self.max_ram or 0),  # the whole budget: weights and KV cache
                "kv_bytes_per_token": self.kv_bytes_per_token, "max_context": self.max_context,
                "context_set_by": self.context_set_by}

    def close(self) -> None:
        """Stop the prefetch thread (streaming mode); the engine is unusable afterwards."""
        self.residency.close()

    # -- sessions ------------------------------------------------------------------------
    def open_session(self, sid: str) -> None:
        self.sessions[sid] = SessionCache(len(self.layers), self.n_kv, self.head_dim, self.max_context,
                                          self.kv_type)

    def close_session(self, sid: str) -> None:
        self.sessions.pop(sid, None)

    def truncate_session(self, sid: str, n_positions: int) -> None:
        self._cache(sid).truncate(n_positions)

    def _cache(self, sid: str) -> SessionCache:
        try:
            return self.sessions[sid]
        except KeyError:
            raise DairError(f"unknown session {sid!r} on layers {self.first}-{self.last}") from None

    # -- the three steps -------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        if self.embedding is None:
            raise DairError(f"layers {self.first}-{self.last} do not include layer 0: no embedding here")
        x = self.embedding.get_rows(np.ascontiguousarray(ids, dtype=np.int32))
        if self.cfg.embed_scale != 1.0:
            x *= np.float32(self.cfg.embed_scale)
        if self._streaming and not (self.has_head and self.residency.units[-1].pinned
                                    and self.output is self.embedding):
            # The rows read stay mapped otherwise, and over a long chat add up to the whole table.
            self.residency.release_span(self.model.embedding.raw)
        return x

    def run_layers(self, x: np.ndarray, sessions: Sequence[SessionRows]) -> np.ndarray:
        """Run every owned layer over x (rows = each session's tokens in turn, in the order of
        `sessions`); returns the new x."""
        x = np.array(x, dtype=np.float32, order="C", copy=True)
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DairError(f"activation shape {x.shape} does not match dim {self.dim}")
        spans, start = [], 0
        for sid, pos in sessions:
            pos = np.ascontiguousarray(pos, dtype=np.int32)
            cache = self._cache(sid)
            if pos.size == 0 or pos[0] > cache.length or np.any(np.diff(pos) != 1):
                raise DairError(f"session {sid!r}: positions {pos[:1].tolist()}.. must be consecutive and start "
                                f"at or before {cache.length}")
            cache.reserve(int(pos[-1]) + 1)
            spans.append((cache, pos, slice(start, start + pos.size)))
            start += pos.size
        if start != n:
            raise DairError(f"the sessions' positions cover {start} rows but the activation has {n}")
        all_pos = np.concatenate([p for _, p, _ in spans]) if len(spans) > 1 else spans[0][1]
        t0 = time.perf_counter()
        res = self.residency
        for j, w in enumerate(self.layers):
            if self._streaming:
                w = res.acquire(j) or w
            self._layer(j, w, x, spans, all_pos)
            if self._streaming:
                res.release(j)
        res.busy_s += time.perf_counter() - t0
        self.tokens_run += n
        for cache, pos, _ in spans:
            cache.length = max(cache.length, int(pos[-1]) + 1)
        return x

    def _layer(self, j: int, w: LayerWeights, x: np.ndarray, spans, all_pos: np.ndarray) -> None:
        """x[n, dim] += attention(x); x += ffn(x), for layer first + j (one row per token).

        Each Python step here runs between two weight streams that have pushed it out of the
        caches, so a decode step pays far more for it than its instructions: the common case
        (no biases, one session, a family without extra norms) takes the fewest calls."""
        c, n = self.cfg, x.shape[0]
        H, KV, hd = self.n_heads, self.n_kv, self.head_dim
        # q, k, v: [n, heads, hd] from the normed stream (+ bias: qwen2; per-head RMSNorm: qwen3, gemma3)
        h = rmsnorm(x, w.attn_norm, c.rms_eps)
        q, k, v = matmul_many((w.wq, w.wk, w.wv), h, act_q8=self.act_q8)
        if w.bq is not None or w.bk is not None or w.bv is not None:
            for y, bias in ((q, w.bq), (k, w.bk), (v, w.bv)):
                if bias is not None:
                    y += bias
        q, k, v = q.reshape(n, H, hd), k.reshape(n, KV, hd), v.reshape(n, KV, hd)
        if w.q_norm is not None:
            q = rmsnorm(q.reshape(n * H, hd), w.q_norm, c.rms_eps).reshape(n, H, hd)
            k = rmsnorm(k.reshape(n * KV, hd), w.k_norm, c.rms_eps).reshape(n, KV, hd)
        sliding = self._sliding[j]
        q, k = self._rotate(q, all_pos, sliding), self._rotate(k, all_pos, sliding)
        # attention over each session's cache: att [n, H, hd]
        window = c.sliding_window if sliding else 0
        if len(spans) == 1:
            att = spans[0][0].attend(j, q, k, v, all_pos, None, scale=self.attn_scale, window=window)
        else:
            att = np.empty_like(q)
            for cache, pos, rows in spans:
                cache.attend(j, q[rows], k[rows], v[rows], pos, att[rows], scale=self.attn_scale, window=window)
        a = w.wo.matmul(att.reshape(n, H * hd), act_q8=self.act_q8)  # [n, dim]
        if w.attn_post_norm is not None:
            a = rmsnorm(a, w.attn_post_norm, c.rms_eps, out=a)
        add_inplace(x, a)
        # feed-forward: dense, or the routed experts; [n, dim]
        h = rmsnorm(x, w.ffn_norm, c.rms_eps)
        f = self._moe(j, w, h) if w.router is not None else self._ffn(w.w_gate, w.w_up, w.w_down, h)
        if w.ffn_post_norm is not None:
            f = rmsnorm(f, w.ffn_post_norm, c.rms_eps, out=f)
        add_inplace(x, f)

    def _rotate(self, t: np.ndarray, pos: np.ndarray, sliding: bool) -> np.ndarray:
        # NEOX rotates dims (i, i + rope_dim/2); the kernel rotates adjacent pairs. Reordering the
        # head dims so that each NEOX pair is adjacent is the same rotation; q and k get the same
        # order, which q.k does not see (and v, the only thing attention outputs, keeps its own).
        if self.rope_perm is not None:
            t = np.ascontiguousarray(np.take(t, self.rope_perm, axis=2))
        rope_inplace(t, pos, self.inv_freq_swa if sliding else self.inv_freq, self.rope_mscale_swa if sliding else self.rope_mscale)
        return t

    def _ffn(self, gate: Weight, up: Weight, down: Weight, h: np.ndarray) -> np.ndarray:
        """down(act(gate h) * up h): [n, dim] -> [n, hidden] -> [n, dim]."""
        g, u = matmul_many((gate, up), h, act_q8=self.act_q8)
        self._gated_act(g, u)
        return down.matmul(g, act_q8=self.act_q8)

    def _moe(self, j: int, w: LayerWeights, h: np.ndarray) -> np.ndarray:
        """Mixture of experts: each row goes through its top-k experts by router softmax, weighted
        by those probabilities (renormalised to sum 1 where the family does). Each chosen expert
        runs once, over the rows routed to it."""
        top, weight = self.route(self.first + j, w.router.matmul(h, act_q8=self.act_q8))
        out = np.zeros_like(h)
        for e in self._each_expert(j, np.unique(top)):
            rows, slot = np.nonzero(top == e)
            y = self._ffn(w.gate_exps[e], w.up_exps[e], w.down_exps[e], np.ascontiguousarray(h[rows]))
            out[rows] += y * weight[rows, slot][:, None]
        return out

    def route(self, layer: int, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Router logits [n, n_experts] of `layer` -> each row's experts [n, used] (the top-k of
        the softmax) and their weights (renormalised to sum 1 where the family does, times
        expert_weights_scale where the file gives one)."""
        c = self.cfg
        p = np.exp(logits - logits.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        top = np.argsort(-p, axis=1, kind="stable")[:, :c.n_experts_used]
        weight = np.take_along_axis(p, top, axis=1)
        if c.moe_norm_weights:
            weight /= weight.sum(axis=1, keepdims=True)
        if c.expert_weights_scale:
            weight *= np.float32(c.expert_weights_scale)
        return top, weight

    def _each_expert(self, j: int, chosen: np.ndarray):
        """The chosen experts one by one; under a RAM budget each is read from disk just before its
        turn and dropped after (AirLLM's per-expert streaming: only the chosen experts' bytes)."""
        for e in chosen:
            if self._streaming:
                spans = self._expert_spans(j, int(e))
                self.residency.experts(spans)
                # counted once read: a stats() between the two (the heartbeat thread's) would show
                # an expert run with none of its bytes read
                self.experts_run += 1
                yield int(e)
                self.residency.drop(spans)
            else:
                self.experts_run += 1
                yield int(e)

    def head(self, x: np.ndarray) -> np.ndarray:
        if not self.has_head:
            raise DairError(f"layers {self.first}-{self.last} do not include the last layer: no head here")
        t0 = time.perf_counter()
        h = rmsnorm(np.ascontiguousarray(x, dtype=np.float32), self.output_norm, self.cfg.rms_eps)
        res, out = self.residency, self.output
        if self._streaming:
            out = res.acquire(len(self.layers)) or out
        logits = out.matmul(h, act_q8=self.act_q8)
        if self._streaming:
            res.release(len(self.layers))
        res.busy_s += time.perf_counter() - t0
        return logits

    def resident_bytes(self) -> int:
        """Weight bytes this engine holds in RAM: the whole range when resident, else the pinned
        units and the streamed ones in flight (see stats())."""
        if self._streaming:
            return self.residency.resident_bytes()
        total = sum(w.nbytes() for w in self.layers)
        if self.embedding is not None:
            total += self.embedding.nbytes
        if self.has_head:
            total += self.output_norm.nbytes + (0 if self.embedding is self.output else self.output.nbytes)
        return total
