"""An independent float32 forward pass of a llama-family GGUF, in plain numpy.

Written from the llama architecture, not from dair's engine: weights are read with the
`gguf` package's own reader and dequantizer, so a bug in dair's model reader or kernels
cannot hide in it. Slow and simple on purpose.
"""
from __future__ import annotations

from functools import cache

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize


class NumpyLlama:
    def __init__(self, path: str) -> None:
        r = GGUFReader(path)
        meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.")}
        arch = meta["general.architecture"]
        self.n_layers = int(meta[f"{arch}.block_count"])
        self.dim = int(meta[f"{arch}.embedding_length"])
        self.n_heads = int(meta[f"{arch}.attention.head_count"])
        self.n_kv = int(meta[f"{arch}.attention.head_count_kv"])
        self.hd = self.dim // self.n_heads
        self.eps = float(meta[f"{arch}.attention.layer_norm_rms_epsilon"])
        self.theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
        self._tensors = {t.name: t for t in r.tensors}

    @cache  # noqa: B019 - one model per test session
    def w(self, name: str) -> np.ndarray:
        t = self._tensors[name]
        a = dequantize(t.data, t.tensor_type).astype(np.float32)
        # gguf shapes are (cols, rows) in ggml order; numpy wants (rows, cols)
        return a.reshape([int(s) for s in reversed(t.shape)]) if a.ndim == 1 and len(t.shape) > 1 else a

    def layer_w(self, i: int, short: str) -> np.ndarray:
        return self.w(f"blk.{i}.{short}.weight")

    def rmsnorm(self, x: np.ndarray, g: np.ndarray) -> np.ndarray:
        return x / np.sqrt(np.mean(x.astype(np.float64) ** 2, axis=-1, keepdims=True) + self.eps).astype(np.float32) * g

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        # GGUF llama weights are permuted so rope turns adjacent pairs (2i, 2i+1).
        inv = self.theta ** (-np.arange(0, self.hd, 2, dtype=np.float64) / self.hd)
        ang = pos[:, None].astype(np.float64) * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        x0, x1 = x[..., 0::2].astype(np.float64), x[..., 1::2].astype(np.float64)
        out = np.empty_like(x)
        out[..., 0::2] = x0 * cos - x1 * sin
        out[..., 1::2] = x0 * sin + x1 * cos
        return out

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.w("token_embd.weight")[np.asarray(ids)]

    def layers(self, x: np.ndarray, first: int, last: int) -> np.ndarray:
        """Layers first..last over a whole sequence starting at position 0 (no cache)."""
        n = x.shape[0]
        pos = np.arange(n)
        mask = np.triu(np.full((n, n), -np.inf, dtype=np.float32), 1)
        group = self.n_heads // self.n_kv
        for i in range(first, last + 1):
            h = self.rmsnorm(x, self.layer_w(i, "attn_norm"))
            q = (h @ self.layer_w(i, "attn_q").T).reshape(n, self.n_heads, self.hd)
            k = (h @ self.layer_w(i, "attn_k").T).reshape(n, self.n_kv, self.hd)
            v = (h @ self.layer_w(i, "attn_v").T).reshape(n, self.n_kv, self.hd)
            q, k = self.rope(q, pos), self.rope(k, pos)
            att = np.empty_like(q)
            for hh in range(self.n_heads):
                kv = hh // group
                s = q[:, hh, :] @ k[:, kv, :].T / np.sqrt(self.hd) + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                att[:, hh, :] = (s / s.sum(axis=1, keepdims=True)) @ v[:, kv, :]
            x = x + att.reshape(n, self.dim) @ self.layer_w(i, "attn_output").T
            h = self.rmsnorm(x, self.layer_w(i, "ffn_norm"))
            g = h @ self.layer_w(i, "ffn_gate").T
            u = h @ self.layer_w(i, "ffn_up").T
            x = x + ((g / (1 + np.exp(-g))) * u) @ self.layer_w(i, "ffn_down").T
        return x.astype(np.float32)

    def head(self, x: np.ndarray) -> np.ndarray:
        out = self.w("output.weight") if "output.weight" in self._tensors else self.w("token_embd.weight")
        return self.rmsnorm(x, self.w("output_norm.weight")) @ out.T

    def logits(self, ids: list[int]) -> np.ndarray:
        return self.head(self.layers(self.embed(ids), 0, self.n_layers - 1))
