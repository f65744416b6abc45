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
from dair.engine.rope import inv_freq
from dair.errors import DairError
from dair.ops.activation import silu_mul
from dair.ops.matmul import Weight
from dair.ops.norm import rmsnorm
from dair.ops.rope import rope_inplace
from dair.ops.threads import set_num_threads

Segment = tuple[str, np.ndarray]  # (session id, int32 positions of its rows in x)


def _weight(t, raw: np.ndarray | None = None) -> Weight:
    return Weight(t.raw if raw is None else raw, t.qtype, t.shape[0], t.shape[1])


def _vector(t) -> np.ndarray:
    return np.ascontiguousarray(t.dequantize().reshape(-1), dtype=np.float32)


@dataclass
class LayerWeights:
    attn_norm: np.ndarray
    q: Weight
    k: Weight
    v: Weight
    o: Weight
    ffn_norm: np.ndarray
    gate: Weight
    up: Weight
    down: Weight

    @classmethod
    def load(cls, model, i: int) -> LayerWeights:
        t = model.layer_tensors(i)
        return cls(
            attn_norm=_vector(t["attn_norm"]), q=_weight(t["attn_q"]), k=_weight(t["attn_k"]),
            v=_weight(t["attn_v"]), o=_weight(t["attn_output"]), ffn_norm=_vector(t["ffn_norm"]),
            gate=_weight(t["ffn_gate"]), up=_weight(t["ffn_up"]), down=_weight(t["ffn_down"]),
        )

    def nbytes(self) -> int:
        mats = (self.q, self.k, self.v, self.o, self.gate, self.up, self.down)
        return sum(m.nbytes for m in mats) + self.attn_norm.nbytes + self.ffn_norm.nbytes


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
        self.inv_freq = inv_freq(cfg.rope_dim, cfg.rope_theta, cfg.rope_scaling)
        self.layers = [LayerWeights.load(model, i) for i in range(first, last + 1)]
        self.has_embedding = first == 0
        self.has_head = last == cfg.n_layers - 1
        self.embedding = _weight(model.embedding) if self.has_embedding else None
        if self.has_head:
            self.output_norm = _vector(model.output_norm)
            tied = self.embedding is not None and model.output is model.embedding
            self.output = self.embedding if tied else _weight(model.output)
        self.sessions: dict[str, SessionCache] = {}
        units, self.max_ram = self._units(), max_ram
        # The budget holds the KV cache of one full-length session too (engine/kvcache.py).
        self.kv_bytes_per_token, self.max_context, self.context_set_by, weights_budget = plan_kv(
            cfg, self.kv_type, len(self.layers), max_context, max_ram, [u.nbytes for u in units])
        self.residency = Residency(model, units, weights_budget, method=residency, drop_cache=drop_cache,
                                   rebuild=self._rebuild)
        self._streaming = self.residency.mode == "streaming"

    def _units(self) -> list[Unit]:
        def unit(key: int | str, tensors: list) -> Unit:
            addrs = [(_addr(t.raw), t.nbytes) for t in tensors]
            return Unit(key, min(a for a, _ in addrs), max(a + n for a, n in addrs),
                        min(t.offset for t in tensors), tensors)

        units = [unit(j, list(self.model.layer_tensors(self.first + j).values())) for j in range(len(self.layers))]
        if self.has_head:
            units.append(unit("head", [self.model.output]))
        return units

    def _rebuild(self, u: Unit, raw_of: Any) -> Any:
        """Weights of unit u over a read buffer (pread residency)."""
        if u.key == "head":
            return _weight(self.model.output, raw_of(self.model.output))
        t, w = self.model.layer_tensors(self.first + int(u.key)), self.layers[int(u.key)]
        return replace(w, **{f: _weight(t[name], raw_of(t[name])) for f, name in (
            ("q", "attn_q"), ("k", "attn_k"), ("v", "attn_v"), ("o", "attn_output"),
            ("gate", "ffn_gate"), ("up", "ffn_up"), ("down", "ffn_down"))})

    def stats(self) -> dict[str, Any]:
        """Residency figures: mode ("resident" | "streaming"), resident_bytes, disk_read_bytes,
        disk_read_mb_s, disk_wait_fraction (of the time spent in run_layers/head), ..."""
        return self.residency.stats()

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
        if self._streaming and not (self.has_head and self.residency.units[-1].pinned
                                    and self.output is self.embedding):
            # The rows read stay mapped otherwise, and over a long chat add up to the whole table.
            self.residency.release_span(self.model.embedding.raw)
        return x

    def run_layers(self, x: np.ndarray, segments: Sequence[Segment]) -> np.ndarray:
        """Run every owned layer over x (rows = the segments' tokens, in order); returns new x."""
        x = np.array(x, dtype=np.float32, order="C", copy=True)
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise DairError(f"activation shape {x.shape} does not match dim {self.dim}")
        spans, start = [], 0
        for sid, pos in segments:
            pos = np.ascontiguousarray(pos, dtype=np.int32)
            cache = self._cache(sid)
            if pos.size == 0 or pos[0] > cache.length or np.any(np.diff(pos) != 1):
                raise DairError(f"session {sid!r}: positions {pos[:1].tolist()}.. must be consecutive and start "
                                f"at or before {cache.length}")
            cache.reserve(int(pos[-1]) + 1)
            spans.append((cache, pos, slice(start, start + pos.size)))
            start += pos.size
        if start != n:
            raise DairError(f"segments cover {start} rows but the activation has {n}")
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
        for cache, pos, _ in spans:
            cache.length = max(cache.length, int(pos[-1]) + 1)
        return x

    def _layer(self, j: int, w: LayerWeights, x: np.ndarray, spans, all_pos: np.ndarray) -> None:
        n, q8 = x.shape[0], self.act_q8
        h = rmsnorm(x, w.attn_norm, self.cfg.rms_eps)
        q = w.q.matmul(h, act_q8=q8).reshape(n, self.n_heads, self.head_dim)
        k = w.k.matmul(h, act_q8=q8).reshape(n, self.n_kv, self.head_dim)
        v = w.v.matmul(h, act_q8=q8).reshape(n, self.n_kv, self.head_dim)
        rope_inplace(q, all_pos, self.inv_freq)
        rope_inplace(k, all_pos, self.inv_freq)
        att = np.empty_like(q)
        for cache, pos, rows in spans:
            cache.attend(j, q[rows], k[rows], v[rows], pos, att[rows])
        x += w.o.matmul(att.reshape(n, self.dim), act_q8=q8)
        h = rmsnorm(x, w.ffn_norm, self.cfg.rms_eps)
        g = w.gate.matmul(h, act_q8=q8)
        silu_mul(g, w.up.matmul(h, act_q8=q8))
        x += w.down.matmul(g, act_q8=q8)

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
