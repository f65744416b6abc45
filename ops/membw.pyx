# cython: language_level=3
"""How fast the kernel pool's threads can read memory: the ceiling under a decode step.

A decode step reads every weight once, so bytes per token over this bandwidth is the fastest a
token can be (DESIGN.md's physical limit), and the ratio of two thread counts' bandwidths bounds
what a second thread can add to a memory-bound decode. The buffer is read with the same pool the
kernels use, many times larger than the caches, with no arithmetic but an XOR that keeps every
load (the compiler turns it into the widest vector loads the CPU has); `xor_words` is that read,
and its result shows that every word was read once.
"""
include "_common.pxi"

import time

import numpy as np

from libc.stdint cimport uint64_t


ctypedef struct _Job:
    const uint64_t* p
    Py_ssize_t n, per  # words in all, per chunk (a multiple of 8: whole 64-byte lines)
    uint64_t* sink     # each chunk's XOR


cdef void _read_chunk(void* ctx, int c) noexcept nogil:
    cdef _Job* j = <_Job*>ctx
    cdef Py_ssize_t i, lo = c * j.per, hi = min(lo + j.per, j.n)
    cdef uint64_t a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0
    i = lo
    while i + 8 <= hi:  # one 64-byte line per iteration
        a0 ^= j.p[i]
        a1 ^= j.p[i + 1]
        a2 ^= j.p[i + 2]
        a3 ^= j.p[i + 3]
        a4 ^= j.p[i + 4]
        a5 ^= j.p[i + 5]
        a6 ^= j.p[i + 6]
        a7 ^= j.p[i + 7]
        i += 8
    while i < hi:
        a0 ^= j.p[i]
        i += 1
    j.sink[c] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7


def xor_words(words) -> int:
    """The XOR of every word of a C-contiguous uint64 array, read in parallel chunks by the pool
    (its current thread count)."""
    if not cnp.PyArray_Check(words) or words.dtype != np.uint64 or words.ndim != 1:
        raise ValueError("words: expected a one-dimensional numpy uint64 array")
    _check(words, "words", cnp.NPY_UINT64, 1, False)
    cdef Py_ssize_t n = _dim(words, 0)
    cdef int nt = dair_pool_threads()
    cdef int nch = 8 * nt if nt > 1 and n >= 64 * nt else 1
    sink = np.zeros(nch, np.uint64)
    cdef _Job j
    j.p = <const uint64_t*>_data(words)
    j.n = n
    j.per = ((n + nch - 1) // nch + 7) // 8 * 8
    j.sink = <uint64_t*>_data(sink)
    with nogil:
        dair_parallel_for(nch, _read_chunk, &j)
    return int(np.bitwise_xor.reduce(sink))


def read_bandwidth(Py_ssize_t nbytes=256 << 20, int repeats=5) -> float:
    """Best-of-`repeats` bytes per second of reading a fresh `nbytes` buffer with the pool's
    current thread count (dair.ops.threads.set_num_threads)."""
    if nbytes < 1 << 20:
        raise ValueError(f"nbytes must be at least 1 MiB to measure memory, got {nbytes}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    try:
        buf = np.ones(nbytes // 8, np.uint64)  # every page backed before the clock starts
    except MemoryError:
        raise MemoryError(f"read_bandwidth: cannot allocate {nbytes} bytes") from None
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        xor_words(buf)
        best = min(best, time.perf_counter() - t0)
    return buf.nbytes / best
