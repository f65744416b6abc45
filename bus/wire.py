"""Activation rows on the wire: float32 arrays to and from f32 / f16 / Q8_0 block buffers.

Q8_0 is llama.cpp's block format: each 32 values become an f16 scale and 32 int8 (34 bytes),
73% fewer bytes than f32. The Cython kernels of dair.ops.wire are used when present; the numpy
code below is the reference and the fallback.
"""
from __future__ import annotations

from typing import Any

import numpy as np

Q8_BLOCK = np.dtype([("d", "<f2"), ("q", "i1", (32,))])

try:  # the fast path, when the Cython kernels (ops/wire.pyx) are built
    from dair.ops import wire as _ops_wire  # type: ignore[attr-defined]
except Exception:  # pragma: no cover - depends on the build
    _ops_wire = None


def quantize_q8_0_np(x: np.ndarray) -> np.ndarray:
    """float32 (n, dim) -> uint8 (n * dim/32 * 34,) of Q8_0 blocks."""
    n, dim = x.shape
    blocks = np.ascontiguousarray(x, dtype=np.float32).reshape(n * (dim // 32), 32)
    amax = np.abs(blocks).max(axis=1)
    d = amax / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    out = np.empty(blocks.shape[0], dtype=Q8_BLOCK)
    out["d"] = d.astype(np.float16)
    out["q"] = np.clip(np.rint(blocks * inv[:, None]), -127, 127).astype(np.int8)
    return out.view(np.uint8)


def dequantize_q8_0_np(buf: Any, n: int, dim: int) -> np.ndarray:
    blocks = np.frombuffer(buf, dtype=Q8_BLOCK, count=n * (dim // 32))
    x = blocks["q"].astype(np.float32) * blocks["d"].astype(np.float32)[:, None]
    return x.reshape(n, dim)


def _fast(name: str) -> Any:
    return getattr(_ops_wire, name, None) if _ops_wire is not None else None


def pack(x: np.ndarray, dtype: str) -> Any:
    """Buffer (anything with the buffer protocol) holding rows `x` in wire format `dtype`."""
    if dtype == "f32":
        return np.ascontiguousarray(x, dtype=np.float32)
    if dtype == "f16":
        return np.ascontiguousarray(x, dtype=np.float16)
    if dtype == "q8_0":
        fast = _fast("quantize_q8_0")
        if fast is not None:
            return fast(np.ascontiguousarray(x, dtype=np.float32))
        return quantize_q8_0_np(x)
    raise ValueError(f"unknown wire dtype {dtype!r}")


def unpack(buf: Any, dtype: str, n: int, dim: int) -> np.ndarray:
    """float32 (n, dim) rows from a received buffer; f32 is a zero-copy, read-only view."""
    if dtype == "f32":
        return np.frombuffer(buf, dtype=np.float32, count=n * dim).reshape(n, dim)
    if dtype == "f16":
        return np.frombuffer(buf, dtype=np.float16, count=n * dim).reshape(n, dim).astype(np.float32)
    if dtype == "q8_0":
        fast = _fast("dequantize_q8_0")
        if fast is not None:
            return np.asarray(fast(buf, n, dim), dtype=np.float32).reshape(n, dim)
        return dequantize_q8_0_np(buf, n, dim)
    raise ValueError(f"unknown wire dtype {dtype!r}")
