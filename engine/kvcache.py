"""Per-session key/value cache of one layer range, grown in chunks as the context grows.

A cache stores K and V of every position as f32, f16 (the default, as llama.cpp) or GGUF Q8_0
blocks (34 bytes per 32 values, as llama.cpp's `-ctk q8_0 -ctv q8_0`): per token and layer that
is 2 * n_kv * head_dim * 4, * 2, or * 34/32 bytes (`kv_bytes_per_token`). Attention reads the
cache as stored (ops/attn.h), so a smaller cache is also less memory traffic per decoded token.

In a Q8_0 cache keys and values are stored rotated by an orthonormal Walsh-Hadamard matrix (per
kv head, blocks of the largest power of two dividing head_dim) and each query is rotated the same
way before attention, the output rotated back: q.k and the output are unchanged, but a key's few
large channels are spread over its block, so the block's 8-bit scale fits its values and
rounding errs about half as much (on the default model, 2,000 teacher-forced tokens on the float
activation path: logits within 0.38 of the f16 cache's top five instead of 0.82).
"""
from __future__ import annotations

import numpy as np

from dair.errors import DairError
from dair.ops.attention import attention
from dair.units import format_bytes

CHUNK = 256  # positions added per growth step: keeps regrowth rare without reserving max context
KV_TYPES = ("f32", "f16", "q8_0")


def check_kv_type(kv_type: str, head_dim: int) -> str:
    """kv_type if this model can use it, else DairError naming the problem."""
    if kv_type not in KV_TYPES:
        raise DairError(f"KV cache type {kv_type!r}: expected one of {', '.join(KV_TYPES)}")
    if kv_type == "q8_0" and head_dim % 32:
        raise DairError(f"KV cache type q8_0 needs head_dim divisible by 32; this model's is {head_dim}")
    return kv_type


def kv_head_bytes(kv_type: str, head_dim: int) -> int:
    """Bytes of one kv head's head_dim values at one position."""
    return {"f32": 4 * head_dim, "f16": 2 * head_dim, "q8_0": head_dim // 32 * 34}[kv_type]


def kv_bytes_per_token(kv_type: str, n_kv: int, head_dim: int) -> int:
    """Bytes of K and V of one layer for one token."""
    return 2 * n_kv * kv_head_bytes(kv_type, head_dim)


class SessionCache:
    """K and V of every layer in the range for one session: per layer an array of
    [capacity, n_kv, head_dim] float32/float16, or [capacity, n_kv, head_dim // 32 * 34] uint8."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, max_context: int, kv_type: str = "f16") -> None:
        self.n_kv, self.head_dim, self.max_context = n_kv, head_dim, max_context
        self.kv_type = check_kv_type(kv_type, head_dim)
        self.dtype = {"f32": np.float32, "f16": np.float16, "q8_0": np.uint8}[kv_type]
        self.row = (n_kv, kv_head_bytes(kv_type, head_dim) // np.dtype(self.dtype).itemsize)
        self.k: list[np.ndarray] = [np.empty((0, *self.row), self.dtype) for _ in range(n_layers)]
        self.v: list[np.ndarray] = [np.empty((0, *self.row), self.dtype) for _ in range(n_layers)]
        self.length = 0  # positions 0..length-1 hold valid entries

    @property
    def capacity(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    def reserve(self, n_positions: int) -> None:
        if n_positions > self.max_context:
            raise DairError(f"context of {n_positions} tokens exceeds the maximum of {self.max_context}")
        if n_positions <= self.capacity:
            return
        cap = min(self.max_context, -(-n_positions // CHUNK) * CHUNK)
        for arrays in (self.k, self.v):
            for i, old in enumerate(arrays):
                new = np.empty((cap, *self.row), self.dtype)
                new[: self.length] = old[: self.length]
                arrays[i] = new

    def truncate(self, n_positions: int) -> None:
        self.length = min(self.length, max(0, n_positions))

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)

    def attend(self, j: int, q: np.ndarray, k: np.ndarray, v: np.ndarray, pos: np.ndarray,
               out: np.ndarray | None, scale: float | None = None, window: int = 0) -> np.ndarray:
        """Write this step's k, v float32[m, n_kv, head_dim] at positions pos (consecutive, already
        reserved) of layer j, then out[m, n_heads, head_dim] = softmax(q.k * scale) v over the
        cache (a new array when out is None; returned). With a window, a query at position p sees
        keys p-window+1..p only (llama.cpp's standard sliding window, gemma3's local layers)."""
        # The kernel stores k and v at pos first, as the cache holds them. A Q8_0 cache holds K and V
        # rotated: the kernel rotates each query alike and the output, a sum of rotated values,
        # back (the matrix is its own inverse).
        return attention(q, self.k[j], self.v[j], pos, out=out, scale=scale, window=window,
                         rotated=self.kv_type == "q8_0", k_new=np.ascontiguousarray(k, np.float32),
                         v_new=np.ascontiguousarray(v, np.float32))


def context_limit(model_context: int, configured: int, kv_per_token: int, max_ram: int | None,
                  min_weights: int) -> tuple[int, str, int | None]:
    """The one max_context rule (in-process and every stage): the configured value (0 = the
    model's own), never beyond the model's context_length, and, under a RAM budget, no longer
    than the KV cache of one session that fits beside the least the weights need (min_weights:
    the streamed window). Returns (max_context, what set it, the budget left for weights).

    A budget that cannot hold even the weights' minimum is returned whole, for the residency
    planner to refuse with its own message."""
    limit, why = model_context, f"the model's context_length {model_context}"
    if 0 < configured < limit:
        limit, why = configured, f"max_context = {configured} (config)"
    if max_ram is None or max_ram <= min_weights:
        return limit, why, max_ram
    fit = (max_ram - min_weights) // max(kv_per_token, 1)
    if fit < limit:
        limit = max(int(fit), 1)
        why = (f"the RAM budget of {format_bytes(max_ram, unit='MiB')} (a KV cache of {kv_per_token} bytes per "
               f"token beside {format_bytes(min_weights, unit='MiB')} of streamed weights)")
    return limit, why, max_ram - limit * kv_per_token


def streaming_window(unit_bytes: list[int]) -> int:
    """The least weight bytes a streaming range holds at once: the two largest consecutive units
    (one computing, the next prefetched), cyclically; one unit alone if there is one."""
    if len(unit_bytes) == 1:
        return unit_bytes[0]
    return max(unit_bytes[k] + unit_bytes[(k + 1) % len(unit_bytes)] for k in range(len(unit_bytes)))


def plan_kv(cfg, kv_type: str, n_layers: int, max_context: int, max_ram: int | None,
            unit_bytes: list[int], reserve: int = 0) -> tuple[int, int, str, int | None]:
    """For an engine of n_layers of a model (cfg: its ModelConfig): (bytes of KV per token for
    these layers, max_context, what set it, the budget left for weights). reserve: weight bytes
    held beside the streamed units (an MoE range's chosen experts)."""
    per_token = kv_bytes_per_token(check_kv_type(kv_type, cfg.head_dim), cfg.n_kv_heads, cfg.head_dim) * n_layers
    limit, why, weights = context_limit(cfg.context_length, max_context, per_token, max_ram,
                                        streaming_window(unit_bytes) + reserve)
    return per_token, limit, why, weights
