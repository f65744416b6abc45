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

K-quants (llama.cpp), super-blocks of 256 values in 8 (Q4_K) or 16 (Q6_K) scaled sub-blocks:

    Q4_K  256 values / 144 bytes  d | dmin | scales[12] | qs[128]
          sub-block j < 8 (32 values) has 6-bit scale sc[j] and min m[j] packed in scales:
            j < 4: sc = scales[j] & 63,  m = scales[j+4] & 63
            j >= 4: sc = (scales[j+4] & 15) | (scales[j-4] >> 6) << 4,
                    m  = (scales[j+4] >> 4) | (scales[j] >> 6) << 4
          qs[32c + l] low nibble = value 64c + l (sub-block 2c), high = 64c + 32 + l (2c + 1)
          x = d * sc[j] * nibble - dmin * m[j]
    Q6_K  256 values / 210 bytes  ql[128] | qh[64] | scales[16] int8 | d
          half h (values 128h ..), l < 32, L = ql[64h:], H = qh[32h:], q6 in 0..63:
            q[l] = L[l] & 15 | (H[l] & 3) << 4,          q[l+32] = L[l+32] & 15 | (H[l] >> 2 & 3) << 4,
            q[l+64] = L[l] >> 4 | (H[l] >> 4 & 3) << 4,  q[l+96] = L[l+32] >> 4 | (H[l] >> 6) << 4
          x[i] = d * scales[i // 16] * (q[i] - 32)

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
        QType("Q5_0", 32, 22, 6),
        QType("Q5_1", 32, 24, 7),
        QType("Q2_K", 256, 84, 10),
        QType("Q3_K", 256, 110, 11),
        QType("Q4_K", 256, 144, 12),
        QType("Q5_K", 256, 176, 13),
        QType("Q6_K", 256, 210, 14),
        QType("IQ4_NL", 32, 18, 20),
        QType("IQ4_XS", 256, 136, 23),
        QType("BF16", 1, 2, 30),
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
    if qtype == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
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
    elif qtype == "Q4_K":
        out = _dequantize_q4_k(blocks)
    elif qtype == "Q6_K":
        out = _dequantize_q6_k(blocks)
    elif qtype in DECOMPOSE:
        p = decompose(qtype, blocks)
        out = p.d * p.sc * p.codes - p.dmin * p.m  # (n, subs, per-sub)
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
    if qtype == "BF16":  # ggml_compute_fp32_to_bf16: round to nearest even, NaN stays quiet NaN
        u = x.view(np.uint32).astype(np.uint64)
        r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        r = np.where(np.isnan(x), ((u >> 16) | 64).astype(np.uint16), r)
        return r.view(np.uint8).copy()
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
    elif qtype == "Q4_K":
        out = _quantize_q4_k(b)
    elif qtype == "Q6_K":
        out = _quantize_q6_k(b)
    else:  # pragma: no cover
        raise ValueError(f"no quantizer for {qtype}")
    return out.reshape(-1)


def q4_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 6-bit (sc, m) pairs, each (n, 8) int32, from Q4_K's packed scales (n, 12)."""
    s = scales.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, m


def q4_k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K's 256 nibbles per block (n, 256) in value order from qs (n, 128)."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return (q & 15).reshape(-1, 256)


def q6_k_values(ql: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q6_K's unsigned 6-bit codes (n, 256) in value order (subtract 32 for the signed value)."""
    lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 15  # (n, h, nib, 64)
    hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3  # (n, h, 4, 32)
    return (lo.reshape(-1, 2, 4, 32) | (hi << 4)).reshape(-1, 256)


def _dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    sc, m = q4_k_scales(blocks[:, 4:16])
    nib = q4_k_nibbles(blocks[:, 16:]).astype(np.float32).reshape(-1, 8, 32)
    out = (d * sc)[..., None].astype(np.float32) * nib - (dmin * m)[..., None].astype(np.float32)
    return out.reshape(-1, 256)


def _dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    q = q6_k_values(blocks[:, :128], blocks[:, 128:192]).astype(np.float32) - 32.0
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16(blocks, 208)
    return ((d * sc)[..., None] * q.reshape(-1, 16, 16)).reshape(-1, 256)


def _quantize_q4_k(b: np.ndarray) -> np.ndarray:
    """Q4_K by a plain per-sub-block min/max fit (llama.cpp searches scales harder; any valid
    encoding decodes the same way, which is all dair's readers and tests rely on)."""
    nb = b.shape[0]
    sub = b.reshape(nb, 8, 32)
    mn = np.maximum(-sub.min(axis=2), 0.0)  # m >= 0 is subtracted: values >= -mn
    scale = (sub.max(axis=2) + mn) / 15.0
    d = (scale.max(axis=1, keepdims=True) / 63.0).astype(np.float16)
    dmin = (mn.max(axis=1, keepdims=True) / 63.0).astype(np.float16)
    df, dmf = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df != 0)), 0, 63).astype(np.int32)
    m = np.clip(np.rint(np.divide(mn, dmf, out=np.zeros_like(mn), where=dmf != 0)), 0, 63).astype(np.int32)
    step = (df * sc)[..., None]
    nib = np.rint(np.divide(sub + (dmf * m)[..., None], step, out=np.zeros_like(sub), where=step != 0))
    nib = np.clip(nib, 0, 15).astype(np.uint8).reshape(nb, 4, 2, 32)
    scales = np.zeros((nb, 12), np.uint8)
    scales[:, 0:4] = (sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)).astype(np.uint8)
    scales[:, 4:8] = (m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)).astype(np.uint8)
    scales[:, 8:12] = ((sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)).astype(np.uint8)
    out = np.empty((nb, 144), np.uint8)
    out[:, 0:2] = d.view(np.uint8)
    out[:, 2:4] = dmin.view(np.uint8)
    out[:, 4:16] = scales
    out[:, 16:] = (nib[:, :, 0] | (nib[:, :, 1] << 4)).reshape(nb, 128)
    return out


def _quantize_q6_k(b: np.ndarray) -> np.ndarray:
    """Q6_K by a plain per-sub-block absmax fit (see _quantize_q4_k)."""
    nb = b.shape[0]
    sub = b.reshape(nb, 16, 16)
    scale = np.abs(sub).max(axis=2) / 31.0
    d = (scale.max(axis=1, keepdims=True) / 127.0).astype(np.float16)
    df = d.astype(np.float32)
    sc = np.clip(np.rint(np.divide(scale, df, out=np.zeros_like(scale), where=df != 0)), -128, 127)
    step = (df * sc)[..., None]
    q = np.rint(np.divide(sub, step, out=np.zeros_like(sub), where=step != 0))
    q = (np.clip(q, -32, 31) + 32).astype(np.uint8).reshape(nb, 2, 4, 32)  # (n, h, quarter, l)
    lo = q & 15
    ql = np.concatenate([lo[:, :, 0] | lo[:, :, 2] << 4, lo[:, :, 1] | lo[:, :, 3] << 4], axis=2)
    hi = q >> 4
    qh = hi[:, :, 0] | hi[:, :, 1] << 2 | hi[:, :, 2] << 4 | hi[:, :, 3] << 6
    out = np.empty((nb, 210), np.uint8)
    out[:, :128] = ql.reshape(nb, 128)
    out[:, 128:192] = qh.reshape(nb, 64)
    out[:, 192:208] = sc.astype(np.int8).view(np.uint8)
    out[:, 208:210] = d.view(np.uint8)
    return out


# ---- every block as d * sc * codes - dmin * m -------------------------------------------------
#
# The types below (and Q4_K, Q6_K again) decode as x = (d * sc[s]) * codes[s, l] - dmin * m[s] per
# sub-block s of L values: d, dmin float per block, sc and m small integers per sub-block, codes
# small integers. That is also how llama.cpp's integer dot products see them (integer sums of
# codes times 8-bit activations per sub-block, scaled by sc, then by d), so tests emulate its
# kernels from these parts. Layouts (byte offsets in a block):
#
#   Q5_0   32 / 22   d[0:2] qh[2:6] qs[6:22]       code j = (qs[j] & 15 | bit j of qh << 4) - 16,
#                                                  code j+16 = (qs[j] >> 4 | bit j+16 of qh << 4) - 16
#   Q5_1   32 / 24   d m qh[4:8] qs[8:24]          codes as Q5_0 without - 16; x = d * code + m
#   IQ4_NL 32 / 18   d qs[2:18]                    code = IQ4_VALUES[nibble], nibbles as Q4_0
#   Q2_K  256 / 84   scales[0:16] qs[16:80] d dmin 16 subs of 16: sc = scales & 15, m = scales >> 4,
#                                                  value 128h + 32j + l: (qs[32h + l] >> 2j) & 3
#   Q3_K  256 / 110  hmask[0:32] qs[32:96] scales[96:108] d
#                                                  16 subs of 16, sc = 6-bit scale - 32 (packed below),
#                                                  value 128h + 32j + l: (qs[32h + l] >> 2j) & 3,
#                                                  minus 4 unless bit 4h + j of hmask[l] is set
#   Q5_K  256 / 176  d dmin scales[4:16] qh[16:48] qs[48:176]
#                                                  8 subs of 32, scales as Q4_K, nibbles as Q4_K,
#                                                  plus 16 if bit s of qh[l] (value 32s + l)
#   IQ4_XS 256 / 136 d scales_h[2:4] scales_l[4:8] qs[8:136]
#                                                  8 subs of 32: sc = (scales_l[s/2] >> 4(s%2) & 15
#                                                  | (scales_h >> 2s & 3) << 4) - 32; qs[16s + j]:
#                                                  low nibble value 32s + j, high 32s + 16 + j,
#                                                  code = IQ4_VALUES[nibble]
#   BF16   1 / 2     the high half of a float32

IQ4_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.int8)


@dataclass(frozen=True)
class Parts:
    """A block row decomposed: d, dmin (n, 1, 1); sc, m (n, S, 1); codes (n, S, L); all float32
    holding exact small integers except d and dmin."""
    d: np.ndarray
    dmin: np.ndarray
    sc: np.ndarray
    m: np.ndarray
    codes: np.ndarray


def _f(a) -> np.ndarray:
    return np.asarray(a).astype(np.float32)


def _bits(words: np.ndarray, nbits: int) -> np.ndarray:
    """(n, nbits) 0/1 from little-endian bit strings (n, nbits / 8 bytes)."""
    return np.unpackbits(words, axis=1, bitorder="little")[:, :nbits]


def _q5_codes(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    nib = np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32)
    return nib | (_bits(qh, 32).astype(np.int32) << 4)


def _k_scales6(s: np.ndarray) -> np.ndarray:
    """Q3_K's sixteen 6-bit scales from its 12 packed bytes (n, 12), unsigned (subtract 32)."""
    s = s.astype(np.int32)
    lo, hi = s[:, 0:8], s[:, 8:12]
    out = np.empty((s.shape[0], 16), np.int32)
    out[:, 0:4] = (lo[:, 0:4] & 15) | ((hi & 3) << 4)
    out[:, 4:8] = (lo[:, 4:8] & 15) | (((hi >> 2) & 3) << 4)
    out[:, 8:12] = (lo[:, 0:4] >> 4) | (((hi >> 4) & 3) << 4)
    out[:, 12:16] = (lo[:, 4:8] >> 4) | (((hi >> 6) & 3) << 4)
    return out


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K's 2-bit fields (n, 256) in value order from qs (n, 64)."""
    q = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    return (q & 3).reshape(-1, 256).astype(np.int32)


def decompose(qtype: str, blocks: np.ndarray) -> Parts:
    """The parts of `blocks` (n, block_bytes uint8) of a 32-value or K-quant type."""
    n = blocks.shape[0]
    zero = np.zeros((n, 1, 1), np.float32)
    one = np.ones((n, 1, 1), np.float32)

    def d_at(off: int) -> np.ndarray:
        return _f16(blocks, off).reshape(n, 1, 1)

    if qtype == "Q5_0":
        codes = _q5_codes(blocks[:, 2:6], blocks[:, 6:22]) - 16
        return Parts(d_at(0), zero, one, zero, _f(codes).reshape(n, 1, 32))
    if qtype == "Q5_1":
        codes = _q5_codes(blocks[:, 4:8], blocks[:, 8:24])
        return Parts(d_at(0), -d_at(2), one, one, _f(codes).reshape(n, 1, 32))
    if qtype == "IQ4_NL":
        qs = blocks[:, 2:18]
        codes = IQ4_VALUES[np.concatenate([qs & 15, qs >> 4], axis=1)]
        return Parts(d_at(0), zero, one, zero, _f(codes).reshape(n, 1, 32))
    if qtype == "Q2_K":
        sc = blocks[:, 0:16]
        return Parts(d_at(80), d_at(82), _f(sc & 15)[..., None], _f(sc >> 4)[..., None],
                     _f(_crumbs(blocks[:, 16:80])).reshape(n, 16, 16))
    if qtype == "Q3_K":
        low = _crumbs(blocks[:, 32:96]).reshape(n, 2, 4, 32)
        hm = np.unpackbits(blocks[:, 0:32, None], axis=2, bitorder="little")  # (n, l, bit)
        high = hm.transpose(0, 2, 1).reshape(n, 2, 4, 32).astype(np.int32)
        codes = low - 4 * (1 - high)
        sc = _k_scales6(blocks[:, 96:108]) - 32
        return Parts(d_at(108), zero, _f(sc)[..., None], np.zeros((n, 16, 1), np.float32),
                     _f(codes).reshape(n, 16, 16))
    if qtype in ("Q4_K", "Q5_K"):
        sc, m = q4_k_scales(blocks[:, 4:16])
        if qtype == "Q4_K":
            codes = q4_k_nibbles(blocks[:, 16:144]).astype(np.int32)
        else:
            hb = np.unpackbits(blocks[:, 16:48, None], axis=2, bitorder="little").transpose(0, 2, 1)
            codes = q4_k_nibbles(blocks[:, 48:176]).astype(np.int32) + 16 * hb.reshape(n, 256)
        return Parts(d_at(0), d_at(2), _f(sc)[..., None], _f(m)[..., None], _f(codes).reshape(n, 8, 32))
    if qtype == "Q6_K":
        codes = q6_k_values(blocks[:, :128], blocks[:, 128:192]).astype(np.int32) - 32
        sc = blocks[:, 192:208].view(np.int8)
        return Parts(d_at(208), zero, _f(sc)[..., None], np.zeros((n, 16, 1), np.float32),
                     _f(codes).reshape(n, 16, 16))
    if qtype == "IQ4_XS":
        sh = blocks[:, 2:4].copy().view(np.uint16).astype(np.int32)  # (n, 1)
        sl = blocks[:, 4:8].astype(np.int32)
        s = np.arange(8)
        ls = ((sl[:, s // 2] >> (4 * (s % 2))) & 15) | (((sh >> (2 * s)) & 3) << 4)
        qs = blocks[:, 8:136].reshape(n, 8, 16)
        codes = IQ4_VALUES[np.concatenate([qs & 15, qs >> 4], axis=2)]
        return Parts(d_at(0), zero, _f(ls - 32)[..., None], np.zeros((n, 8, 1), np.float32), _f(codes))
    raise ValueError(f"no block decomposition for {qtype}")


DECOMPOSE = ("Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q5_K", "IQ4_XS")
