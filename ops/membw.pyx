# cython: language_level=3
"""How fast the kernel pool's threads can read memory: the ceiling under a decode step.

A decode step reads every weight once, so bytes per token over this bandwidth is the fastest a
token can be (DESIGN.md's physical limit), and the ratio of two thread counts' bandwidths bounds
what a second thread can add to a memory-bound decode. The buffer is read with the same pool and
chunk split the kernels use, many times larger than the caches, with no arithmetic but an XOR
that keeps the loads (the compiler turns it into the widest vector loads the CPU has).
"""
include "_common.pxi"

from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memset


ctypedef struct _Job:
    const uint64_t* p
    Py_ssize_t n, per  # words in all, per chunk
    uint64_t* sink     # one word per chunk, so that no load is optimised away


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
    j.sink[c] = a0 ^ a1 ^ a2 ^ a3 ^ a4 ^ a5 ^ a6 ^ a7


def read_bandwidth(Py_ssize_t nbytes=256 << 20, int repeats=5) -> float:
    """Best-of-`repeats` bytes per second of reading a fresh `nbytes` buffer with the pool's
    current thread count (dair.ops.threads.set_num_threads)."""
    if nbytes < 1 << 20:
        raise ValueError(f"nbytes must be at least 1 MiB to measure memory, got {nbytes}")
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    cdef Py_ssize_t words = nbytes // 64 * 8
    cdef uint64_t* buf = <uint64_t*>malloc(words * 8)
    cdef int nt = dair_pool_threads()
    cdef int nch = 8 * nt if nt > 1 else 1
    cdef uint64_t* sink = <uint64_t*>malloc(nch * 8)
    if buf == NULL or sink == NULL:
        free(buf)
        free(sink)
        raise MemoryError(f"read_bandwidth: cannot allocate {nbytes} bytes")
    memset(buf, 1, words * 8)  # every page backed before the clock starts
    cdef _Job j
    j.p = buf
    j.n = words
    j.per = ((words + nch - 1) // nch + 7) // 8 * 8
    j.sink = sink
    import time
    best = float("inf")
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            with nogil:
                dair_parallel_for(nch, _read_chunk, &j)
            best = min(best, time.perf_counter() - t0)
    finally:
        free(buf)
        free(sink)
    return words * 8 / best
