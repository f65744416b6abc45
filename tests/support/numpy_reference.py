"""An independent float32 forward pass of a GGUF model, in plain numpy.

Written from the architectures' definitions, not from dair's engine: weights are read with the
`gguf` package's own reader and dequantizer, so a bug in dair's model reader or kernels cannot
hide in it. Slow and simple on purpose: one sequence from position 0, no cache, every head and
every expert in its own loop.

The families, as their papers / reference code define them (and llama.cpp computes them):

- llama (and Mixtral): pre-RMSNorm attention with rotary on adjacent pairs (GGUF permutes the
  llama q/k rows for that), pre-RMSNorm SwiGLU FFN; Mixtral's FFN is a mixture of experts:
  softmax over the router logits, the top-k experts' SwiGLU outputs summed with their
  probabilities renormalised to 1.
- qwen2: llama + biases on q, k, v; rotary on the two halves of each head ("neox").
- qwen3: llama + RMSNorm over each head of q and k before rotary; neox rotary; head_dim from
  `key_length`. qwen3moe: qwen3 with Mixtral's expert FFN.
- gemma3: qwen3's attention with q scaled by 1/sqrt(head_dim) (1/sqrt(dim/heads) at 62 layers);
  the embedding times sqrt(dim); RMSNorm of the attention and FFN outputs before each residual
  add; GELU(tanh) gating; 5 of every 6 layers see only the last `sliding_window` positions and
  rotate with base 10000, every 6th sees all and uses the file's base; output tied to the
  embedding.
"""
from __future__ import annotations

import math
from functools import cache

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class NumpyModel:
    def __init__(self, path: str) -> None:
        r = GGUFReader(path)
        meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
        a = self.arch = meta["general.architecture"]
        self.n_layers = int(meta[f"{a}.block_count"])
        self.dim = int(meta[f"{a}.embedding_length"])
        self.n_heads = int(meta[f"{a}.attention.head_count"])
        self.n_kv = int(meta.get(f"{a}.attention.head_count_kv", self.n_heads))
        self.hd = int(meta.get(f"{a}.attention.key_length", self.dim // self.n_heads))
        self.eps = float(meta[f"{a}.attention.layer_norm_rms_epsilon"])
        self.theta = float(meta.get(f"{a}.rope.freq_base", 10000.0))
        self.n_experts = int(meta.get(f"{a}.expert_count", 0))
        self.n_used = int(meta.get(f"{a}.expert_used_count", 0))
        self.neox = a in ("qwen2", "qwen3", "qwen3moe", "gemma3")
        self.gemma = a == "gemma3"
        self.window = int(meta.get(f"{a}.attention.sliding_window", 0)) if self.gemma else 0
        if self.gemma and self.n_layers == 62:
            self.q_scale = 1.0 / math.sqrt(self.dim // self.n_heads)
        else:
            self.q_scale = 1.0 / math.sqrt(self.hd)
        self._tensors = {t.name: t for t in r.tensors}
        self._rope_scaling(meta, a)

    @cache  # noqa: B019 - one model per test session
    def w(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        # gguf shapes are ggml order (cols, rows, experts); numpy wants the reverse
        return a.reshape([int(s) for s in reversed(t.shape)])

    def has(self, name: str) -> bool:
        return name in self._tensors

    def layer_w(self, i: int, short: str) -> np.ndarray:
        return self.w(f"blk.{i}.{short}")

    def rmsnorm(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + self.eps).astype(np.float32) * g

    def _rope_scaling(self, meta: dict, a: str) -> None:
        """rope.scaling.* from the file, with llama.cpp's defaults (a factor alone is linear)."""
        factor = float(meta.get(f"{a}.rope.scaling.factor", meta.get(f"{a}.rope.scale_linear", 0.0)) or 1.0)
        self.scaling = meta.get(f"{a}.rope.scaling.type", "linear" if factor != 1.0 else "none")
        self.freq_scale = 1.0 if self.scaling == "none" else 1.0 / factor
        self.attn_factor = float(meta.get(f"{a}.rope.scaling.attn_factor", 1.0))
        self.ext_factor = float(meta.get(f"{a}.rope.scaling.yarn_ext_factor", 1.0 if self.scaling == "yarn" else 0.0))
        self.beta_fast = float(meta.get(f"{a}.rope.scaling.yarn_beta_fast", 32.0))
        self.beta_slow = float(meta.get(f"{a}.rope.scaling.yarn_beta_slow", 1.0))
        self.orig_ctx = int(meta.get(f"{a}.rope.scaling.original_context_length", meta.get(f"{a}.context_length")))
        self.freq_factors = (self.w("rope_freqs.weight").astype(np.float64).reshape(-1)
                             if "rope_freqs.weight" in self._tensors else np.ones(self.hd // 2))

    def angles(self, pos: np.ndarray, theta: float, scaled: bool = True) -> tuple[np.ndarray, float]:
        """(angle of each pair at each position [n, hd/2], magnitude of cos and sin), from the
        YaRN paper's recipe as ggml evaluates it: the extrapolated angle pos * theta^(-2i/hd) / ff_i,
        the interpolated one freq_scale times that; pairs below the correction range keep the
        first, above it the second, a linear ramp between; magnitude 1 + 0.1 ln(1/freq_scale)."""
        i = np.arange(self.hd // 2, dtype=np.float64)
        extrap = pos[:, None].astype(np.float64) * theta ** (-2.0 * i / self.hd)[None, :]
        if not scaled:  # llama.cpp still applies the file's attn_factor
            return extrap, self.attn_factor
        extrap = extrap / self.freq_factors[None, :]
        interp = self.freq_scale * extrap
        mag = self.attn_factor
        if self.ext_factor == 0.0:
            return interp, mag

        def corr(n_rot: float) -> float:  # the pair index that turns n_rot times over orig_ctx
            return self.hd * math.log(self.orig_ctx / (n_rot * 2 * math.pi)) / (2 * math.log(theta))
        low = max(0.0, math.floor(corr(self.beta_fast)))
        high = min(self.hd - 1.0, math.ceil(corr(self.beta_slow)))
        keep = (1.0 - np.clip((i - low) / max(0.001, high - low), 0.0, 1.0)) * self.ext_factor
        if self.freq_scale < 1.0:
            mag *= 1.0 + 0.1 * math.log(1.0 / self.freq_scale)
        return interp * (1.0 - keep) + extrap * keep, mag

    def rope(self, x: np.ndarray, pos: np.ndarray, theta: float, scaled: bool = True) -> np.ndarray:
        """Rotate pair i of each head by its angle (see `angles`): pairs (2i, 2i+1) for llama,
        (i, i + hd/2) for the neox families."""
        ang, mag = self.angles(pos, theta, scaled)
        cos, sin = mag * np.cos(ang)[:, None, :], mag * np.sin(ang)[:, None, :]
        if self.neox:
            i0, i1 = np.arange(self.hd // 2), np.arange(self.hd // 2) + self.hd // 2
        else:
            i0, i1 = np.arange(0, self.hd, 2), np.arange(1, self.hd, 2)
        x0, x1 = x[..., i0].astype(np.float64), x[..., i1].astype(np.float64)
        out = np.empty_like(x)
        out[..., i0] = x0 * cos - x1 * sin
        out[..., i1] = x0 * sin + x1 * cos
        return out

    def rows(self, name: str, idx: np.ndarray) -> np.ndarray:
        """Rows idx of a matrix, dequantizing only those (a 262144-row embedding is 671 MB as float32)."""
        t = self._tensors[name]
        cols = int(t.shape[0])
        return dequantize(np.asarray(t.data)[idx], t.tensor_type).astype(np.float32).reshape(len(idx), cols)

    def embed(self, ids: list[int]) -> np.ndarray:
        x = self.rows("token_embd.weight", np.asarray(ids))
        return x * np.float32(math.sqrt(self.dim)) if self.gemma else x

    def sliding(self, i: int) -> bool:
        return bool(self.window) and i % 6 != 5

    def act(self, g: np.ndarray) -> np.ndarray:
        if self.gemma:  # GELU, tanh approximation
            return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3)))
        return g / (1 + np.exp(-g))  # SiLU

    def ffn(self, h: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
        return (self.act(h @ gate.T) * (h @ up.T)) @ down.T

    def moe(self, i: int, h: np.ndarray) -> np.ndarray:
        logits = h.astype(np.float64) @ self.layer_w(i, "ffn_gate_inp.weight").T.astype(np.float64)
        out = np.zeros_like(h)
        gate, up, down = (self.layer_w(i, f"ffn_{k}_exps.weight") for k in ("gate", "up", "down"))
        for t in range(h.shape[0]):
            p = np.exp(logits[t] - logits[t].max())
            p /= p.sum()
            top = np.argsort(-p)[: self.n_used]
            for e in top:
                out[t] += np.float32(p[e] / p[top].sum()) * self.ffn(h[t:t + 1], gate[e], up[e], down[e])[0]
        return out

    def layers(self, x: np.ndarray, first: int, last: int) -> np.ndarray:
        """Layers first..last over a whole sequence starting at position 0 (no cache)."""
        n = x.shape[0]
        pos = np.arange(n)
        causal = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        group = self.n_heads // self.n_kv
        for i in range(first, last + 1):
            mask, theta, scaled = causal, self.theta, True
            if self.sliding(i):
                scaled = False  # gemma3's sliding layers: their own base, no long-context scaling
                too_old = pos[:, None] - pos[None, :] >= self.window
                mask = np.where(too_old, -np.inf, causal).astype(np.float32)
                theta = 10000.0
            h = self.rmsnorm(x, self.layer_w(i, "attn_norm.weight"))
            q, k, v = (h @ self.layer_w(i, f"attn_{c}.weight").T for c in "qkv")
            if self.has(f"blk.{i}.attn_q.bias"):
                q, k, v = (t + self.layer_w(i, f"attn_{c}.bias") for t, c in zip((q, k, v), "qkv", strict=True))
            q, k, v = q.reshape(n, self.n_heads, self.hd), k.reshape(n, self.n_kv, self.hd), v.reshape(n, self.n_kv, self.hd)
            if self.has(f"blk.{i}.attn_q_norm.weight"):
                q = self.rmsnorm(q, self.layer_w(i, "attn_q_norm.weight"))
                k = self.rmsnorm(k, self.layer_w(i, "attn_k_norm.weight"))
            q, k = self.rope(q, pos, theta, scaled), self.rope(k, pos, theta, scaled)
            att = np.empty_like(q)
            for hh in range(self.n_heads):
                kv = hh // group
                s = (q[:, hh, :] * self.q_scale) @ k[:, kv, :].T + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                att[:, hh, :] = (s / s.sum(axis=1, keepdims=True)) @ v[:, kv, :]
            a = att.reshape(n, self.n_heads * self.hd) @ self.layer_w(i, "attn_output.weight").T
            if self.gemma:
                a = self.rmsnorm(a, self.layer_w(i, "post_attention_norm.weight"))
            x = x + a
            h = self.rmsnorm(x, self.layer_w(i, "ffn_norm.weight"))
            if self.n_experts:
                f = self.moe(i, h)
            else:
                f = self.ffn(h, *(self.layer_w(i, f"ffn_{k}.weight") for k in ("gate", "up", "down")))
            if self.gemma:
                f = self.rmsnorm(f, self.layer_w(i, "post_ffw_norm.weight"))
            x = x + f
        return x.astype(np.float32)

    def head(self, x: np.ndarray) -> np.ndarray:
        name = "output.weight" if "output.weight" in self._tensors else "token_embd.weight"
        h = self.rmsnorm(x, self.w("output_norm.weight"))
        vocab, step = int(self._tensors[name].shape[1]), 16384
        return np.concatenate([h @ self.rows(name, np.arange(a, min(a + step, vocab))).T
                               for a in range(0, vocab, step)], axis=1)

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.head(self.layers(self.embed(ids), 0, self.n_layers - 1))


NumpyLlama = NumpyModel  # the name the llama tests know it by
