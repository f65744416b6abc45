# Shared argument checks for the dair.ops kernels (textually included).
# Checks go through the numpy C API rather than typed memoryviews: acquiring a
# memoryview costs about a microsecond per argument, which matters for small
# matrix-vector calls made hundreds of times per token.
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, int8_t

import numpy as np

cnp.import_array()

cdef str _dtname(object a):
    return str(a.dtype) if isinstance(a, np.ndarray) else type(a).__name__


cdef inline int _check(object a, str name, int typenum, int ndim, bint writable) except -1:
    """Raise ValueError unless a is a C-contiguous, aligned ndarray of the given dtype and rank."""
    if not cnp.PyArray_Check(a):
        raise ValueError(f"{name}: expected a numpy array, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != typenum:
        raise ValueError(f"{name}: expected dtype {np.dtype(cnp.PyArray_DescrFromType(typenum))}, got {a.dtype}")
    if cnp.PyArray_NDIM(arr) != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {a.shape}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(arr) or not cnp.PyArray_ISALIGNED(arr):
        raise ValueError(f"{name}: must be C-contiguous and aligned (use np.ascontiguousarray)")
    if writable and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name}: must be writable")
    return 0


cdef inline Py_ssize_t _dim(object a, int i):
    return cnp.PyArray_DIM(<cnp.ndarray>a, i)


cdef inline void* _data(object a):
    return cnp.PyArray_DATA(<cnp.ndarray>a)


cdef inline int _no_overlap(object a, object b, str an, str bn) except -1:
    """Kernels that write out while reading an input need them disjoint."""
    cdef char* pa = <char*>cnp.PyArray_DATA(<cnp.ndarray>a)
    cdef char* pb = <char*>cnp.PyArray_DATA(<cnp.ndarray>b)
    cdef Py_ssize_t na = cnp.PyArray_NBYTES(<cnp.ndarray>a)
    cdef Py_ssize_t nbt = cnp.PyArray_NBYTES(<cnp.ndarray>b)
    if pa < pb + nbt and pb < pa + na:
        raise ValueError(f"{an} must not overlap {bn}")
    return 0


# Each module names the kernel headers it uses itself (setup.py makes every header a build
# dependency), so a module compiles only the kernels it calls.

cdef extern from "pool.h" nogil:
    ctypedef void (*dair_task_fn)(void* ctx, int chunk) noexcept nogil
    ctypedef struct dair_pool_api:
        pass
    const dair_pool_api* dair_pool
    void dair_parallel_for(int nchunks, dair_task_fn fn, void* ctx)
    int dair_pool_threads()
    void dair_pool_prefetch(const void** ptrs, const size_t* lens, int n)

from cpython.pycapsule cimport PyCapsule_GetPointer

from dair.ops.threads import _pool_api as _pool_capsule

dair_pool = <const dair_pool_api*>PyCapsule_GetPointer(_pool_capsule, "dair.ops.pool")


cdef inline int _chunks(double work, double per_chunk, int max_chunks) noexcept nogil:
    """Chunks for a job of `work` units: about `per_chunk` each (a claim costs ~0.1 us, a
    chunk should be worth ~1 us or more), at most max_chunks, one when running on one thread."""
    cdef int nt = dair_pool_threads()
    if nt <= 1:
        return 1
    cdef double want = work / per_chunk
    if want < 1.0:
        return 1
    if want > 8.0 * nt:
        want = 8.0 * nt
    if want > max_chunks:
        want = max_chunks
    return <int>want if want >= 1.0 else 1
