"""Per-session key/value cache of one layer range, grown in chunks as the context grows."""
from __future__ import annotations

import numpy as np

from dair.errors import DairError

CHUNK = 256  # positions added per growth step: keeps regrowth rare without reserving max context


class SessionCache:
    """K and V of every layer in the range for one session: [capacity, n_kv, head_dim] of `dtype`
    (float16 by default, as llama.cpp: half the memory and memory traffic of float32)."""

    def __init__(self, n_layers: int, n_kv: int, head_dim: int, max_context: int,
                 dtype: type = np.float16) -> None:
        self.n_kv, self.head_dim, self.max_context, self.dtype = n_kv, head_dim, max_context, dtype
        self.k: list[np.ndarray] = [np.empty((0, n_kv, head_dim), dtype) for _ in range(n_layers)]
        self.v: list[np.ndarray] = [np.empty((0, n_kv, head_dim), dtype) for _ in range(n_layers)]
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
                new = np.empty((cap, self.n_kv, self.head_dim), self.dtype)
                new[: self.length] = old[: self.length]
                arrays[i] = new

    def truncate(self, n_positions: int) -> None:
        self.length = min(self.length, max(0, n_positions))

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)
