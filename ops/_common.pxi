# Shared argument checks for the dair.ops kernels (textually included).
# Checks go through the numpy C API rather than typed memoryviews: acquiring a
# memoryview costs about a microsecond per argument, which matters for small
# matrix-vector calls made hundreds of times per token.
cimport numpy as cnp
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, int8_t
cimport openmp

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


cdef inline int _nthreads(double work, double per_thread_min) noexcept nogil:
    """Threads worth using for `work` units: a parallel region costs a few microseconds,
    so small kernels run on the calling thread."""
    cdef int nt = openmp.omp_get_max_threads()
    cdef int want = <int>(work / per_thread_min)
    if want < 1:
        want = 1
    return want if want < nt else nt
