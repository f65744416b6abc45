# cython: language_level=3
"""Activations on the wire as GGUF Q8_0 blocks (34 bytes per 32 values, see blocks.h).

Quantization is ggml's quantize_row_q8_0_ref (d = amax / 127, q = roundf(x / d)),
so any llama.cpp-compatible reader decodes the same values.
"""
include "_common.pxi"

cdef extern from "qdot.h" nogil:
    void dair_quantize_q8_0_ref(const float* x, size_t nvals, uint8_t* out)
    void dair_dequant_row(const uint8_t* src, int qtype, int cols, float* dst)
    enum:
        DAIR_Q8_0

BLOCK_BYTES = 34
BLOCK_VALUES = 32


def q8_0_nbytes(Py_ssize_t n, Py_ssize_t d) -> int:
    """Bytes of n rows of d values in Q8_0 blocks."""
    if d % 32:
        raise ValueError(f"Q8_0 needs a row length divisible by 32, got {d}")
    return n * (d // 32) * 34


def quantize_q8_0(x, out=None):
    """x float32[n, d] (d % 32 == 0) -> uint8[n * (d // 32) * 34] of Q8_0 blocks."""
    _check(x, "x", cnp.NPY_FLOAT32, 2, False)
    cdef Py_ssize_t n = _dim(x, 0), d = _dim(x, 1)
    cdef Py_ssize_t nbytes = q8_0_nbytes(n, d)
    cdef cnp.npy_intp dims[1]
    if out is None:
        dims[0] = nbytes
        out = cnp.PyArray_EMPTY(1, dims, cnp.NPY_UINT8, 0)
    else:
        _check(out, "out", cnp.NPY_UINT8, 1, True)
        if _dim(out, 0) != nbytes:
            raise ValueError(f"out: expected {nbytes} bytes, got {_dim(out, 0)}")
    cdef const float* xp = <const float*>_data(x)
    cdef uint8_t* op = <uint8_t*>_data(out)
    with nogil:
        dair_quantize_q8_0_ref(xp, <size_t>(n * d), op)
    return out


def dequantize_into(buf, out):
    """Decode Q8_0 blocks buf (uint8, or any bytes-like) into out float32[n, d]. Returns out."""
    _check(out, "out", cnp.NPY_FLOAT32, 2, True)
    cdef Py_ssize_t n = _dim(out, 0), d = _dim(out, 1)
    cdef Py_ssize_t nbytes = q8_0_nbytes(n, d)
    if not cnp.PyArray_Check(buf):
        buf = np.frombuffer(buf, dtype=np.uint8)
    _check(buf, "buf", cnp.NPY_UINT8, 1, False)
    if _dim(buf, 0) != nbytes:
        raise ValueError(f"buf: {n} x {d} in Q8_0 needs {nbytes} bytes, got {_dim(buf, 0)}")
    cdef const uint8_t* bp = <const uint8_t*>_data(buf)
    cdef float* op = <float*>_data(out)
    cdef Py_ssize_t i, rb = (d // 32) * 34
    with nogil:
        for i in range(n):
            dair_dequant_row(bp + i * rb, DAIR_Q8_0, <int>d, op + i * d)
    return out


def dequantize_q8_0(buf, Py_ssize_t n, Py_ssize_t d):
    """Decode Q8_0 blocks into a new float32[n, d]."""
    if n < 0 or d < 0:
        raise ValueError(f"bad shape ({n}, {d})")
    cdef cnp.npy_intp dims[2]
    dims[0] = n
    dims[1] = d
    out = cnp.PyArray_EMPTY(2, dims, cnp.NPY_FLOAT32, 0)
    return dequantize_into(buf, out)
