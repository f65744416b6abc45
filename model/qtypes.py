"""Weight encodings dair reads, each block layout stated once, with numpy (de)quantizers.

Block layouts (little-endian, `d`/`m` are IEEE fp16), identical in GGUF and distributed-llama
(dllama calls Q4_0 "Q40" and Q8_0 "Q80"):

    F32   1 value  / 4 bytes    float32
    F16   1 value  / 2 bytes    float16
    Q8_0  32 values / 34 bytes  d | qs[32] int8            x[j] = d * qs[j]
    Q4_0  32 values / 18 bytes  d | qs[16] uint8           x[j] = d * ((qs[j] & 15) - 8),
                                                           x[j+16] = d * ((qs[j] >> 4) - 8)
    Q4_1  32 values / 20 bytes  d | m | qs[16] uint8       x[j] = d * (qs[j] & 15) + m,
                                                           x[j+16] = d * (qs[j] >> 4) + m

The dequantizers are the reference for tests and the converter, not the fast path (that is
dair.ops); they favour clarity over speed but stay vectorized.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class QType:
    name: str
    block_values: int
    block_bytes: int
    ggml_id: int  # GGMLQuantizationType value in GGUF files


QTYPES: dict[str, QType] = {
    q.name: q
    for q in (
        QType("F32", 1, 4, 0),
        QType("F16", 1, 2, 1),
        QType("Q4_0", 32, 18, 2),
        QType("Q4_1", 32, 20, 3),
        QType("Q8_0", 32, 34, 8),
    )
}
BY_GGML_ID: dict[int, QType] = {q.ggml_id: q for q in QTYPES.values()}


def tensor_nbytes(qtype: str, n_values: int) -> int:
    """Bytes taken by `n_values` values (a multiple of the block size) of `qtype`."""
    q = QTYPES[qtype]
    if n_values % q.block_values:
        raise ValueError(f"{n_values} values is not a whole number of {qtype} blocks")
    return n_values // q.block_values * q.block_bytes


def row_nbytes(qtype: str, cols: int) -> int:
    return tensor_nbytes(qtype, cols)


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)  # (n, 1)


def dequantize(qtype: str, raw: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """float32 array of `shape` from the encoded bytes `raw` (uint8, exactly the tensor's bytes)."""
    n = int(np.prod(shape)) if shape else 1
    raw = np.asarray(raw, dtype=np.uint8).reshape(-1)
    if raw.size != tensor_nbytes(qtype, n):
        raise ValueError(f"{qtype} tensor of shape {shape} needs {tensor_nbytes(qtype, n)} bytes, got {raw.size}")
    if qtype == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    if qtype == "F16":
        return raw.view(np.float16).astype(np.float32).reshape(shape)
    q = QTYPES[qtype]
    blocks = raw.reshape(-1, q.block_bytes)
    if qtype == "Q8_0":
        d = _f16(blocks, 0)
        out = d * blocks[:, 2:].view(np.int8).astype(np.float32)
    elif qtype == "Q4_0":
        d = _f16(blocks, 0)
        qs = blocks[:, 2:]
        nib = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32) - 8.0
        out = d * nib
    elif qtype == "Q4_1":
        d, m = _f16(blocks, 0), _f16(blocks, 2)
        qs = blocks[:, 4:]
        nib = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.float32)
        out = d * nib + m
    else:  # pragma: no cover - QTYPES and this function must list the same types
        raise ValueError(f"no dequantizer for {qtype}")
    return out.reshape(shape)


def quantize(qtype: str, x: np.ndarray) -> np.ndarray:
    """Encode float values as `qtype` bytes (uint8, flat), rounding the way ggml's reference does."""
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if qtype == "F32":
        return x.view(np.uint8).copy()
    if qtype == "F16":
        return x.astype(np.float16).view(np.uint8).copy()
    q = QTYPES[qtype]
    if x.size % q.block_values:
        raise ValueError(f"{x.size} values is not a whole number of {qtype} blocks")
    b = x.reshape(-1, q.block_values)
    nb = b.shape[0]
    out = np.empty((nb, q.block_bytes), dtype=np.uint8)
    if qtype == "Q8_0":
        amax = np.abs(b).max(axis=1, keepdims=True)
        d = amax / 127.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        qs = np.round(b * inv).astype(np.int8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8)
        out[:, 2:] = qs.view(np.uint8)
    elif qtype == "Q4_0":
        # ggml: the value of largest magnitude (with its sign) maps to -8.
        idx = np.abs(b).argmax(axis=1)
        mx = b[np.arange(nb), idx][:, None]
        d = mx / -8.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        qv = np.clip(np.trunc(b * inv + 8.5), 0, 15).astype(np.uint8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8)
        out[:, 2:] = qv[:, :16] | (qv[:, 16:] << 4)
    elif qtype == "Q4_1":
        lo = b.min(axis=1, keepdims=True)
        hi = b.max(axis=1, keepdims=True)
        d = (hi - lo) / 15.0
        inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
        qv = np.clip(np.trunc((b - lo) * inv + 0.5), 0, 15).astype(np.uint8)
        out[:, 0:2] = d.astype(np.float16).view(np.uint8)
        out[:, 2:4] = lo.astype(np.float16).view(np.uint8)
        out[:, 4:] = qv[:, :16] | (qv[:, 16:] << 4)
    else:  # pragma: no cover
        raise ValueError(f"no quantizer for {qtype}")
    return out.reshape(-1)
