# cython: language_level=3
"""Causal grouped-query attention of new queries against a KV cache.

Query i attends to cache rows 0..positions[i] inclusive (the caller has already
written this step's keys and values there); query head h reads kv head
h // (n_heads // n_kv). Softmax in float32 with the maximum subtracted. The
cache may be float32 or float16 (converted on the fly, F16C when available).
"""
include "_common.pxi"

from libc.math cimport sqrt
from libc.stdlib cimport free, malloc

cdef extern from "attn.h" nogil:
    void dair_attn_group(const float* q, const void* kc, const void* vc, int f16, size_t row_stride, int kvh,
                         int hd, int G, int npos, float scale, float* out, float* sc, float* tmp)


ctypedef struct _Job:
    const float* q
    const void* k
    const void* v
    const int32_t* pos
    float* out
    float* scratch
    size_t per          # scratch floats per chunk
    size_t stride       # cache row stride (elements)
    Py_ssize_t ntask, KV, group, hd, maxpos
    int nch, f16
    float scale


cdef void _attn_chunk(void* p, int c) noexcept nogil:
    # A task is one (query row, kv head) pair with its group of query heads. Tasks c, c + nch, ...:
    # causal rows grow with position, so contiguous blocks would be unbalanced.
    cdef _Job* j = <_Job*>p
    cdef Py_ssize_t task = c
    cdef Py_ssize_t off
    cdef float* sc = j.scratch + j.per * c
    while task < j.ntask:
        off = task * j.group * j.hd  # = (i * n_heads + kvh * group) * hd
        dair_attn_group(j.q + off, j.k, j.v, j.f16, j.stride, <int>(task % j.KV), <int>j.hd, <int>j.group,
                        j.pos[task // j.KV] + 1, j.scale, j.out + off, sc, sc + j.group * (j.maxpos + 1))
        task += j.nch


def attention(q, k_cache, v_cache, positions, out=None, scale=None):
    """q float32[n, n_heads, hd]; k_cache, v_cache float32|float16[cap, n_kv, hd]; positions int32[n].
    Returns out float32[n, n_heads, hd]."""
    _check(q, "q", cnp.NPY_FLOAT32, 3, False)
    _check(positions, "positions", cnp.NPY_INT32, 1, False)
    if not cnp.PyArray_Check(k_cache) or not cnp.PyArray_Check(v_cache):
        raise ValueError("k_cache and v_cache must be numpy arrays")
    cdef int kt = cnp.PyArray_TYPE(<cnp.ndarray>k_cache)
    if kt != cnp.NPY_FLOAT32 and kt != cnp.NPY_FLOAT16:
        raise ValueError(f"k_cache: expected dtype float32 or float16, got {k_cache.dtype}")
    _check(k_cache, "k_cache", kt, 3, False)
    _check(v_cache, "v_cache", kt, 3, False)
    cdef Py_ssize_t n = _dim(q, 0), H = _dim(q, 1), hd = _dim(q, 2)
    cdef Py_ssize_t cap = _dim(k_cache, 0), KV = _dim(k_cache, 1)
    if _dim(k_cache, 2) != hd:
        raise ValueError(f"k_cache: head_dim {_dim(k_cache, 2)} != q head_dim {hd}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected shape {k_cache.shape}, got {v_cache.shape}")
    if KV < 1 or H % KV:
        raise ValueError(f"n_heads {H} is not a multiple of n_kv {KV}")
    if _dim(positions, 0) != n:
        raise ValueError(f"positions: expected shape ({n},), got {positions.shape}")
    cdef const int32_t* pp = <const int32_t*>_data(positions)
    cdef Py_ssize_t i, maxpos = -1, bad = -1
    cdef double work = 0.0
    with nogil:
        for i in range(n):
            if pp[i] < 0 or pp[i] >= cap:
                bad = i
                break
            if pp[i] > maxpos:
                maxpos = pp[i]
            work += pp[i] + 1.0
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
    cdef float sc = <float>(1.0 / sqrt(<double>hd)) if scale is None else <float>scale
    cdef const float* qp = <const float*>_data(q)
    cdef const void* kp = _data(k_cache)
    cdef const void* vp = _data(v_cache)
    cdef float* op = <float*>_data(out)
    cdef int f16 = kt == cnp.NPY_FLOAT16
    cdef _Job j
    j.q = qp
    j.k = kp
    j.v = vp
    j.pos = pp
    j.out = op
    j.f16 = f16
    j.scale = sc
    j.KV = KV
    j.group = H // KV
    j.hd = hd
    j.maxpos = maxpos
    j.ntask = n * KV
    j.stride = <size_t>(KV * hd)
    j.per = <size_t>(j.group * (maxpos + 1) + hd + 16)
    j.nch = _chunks(work * H * hd * 4.0, 32 * 1024.0, <int>j.ntask)
    # Scores of one group plus a converted f16 row per chunk, allocated up front so no chunk can fail alone.
    j.scratch = <float*>malloc(j.per * j.nch * sizeof(float))
    if j.scratch == NULL:
        raise MemoryError("attention: out of memory for scores")
    with nogil:
        dair_parallel_for(j.nch, _attn_chunk, &j)
    free(j.scratch)
    return out
