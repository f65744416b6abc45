# cython: language_level=3
"""Elementwise kernels of the feed-forward block."""
include "_common.pxi"

cdef extern from "vmath.h" nogil:
    void dair_silu_mul(float* g, const float* u, size_t m)
    void dair_gelu_tanh_mul(float* g, const float* u, size_t m)


cdef inline void _add_span(float* x, const float* y, Py_ssize_t m) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(m):
        x[j] = x[j] + y[j]


ctypedef struct _Job:
    float* g
    const float* u
    Py_ssize_t m, per
    bint gelu


cdef void _gated_chunk(void* p, int c) noexcept nogil:
    cdef _Job* j = <_Job*>p
    cdef Py_ssize_t a = c * j.per
    cdef Py_ssize_t b = min(a + j.per, j.m)
    if a < b and j.gelu:
        dair_gelu_tanh_mul(j.g + a, j.u + a, <size_t>(b - a))
    elif a < b:
        dair_silu_mul(j.g + a, j.u + a, <size_t>(b - a))


cdef object _gated(gate, up, bint gelu):
    _check(gate, "gate", cnp.NPY_FLOAT32, 2, True)
    _check(up, "up", cnp.NPY_FLOAT32, 2, False)
    if _dim(up, 0) != _dim(gate, 0) or _dim(up, 1) != _dim(gate, 1):
        raise ValueError(f"up: expected shape {gate.shape}, got {up.shape}")
    if gate is not up:
        _no_overlap(gate, up, "gate", "up")
    cdef Py_ssize_t n = _dim(gate, 0), h = _dim(gate, 1)
    cdef _Job j
    j.g = <float*>_data(gate)
    j.u = <const float*>_data(up)
    j.m = n * h
    j.gelu = gelu
    cdef int nch = _chunks(<double>j.m * 16.0, 32 * 1024.0, <int>((j.m + 255) // 256))
    j.per = ((j.m + nch - 1) // nch + 15) // 16 * 16  # whole cache lines per chunk
    with nogil:
        dair_parallel_for(nch, _gated_chunk, &j)
    return gate


def silu_mul(gate, up):
    """gate = silu(gate) * up, in place; both float32[n, h]. Returns gate."""
    return _gated(gate, up, False)


def gelu_tanh_mul(gate, up):
    """gate = gelu(gate) * up, in place, GELU with llama.cpp's tanh approximation; both
    float32[n, h]. Returns gate."""
    return _gated(gate, up, True)


def add_inplace(x, y):
    """x += y for float32 arrays of the same shape (any rank, C-contiguous). Returns x."""
    if not cnp.PyArray_Check(x) or not cnp.PyArray_Check(y):
        raise ValueError("add_inplace: x and y must be numpy arrays")
    _check(x, "x", cnp.NPY_FLOAT32, cnp.PyArray_NDIM(<cnp.ndarray>x), True)
    _check(y, "y", cnp.NPY_FLOAT32, cnp.PyArray_NDIM(<cnp.ndarray>x), False)
    if x.shape != y.shape:
        raise ValueError(f"y: expected shape {x.shape}, got {y.shape}")
    cdef Py_ssize_t m = cnp.PyArray_SIZE(<cnp.ndarray>x)
    cdef float* xp = <float*>_data(x)
    cdef const float* yp = <const float*>_data(y)
    with nogil:
        _add_span(xp, yp, m)
    return x
