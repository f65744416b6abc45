# cython: language_level=3
"""Rotary position embedding, llama.cpp's "normal" mode (GGUF llama convention).

Pairs (x[2i], x[2i+1]) of every head are rotated by pos * inv_freq[i] for
i < len(inv_freq); dims past 2 * len(inv_freq) are left alone. The caller
computes inv_freq (base, llama3 scaling and so on are its business).
"""
include "_common.pxi"

from cython.parallel cimport prange
from libc.math cimport cosf, sinf
from libc.stdlib cimport free, malloc


cdef inline void _rope_token(float* x, Py_ssize_t heads, Py_ssize_t hd, float pos, const float* inv_freq,
                             Py_ssize_t half, float* cs) noexcept nogil:
    # cos/sin once per token, shared by all heads.
    cdef Py_ssize_t i, h
    cdef float th, a, b, c, s
    for i in range(half):
        th = pos * inv_freq[i]
        cs[2 * i] = cosf(th)
        cs[2 * i + 1] = sinf(th)
    cdef float* xh
    for h in range(heads):
        xh = x + h * hd
        for i in range(half):
            c = cs[2 * i]
            s = cs[2 * i + 1]
            a = xh[2 * i]
            b = xh[2 * i + 1]
            xh[2 * i] = a * c - b * s
            xh[2 * i + 1] = a * s + b * c


def rope_inplace(x, positions, inv_freq):
    """Rotate x[n, heads, head_dim] in place; positions int32[n]; inv_freq float32[rope_dim // 2]."""
    _check(x, "x", cnp.NPY_FLOAT32, 3, True)
    _check(positions, "positions", cnp.NPY_INT32, 1, False)
    _check(inv_freq, "inv_freq", cnp.NPY_FLOAT32, 1, False)
    cdef Py_ssize_t n = _dim(x, 0), heads = _dim(x, 1), hd = _dim(x, 2)
    cdef Py_ssize_t half = _dim(inv_freq, 0)
    if _dim(positions, 0) != n:
        raise ValueError(f"positions: expected shape ({n},), got {positions.shape}")
    if 2 * half > hd:
        raise ValueError(f"inv_freq: {half} frequencies rotate {2 * half} dims, more than head_dim {hd}")
    cdef float* xp = <float*>_data(x)
    cdef const int32_t* pp = <const int32_t*>_data(positions)
    cdef const float* fp = <const float*>_data(inv_freq)
    cdef Py_ssize_t i
    cdef int nt = _nthreads(<double>n * heads * hd * 8.0, 64 * 1024.0)
    cdef size_t per = <size_t>(2 * half + 1)
    cdef float* cs = <float*>malloc(per * nt * sizeof(float))
    if cs == NULL:
        raise MemoryError("rope_inplace: out of memory")
    with nogil:
        if nt == 1:
            for i in range(n):
                _rope_token(xp + i * heads * hd, heads, hd, <float>pp[i], fp, half, cs)
        else:
            for i in prange(n, num_threads=nt, schedule="static"):
                _rope_token(xp + i * heads * hd, heads, hd, <float>pp[i], fp, half,
                            cs + per * openmp.omp_get_thread_num())
    free(cs)
    return x
