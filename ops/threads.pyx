# cython: language_level=3
"""Thread count for every kernel in dair.ops, and the process-wide worker pool they share.

The kernels split their work into independent chunks and run them on the pool
in pool.h (see there for why not one OpenMP region per call). OpenMP's own
thread count follows the same setting, for any OpenMP code that remains.
"""
cimport openmp
from cpython.pycapsule cimport PyCapsule_New

# The pool's implementation is compiled here, once per process (pool.h reads this macro).
cdef extern from *:
    """
    #define DAIR_POOL_IMPL 1
    """

cdef extern from "pool.h":
    ctypedef struct dair_pool_api:
        pass
    const dair_pool_api dair_pool_impl
    ctypedef struct dair_pool_stats:
        unsigned long long jobs, serial_jobs, chunks, worker_chunks, waits, wait_ticks, max_wait_ticks
        unsigned long long solo_periods, wakes, job_ticks, steals, stalls, solo_stalled, solo_absent, solo_why, solo_now, ticks_per_us, solo_ticks, since_ticks
    dair_pool_stats dair_pool_get_stats()
    void dair_pool_park() nogil
    void dair_pool_wake() nogil
    int dair_pool_get_threads "dair_pool_impl.get_threads"() nogil
    void dair_pool_set_threads "dair_pool_impl.set_threads"(int n) nogil

#: The pool's function table, fetched by the other dair.ops modules at import.
_pool_api = PyCapsule_New(<void*>&dair_pool_impl, "dair.ops.pool", NULL)


def set_num_threads(int n) -> None:
    """Use n threads in every kernel (n <= 0: one per core)."""
    if n <= 0:
        n = openmp.omp_get_num_procs()
    openmp.omp_set_num_threads(n)
    with nogil:
        dair_pool_set_threads(n)


def get_num_threads() -> int:
    return dair_pool_get_threads()


def park() -> None:
    """Say the caller is going idle (a stage about to wait for its next message): workers that
    spin for the next job sleep at once, leaving the cores to the other processes of a pipeline."""
    dair_pool_park()


def wake() -> None:
    """Say work is coming (a stage that has just received a message): sleeping workers are woken
    now, so that they are running by the first kernel call instead of waking up during it."""
    dair_pool_wake()


def pool_stats() -> dict:
    """Counters of the worker pool since start: parallel jobs, jobs run on the caller alone (in a
    solo period), chunks, chunks run by workers, chunks the caller took over from a worker's range
    (steals), waits for a worker's chunk, their total and longest duration (ticks_per_us ticks a
    microsecond), stalls (waits over 100 us), solo periods begun (in all and by reason), whether
    one is on now, and the time spent in solo periods and since the first parallel job (ticks)."""
    return dict(dair_pool_get_stats())


_WHY = ("", "stalled", "absent")


def pool_summary() -> dict:
    """What the pool did since its first parallel job, for benchmarks: threads, parallel jobs, the
    share of their chunks the workers ran, the share of time spent in solo periods (one thread;
    jobs are then cut for one thread and do not reach the pool), how many solo periods began for
    each reason (stalled: waits for a preempted worker took over a quarter of a window; absent:
    workers ran under an eighth of its chunks) and whether one is on now."""
    st = pool_stats()
    return {"threads": get_num_threads(), "jobs": st["jobs"],
            "worker_share": round(st["worker_chunks"] / st["chunks"], 3) if st["chunks"] else 0.0,
            "solo_share": round(st["solo_ticks"] / st["since_ticks"], 3) if st["since_ticks"] else 0.0,
            "solo_stalled": st["solo_stalled"], "solo_absent": st["solo_absent"],
            "solo_now": bool(st["solo_now"])}


_seen = {"solo": 0, "since": 0, "choice": None}


def pool_choice() -> dict:
    """The pool's choice since the previous call (a stage's heartbeat; an idle period repeats the
    last answer): threads configured, threads in use (1 when solo most of the time), the share of
    the time it ran in parallel, and why the last solo period began ("stalled" or "absent"; ""
    when running in parallel)."""
    st = pool_stats()
    n = get_num_threads()
    dt, solo = st["since_ticks"] - _seen["since"], st["solo_ticks"] - _seen["solo"]
    busy = st["jobs"] != _seen.get("jobs")
    if not busy and _seen["choice"] is not None and _seen["choice"]["threads"] == n:
        return _seen["choice"]
    alone = n > 1 and (solo * 2 > dt if dt > 0 else bool(st["solo_now"]))
    choice = {"threads": n, "using": 1 if alone else n,
              "parallel_share": round(1 - solo / dt, 3) if dt > 0 and n > 1 else None,
              "why": _WHY[st["solo_why"]] if alone else ""}
    _seen.update(solo=st["solo_ticks"], since=st["since_ticks"], jobs=st["jobs"], choice=choice)
    return choice


# Start with OpenMP's default (OMP_NUM_THREADS or one per core).
dair_pool_set_threads(openmp.omp_get_max_threads())
