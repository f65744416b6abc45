# cython: language_level=3
"""Causal grouped-query attention of new queries against a KV cache (kernels: attn.h).

Query i attends to cache rows 0..positions[i] inclusive, or with a sliding window w the last w
of them (the caller has already written this step's keys and values there); query head h reads
kv head h // (n_heads // n_kv). The cache is float32, float16, or uint8 rows of GGUF Q8_0 blocks
(34 bytes per 32 values, as llama.cpp's `-ctk q8_0 -ctv q8_0`). Keys are taken in spans of 256
positions merged as in flash-decoding; a row's result is the same bit for bit whether it is
decoded alone or prefilled in a batch, and prefill converts each cached tile once for 8 rows.
"""
import os

include "_common.pxi"

from libc.math cimport sqrt

cdef extern from "attn.h" nogil:
    enum:
        DAIR_KV_F32
        DAIR_KV_F16
        DAIR_KV_Q8_0
        DAIR_ATTN_C
        DAIR_ATTN_AVX2
        DAIR_ATTN_AVX512
        DAIR_ATTN_HAVE_AVX2
        DAIR_ATTN_HAVE_AVX512
    ctypedef struct dair_attn_args:
        const float* q
        float* out
        const int32_t* pos
        const uint8_t* k
        const uint8_t* v
        int kind
        size_t row_bytes
        size_t head_bytes
        int n, H, KV, G, hd
        int window
        int rot
        float scale
        int isa
    int dair_attention(const dair_attn_args* a)
    void dair_attn_wht(float* x, int blk)

cdef extern from "qdot.h" nogil:
    void dair_quantize_q8_0_ref(const float* x, size_t nvals, uint8_t* out)

cdef extern from "blocks.h" nogil:
    uint16_t dair_fp32_to_fp16(float f)

from libc.stdlib cimport free, malloc
from libc.string cimport memcpy

_ISA_CODES = {"avx512": DAIR_ATTN_AVX512, "avx2": DAIR_ATTN_AVX2, "c": DAIR_ATTN_C}

#: Attention paths this build can run, best first ("c" is the plain-C reference).
ISAS = tuple(name for name, ok in (("avx512", DAIR_ATTN_HAVE_AVX512), ("avx2", DAIR_ATTN_HAVE_AVX2),
                                    ("c", 1)) if ok)

# DAIR_KERNELS=avx2 (or scalar) caps attention as it caps the quantized kernels (dair.ops.matmul):
# a run then computes as an AVX2-only (or plain-C) host would.
_CAP = {"avx512": "avx512", "image": "avx512", "avx2": "avx2", "block": "avx2", "scalar": "c"}.get(
    os.environ.get("DAIR_KERNELS", ""))
if _CAP in ISAS:
    ISAS = ISAS[ISAS.index(_CAP):]
cdef int _isa = _ISA_CODES[ISAS[0]]


def get_isa() -> str:
    """The attention path in use (one of ISAS)."""
    return next(name for name, code in _ISA_CODES.items() if code == _isa)


def set_isa(str name) -> str:
    """Select an attention path from ISAS (tests and benchmarks compare them); returns the previous one.

    Not thread-safe: only for tests and benchmarks."""
    global _isa
    if name not in ISAS:
        raise ValueError(f"attention path {name!r} not available in this build (have {', '.join(ISAS)})")
    old = get_isa()
    _isa = _ISA_CODES[name]
    return old


def q8_0_row_bytes(Py_ssize_t hd) -> int:
    """Bytes of one kv head's hd values in Q8_0 blocks."""
    if hd % 32:
        raise ValueError(f"a Q8_0 cache needs head_dim divisible by 32, got {hd}")
    return hd // 32 * 34


def rotation_block(Py_ssize_t hd) -> int:
    """The Walsh-Hadamard block `rotate` uses for rows of hd values: the largest power of two that
    divides hd (at most hd)."""
    if hd < 1:
        raise ValueError(f"head_dim must be positive, got {hd}")
    return hd & -hd


def rotate(x, out=None):
    """out = x times the orthonormal Walsh-Hadamard matrix, block by block along the last axis
    (blocks of rotation_block(hd) values); x, out float32, C-contiguous, out may be x.

    The matrix is symmetric and orthogonal, so rotating both queries and keys leaves every q.k
    as it was, while each key's large channels are spread over its block: a Q8_0 block's scale
    (its largest value / 127) then sits much nearer the typical value, and rounding costs less."""
    if not cnp.PyArray_Check(x) or x.ndim < 1:
        raise ValueError("x: expected a numpy array of at least one dimension")
    _check(x, "x", cnp.NPY_FLOAT32, x.ndim, False)
    if out is None:
        out = cnp.PyArray_NewCopy(<cnp.ndarray>x, cnp.NPY_CORDER)
    else:
        _check(out, "out", cnp.NPY_FLOAT32, x.ndim, True)
        if out.shape != x.shape:
            raise ValueError(f"out: expected shape {x.shape}, got {out.shape}")
        if out is not x:
            out[...] = x
    if x.size == 0:
        return out
    cdef Py_ssize_t hd = x.shape[x.ndim - 1]
    cdef Py_ssize_t blk = rotation_block(hd), nblk = x.size // blk, b
    cdef float* p = <float*>_data(out)
    with nogil:
        for b in range(nblk):
            dair_attn_wht(p + b * blk, <int>blk)
    return out


cdef int _store_rows(const float* x, uint8_t* cache, const int32_t* pos, Py_ssize_t n, Py_ssize_t vals,
                     size_t row_bytes, int kind, int rot) noexcept nogil:
    """cache row pos[i] (row i when pos is NULL) = x[i] (vals values) as the cache stores them:
    float32, float16 (rounded to nearest even, as numpy's astype), or Q8_0 blocks of the values
    rotated in blocks of rot. -1: out of memory."""
    cdef Py_ssize_t i, j, b
    cdef uint8_t* row
    cdef uint16_t* h
    cdef float* tmp = NULL
    if kind == DAIR_KV_Q8_0:
        tmp = <float*>malloc(sizeof(float) * vals)
        if tmp == NULL:
            return -1
    for i in range(n):
        row = cache + <size_t>(pos[i] if pos != NULL else i) * row_bytes
        if kind == DAIR_KV_Q8_0:
            memcpy(tmp, x + i * vals, sizeof(float) * vals)
            for b in range(vals // rot):
                dair_attn_wht(tmp + b * rot, rot)
            dair_quantize_q8_0_ref(tmp, <size_t>vals, row)
        elif kind == DAIR_KV_F16:
            h = <uint16_t*>row
            for j in range(vals):
                h[j] = dair_fp32_to_fp16(x[i * vals + j])
        else:
            memcpy(row, x + i * vals, sizeof(float) * vals)
    free(tmp)
    return 0


def store_rotated_q8_0(x, dst):
    """dst (uint8[m, n_kv, hd // 32 * 34], the cache rows to fill) = Q8_0 blocks of rotate(x)
    (x float32[m, n_kv, hd]), quantized as llama.cpp's reference does."""
    _check(x, "x", cnp.NPY_FLOAT32, 3, False)
    _check(dst, "dst", cnp.NPY_UINT8, 3, True)
    cdef Py_ssize_t m = _dim(x, 0), hd = _dim(x, 2)
    if _dim(dst, 0) != m or _dim(dst, 1) != _dim(x, 1) or _dim(dst, 2) != q8_0_row_bytes(hd):
        raise ValueError(f"dst: expected shape ({m}, {_dim(x, 1)}, {q8_0_row_bytes(hd)}), got {dst.shape}")
    _no_overlap(x, dst, "x", "dst")
    cdef const float* p = <const float*>_data(x)
    cdef uint8_t* d = <uint8_t*>_data(dst)
    cdef Py_ssize_t vals = _dim(x, 1) * hd
    cdef int blk = <int>rotation_block(hd), rc
    cdef size_t rb = <size_t>q8_0_row_bytes(hd) * <size_t>_dim(x, 1)
    with nogil:
        rc = _store_rows(p, d, NULL, m, vals, rb, DAIR_KV_Q8_0, blk)
    if rc:
        raise MemoryError("store_rotated_q8_0: out of memory")
    return dst


def attention(q, k_cache, v_cache, positions, out=None, scale=None, int window=0, bint rotated=False,
              k_new=None, v_new=None):
    """q float32[n, n_heads, hd]; k_cache, v_cache float32|float16[cap, n_kv, hd] or
    uint8[cap, n_kv, hd // 32 * 34] (Q8_0 blocks); positions int32[n]; window > 0: query i sees
    positions positions[i] - window + 1 .. positions[i] only; rotated: K and V hold rotate(k) and
    rotate(v) (the Q8_0 cache of engine/kvcache.py), so q is rotated alike and the output rotated
    back. k_new, v_new float32[n, n_kv, hd]: this step's keys and values, written first at
    cache rows positions[i] as the cache stores them (a Q8_0 cache: rotated, as
    store_rotated_q8_0), in the same call: a decode step's store then costs no numpy cast and no
    Python call of its own. Returns out float32[n, n_heads, hd]."""
    _check(q, "q", cnp.NPY_FLOAT32, 3, False)
    _check(positions, "positions", cnp.NPY_INT32, 1, False)
    if not cnp.PyArray_Check(k_cache) or not cnp.PyArray_Check(v_cache):
        raise ValueError("k_cache and v_cache must be numpy arrays")
    cdef int kt = cnp.PyArray_TYPE(<cnp.ndarray>k_cache)
    if kt != cnp.NPY_FLOAT32 and kt != cnp.NPY_FLOAT16 and kt != cnp.NPY_UINT8:
        raise ValueError(f"k_cache: expected dtype float32, float16 or uint8 (Q8_0), got {k_cache.dtype}")
    _check(k_cache, "k_cache", kt, 3, False)
    _check(v_cache, "v_cache", kt, 3, False)
    cdef Py_ssize_t n = _dim(q, 0), H = _dim(q, 1), hd = _dim(q, 2)
    cdef Py_ssize_t cap = _dim(k_cache, 0), KV = _dim(k_cache, 1)
    cdef Py_ssize_t want = q8_0_row_bytes(hd) if kt == cnp.NPY_UINT8 else hd
    if _dim(k_cache, 2) != want:
        what = "Q8_0 bytes per head" if kt == cnp.NPY_UINT8 else "head_dim"
        raise ValueError(f"k_cache: {what} {_dim(k_cache, 2)} != {want} for q head_dim {hd}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {k_cache.shape}, got {v_cache.shape}")
    if KV < 1 or H % KV:
        raise ValueError(f"n_heads {H} is not a multiple of n_kv {KV}")
    if _dim(positions, 0) != n:
        raise ValueError(f"positions: expected shape ({n},), got {positions.shape}")
    if window < 0:
        raise ValueError(f"window must be >= 0, got {window}")
    if cap >= 2 ** 24:
        raise ValueError(f"cache of {cap} positions: at most 2^24 (positions are compared as float32)")
    cdef const int32_t* pp = <const int32_t*>_data(positions)
    cdef Py_ssize_t i, bad = -1
    with nogil:
        for i in range(n):
            if pp[i] < 0 or pp[i] >= cap:
                bad = i
                break
    if bad >= 0:
        raise ValueError(f"positions[{bad}] = {pp[bad]} outside the cache [0, {cap})")
    if out is None:
        out = cnp.PyArray_EMPTY(3, cnp.PyArray_DIMS(<cnp.ndarray>q), cnp.NPY_FLOAT32, 0)
    else:
        _check(out, "out", cnp.NPY_FLOAT32, 3, True)
        if out.shape != q.shape:
            raise ValueError(f"out: expected shape {q.shape}, got {out.shape}")
        _no_overlap(out, q, "out", "q")
        _no_overlap(out, k_cache, "out", "k_cache")
        _no_overlap(out, v_cache, "out", "v_cache")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new come together")
    if k_new is not None:
        _check(k_new, "k_new", cnp.NPY_FLOAT32, 3, False)
        _check(v_new, "v_new", cnp.NPY_FLOAT32, 3, False)
        if _dim(k_new, 0) != n or _dim(k_new, 1) != KV or _dim(k_new, 2) != hd:
            raise ValueError(f"k_new: expected shape ({n}, {KV}, {hd}), got {k_new.shape}")
        if v_new.shape != k_new.shape:
            raise ValueError(f"v_new: expected shape {k_new.shape}, got {v_new.shape}")
        if kt == cnp.NPY_UINT8 and not rotated:
            raise ValueError("k_new into a Q8_0 cache: its rows are stored rotated (rotated=True)")
        if not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>k_cache) or not cnp.PyArray_ISWRITEABLE(<cnp.ndarray>v_cache):
            raise ValueError("k_cache and v_cache must be writable to store k_new, v_new")
        for name, src in (("k_new", k_new), ("v_new", v_new)):
            _no_overlap(src, k_cache, name, "k_cache")
            _no_overlap(src, v_cache, name, "v_cache")
    if n == 0:
        return out
    cdef dair_attn_args a
    a.q = <const float*>_data(q)
    a.out = <float*>_data(out)
    a.pos = pp
    a.k = <const uint8_t*>_data(k_cache)
    a.v = <const uint8_t*>_data(v_cache)
    a.kind = DAIR_KV_Q8_0 if kt == cnp.NPY_UINT8 else (DAIR_KV_F16 if kt == cnp.NPY_FLOAT16 else DAIR_KV_F32)
    a.head_bytes = <size_t>(want * cnp.PyArray_ITEMSIZE(<cnp.ndarray>k_cache))
    a.row_bytes = a.head_bytes * <size_t>KV
    a.n = <int>n
    a.H = <int>H
    a.KV = <int>KV
    a.G = <int>(H // KV)
    a.hd = <int>hd
    a.scale = <float>(1.0 / sqrt(<double>hd)) if scale is None else <float>scale
    a.window = window
    a.rot = <int>rotation_block(hd) if rotated else 0
    a.isa = _isa
    cdef int rc = 0
    cdef const float* kn = NULL
    cdef const float* vn = NULL
    cdef int rblk = <int>rotation_block(hd)
    if k_new is not None:
        kn = <const float*>_data(k_new)
        vn = <const float*>_data(v_new)
    with nogil:
        if kn != NULL:
            rc = _store_rows(kn, <uint8_t*>a.k, pp, n, KV * hd, a.row_bytes, a.kind, rblk)
            if rc == 0:
                rc = _store_rows(vn, <uint8_t*>a.v, pp, n, KV * hd, a.row_bytes, a.kind, rblk)
        if rc == 0:
            rc = dair_attention(&a)
    if rc != 0:
        raise MemoryError("attention: out of memory for scratch")
    return out
