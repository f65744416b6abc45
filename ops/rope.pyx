# cython: language_level=3
"""Rotary position embedding, llama.cpp's "normal" mode (GGUF llama convention).

Pairs (x[2i], x[2i+1]) of every head are rotated by pos * inv_freq[i] for
i < len(inv_freq), and scaled by `mscale` (YaRN's magnitude, 1 otherwise); dims past
2 * len(inv_freq) are left alone, unscaled, as in ggml. The caller computes inv_freq and
mscale (base, llama3/linear/YaRN scaling are its business: dair.engine.rope).
"""
include "_common.pxi"

from libc.math cimport cosf, sinf
from libc.stdlib cimport free, malloc


cdef inline void _rope_token(float* x, Py_ssize_t heads, Py_ssize_t hd, float pos, const float* inv_freq,
                             Py_ssize_t half, float mscale, float* cs) noexcept nogil:
    # cos/sin once per token, shared by all heads.
    cdef Py_ssize_t i, h
    cdef float th, a, b, c, s
    for i in range(half):
        th = pos * inv_freq[i]
        cs[2 * i] = cosf(th) * mscale
        cs[2 * i + 1] = sinf(th) * mscale
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


ctypedef struct _Job:
    float* x
    const int32_t* pos
    const float* inv_freq
    float* cs
    float mscale
    Py_ssize_t n, heads, hd, half, per


cdef void _rope_chunk(void* p, int c) noexcept nogil:
    cdef _Job* j = <_Job*>p
    cdef Py_ssize_t i
    cdef float* cs = j.cs + c * (2 * j.half + 1)
    for i in range(c * j.per, min((c + 1) * j.per, j.n)):
        _rope_token(j.x + i * j.heads * j.hd, j.heads, j.hd, <float>j.pos[i], j.inv_freq, j.half, j.mscale, cs)


def rope_inplace(x, positions, inv_freq, float mscale=1.0):
    """Rotate x[n, heads, head_dim] in place; positions int32[n]; inv_freq float32[rope_dim // 2];
    the rotated dims are also multiplied by mscale."""
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
    cdef _Job j
    j.x = xp
    j.pos = pp
    j.inv_freq = fp
    j.n = n
    j.heads = heads
    j.hd = hd
    j.half = half
    j.mscale = mscale
    cdef int nch = _chunks(<double>n * heads * hd * 8.0, 32 * 1024.0, <int>n)
    j.per = (n + nch - 1) // nch
    # cos/sin of one token per chunk, allocated up front so no chunk can fail alone.
    j.cs = <float*>malloc((2 * half + 1) * nch * sizeof(float))
    if j.cs == NULL:
        raise MemoryError("rope_inplace: out of memory")
    with nogil:
        dair_parallel_for(nch, _rope_chunk, &j)
    free(j.cs)
    return x
