# cython: language_level=3
"""RMSNorm over the last axis: out = x / sqrt(mean(x^2) + eps) * w."""
include "_common.pxi"

from libc.math cimport sqrt


cdef inline void _rms_row(const float* x, const float* w, float* o, Py_ssize_t d, float eps) noexcept nogil:
    # Sum of squares in double, as ggml does, so long rows do not lose digits.
    cdef double ss = 0.0
    cdef Py_ssize_t j
    for j in range(d):
        ss += <double>x[j] * x[j]
    cdef float scale = <float>(1.0 / sqrt(ss / d + eps))
    for j in range(d):
        o[j] = x[j] * scale * w[j]


ctypedef struct _Job:
    const float* x
    const float* w
    float* o
    Py_ssize_t n, d, per
    float eps


cdef void _rms_chunk(void* p, int c) noexcept nogil:
    cdef _Job* j = <_Job*>p
    cdef Py_ssize_t i
    for i in range(c * j.per, min((c + 1) * j.per, j.n)):
        _rms_row(j.x + i * j.d, j.w, j.o + i * j.d, j.d, j.eps)


def rmsnorm(x, w, float eps, out=None):
    """RMSNorm of each row of x[n, d] with weight w[d]; out may be x (in place) or None."""
    _check(x, "x", cnp.NPY_FLOAT32, 2, False)
    _check(w, "w", cnp.NPY_FLOAT32, 1, False)
    cdef Py_ssize_t n = _dim(x, 0), d = _dim(x, 1)
    if _dim(w, 0) != d:
        raise ValueError(f"w: expected shape ({d},), got {w.shape}")
    if out is None:
        out = cnp.PyArray_EMPTY(2, cnp.PyArray_DIMS(<cnp.ndarray>x), cnp.NPY_FLOAT32, 0)
    elif out is not x:
        _check(out, "out", cnp.NPY_FLOAT32, 2, True)
        if _dim(out, 0) != n or _dim(out, 1) != d:
            raise ValueError(f"out: expected shape ({n}, {d}), got {out.shape}")
        _no_overlap(out, x, "out", "x")
    else:
        _check(out, "out", cnp.NPY_FLOAT32, 2, True)
    _no_overlap(out, w, "out", "w")
    cdef const float* xp = <const float*>_data(x)
    cdef const float* wp = <const float*>_data(w)
    cdef float* op = <float*>_data(out)
    cdef _Job j
    j.x = xp
    j.w = wp
    j.o = op
    j.n = n
    j.d = d
    j.eps = eps
    cdef int nch = _chunks(<double>n * d * 8.0, 32 * 1024.0, <int>n)
    j.per = (n + nch - 1) // nch
    with nogil:
        dair_parallel_for(nch, _rms_chunk, &j)
    return out
