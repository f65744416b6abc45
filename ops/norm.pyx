# cython: language_level=3
"""RMSNorm over the last axis: out = x / sqrt(mean(x^2) + eps) * w."""
include "_common.pxi"

from cython.parallel cimport prange
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
    cdef Py_ssize_t i
    cdef int nt = _nthreads(<double>n * d * 4.0, 64 * 1024.0)
    with nogil:
        if nt == 1:
            for i in range(n):
                _rms_row(xp + i * d, wp, op + i * d, d, eps)
        else:
            for i in prange(n, num_threads=nt, schedule="static"):
                _rms_row(xp + i * d, wp, op + i * d, d, eps)
    return out
