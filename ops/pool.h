/* dair's worker pool: "help if you can" parallel loops.
 *
 * Why not an OpenMP parallel region per kernel call: a region ends with a
 * barrier that waits for every team thread. On a shared 2-core machine the
 * second thread is often preempted by another process, and every one of the
 * ~400 kernel calls of a decode step then waits for it: measured here, decode
 * fell from 125 tokens/s (1 thread) to 5 tokens/s (2 threads, libgomp's default
 * spinning) under load. In this pool the calling thread publishes a job of
 * independent chunks and starts on them at once; workers claim chunks only if
 * they are awake, and the caller waits only for chunks a worker has actually
 * claimed. A late or preempted worker costs nothing; an idle machine gets the
 * full speed-up.
 *
 * Why each thread has its own range of chunks: moving a cache line between the
 * two vCPUs of these machines takes ~0.5 us (measured: 1.0 us round trip), as
 * long as a chunk of a decode matmul takes to compute. With one shared chunk
 * counter (and one shared "done" counter) every chunk cost two such moves, and
 * two threads were no faster than one even on matrices held in cache. Now the
 * chunks are split into one contiguous range per thread, each with its own
 * claim counter and completion counter on its own cache line: a thread claims
 * from its range without touching the other's lines, and moves to another
 * thread's range (to help with what is left) only when its own is done. A job
 * then costs a few line moves in all, not a few per chunk.
 *
 * One pool per process: threads.pyx compiles the implementation (DAIR_POOL_IMPL)
 * and exports dair_pool_api in a capsule; every other ops module includes this
 * header for the declarations and fetches the capsule at import.
 */
#ifndef DAIR_POOL_H
#define DAIR_POOL_H

#include <stddef.h>

typedef void (*dair_task_fn)(void *ctx, int chunk);

typedef struct {
    /* run fn(ctx, c) for c in [0, nchunks), in any order, on any pool thread */
    void (*parallel)(int nchunks, dair_task_fn fn, void *ctx);
    int (*get_threads)(void);
    void (*set_threads)(int n);
    /* threads a job started now would run on: 1 during a solo period (see dair_pool_window_end) */
    int (*effective_threads)(void);
    /* ask idle workers to read these n ranges (n <= DAIR_PF_RANGES) into the caches while the
     * caller runs other code; replaces any request not yet done; ignored with one thread */
    void (*prefetch)(const void *const *ptrs, const size_t *lens, int n);
} dair_pool_api;

#define DAIR_PF_RANGES 4

typedef struct {
    unsigned long long jobs, serial_jobs, chunks, worker_chunks, waits, wait_ticks, max_wait_ticks, solo_periods, wakes,
        job_ticks, steals, stalls, solo_stalled, solo_absent, solo_why, solo_now, ticks_per_us, solo_ticks, since_ticks;
} dair_pool_stats;

/* this module's view of the process-wide pool (NULL: run serially) */
static const dair_pool_api *dair_pool = NULL;

static inline void dair_parallel_for(int nchunks, dair_task_fn fn, void *ctx) {
    if (dair_pool != NULL && nchunks > 1) {
        dair_pool->parallel(nchunks, fn, ctx);
    } else {
        for (int c = 0; c < nchunks; c++)
            fn(ctx, c);
    }
}

/* The next weights a worker should pull into the caches between jobs (see dair_pool_main). */
static inline void dair_pool_prefetch(const void *const *ptrs, const size_t *lens, int n) {
    if (dair_pool != NULL && n > 0)
        dair_pool->prefetch(ptrs, lens, n);
}

/* Threads to split a job for: kernels cut their work into this many times a few chunks. During a
 * solo period it is 1, so a job runs as one piece rather than as many chunks in a row. */
static inline int dair_pool_threads(void) { return dair_pool != NULL ? dair_pool->effective_threads() : 1; }

#ifdef DAIR_POOL_IMPL

#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getcpu, CPU_SET */
#endif

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#include <x86intrin.h>
#define DAIR_PAUSE() _mm_pause()
#define DAIR_TICKS() __rdtsc()
#define DAIR_PF_LINE(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define DAIR_PF_LINE(p) __builtin_prefetch((p), 0, 3)
#define DAIR_PAUSE() ((void)0)
static inline uint64_t dair_ns_ticks(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}
#define DAIR_TICKS() dair_ns_ticks()
#endif

#define DAIR_POOL_MAX 64

/* Claim counters and completion counters hold (generation << DAIR_IDX_BITS) | count, so a
 * value left from an earlier job is recognised as such and never needs resetting. */
#define DAIR_IDX_BITS 24
#define DAIR_IDX_MASK ((1ULL << DAIR_IDX_BITS) - 1)
#define DAIR_GEN_MASK ((1ULL << (64 - DAIR_IDX_BITS)) - 1)

/* Thread t's line: the claim counter of its range and the count of chunks it completed in the
 * current job. Together, because both are the owner's to write while a job runs and the caller
 * reads both at its end (one line to fetch from the other core instead of two). */
typedef struct {
    _Atomic uint64_t next;
    _Atomic uint64_t ran;
    char pad[64 - 2 * sizeof(uint64_t)];
} __attribute__((aligned(64))) dair_slot;

/* The job: written by the caller only, read by the workers. seq is odd while the fields are
 * being written; seq / 2 is the job's generation. */
static struct {
    _Atomic uint64_t seq;
    _Atomic(dair_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int nchunks;
    _Atomic int nthreads; /* threads the chunks are split over, caller included */
} __attribute__((aligned(64))) dair_job;

static dair_slot dair_slots[DAIR_POOL_MAX];

/* Background prefetch (dair_pool_prefetch): the caller's request, read by worker 1 alone under
 * the same odd/even seq scheme as the job. Why: a decode step's matrices stream from memory at
 * the two cores' bandwidth while a product runs, but between products (attention, norms, the
 * Python between kernel calls; a fifth of a step at 2 threads on a Zen 3) the memory idles and
 * the worker spins. Reading the next matrix then (it spills from the worker's L2 into the shared
 * L3) makes the next product's loads cache hits. A job arriving stops the reading at once. */
static struct {
    _Atomic uint64_t seq;
    _Atomic int n;
    _Atomic(const char *) p[DAIR_PF_RANGES];
    _Atomic size_t len[DAIR_PF_RANGES];
} __attribute__((aligned(64))) dair_pf;

static struct {
    _Atomic uint32_t futex_word;
    _Atomic int sleepers;
    _Atomic int parked; /* set by dair_pool_park: spinning workers sleep now; cleared by the next job */
    atomic_flag busy; /* one caller at a time; others run their loop serially */
    int threads;      /* wanted, including the caller */
    int running;      /* worker threads started */
    uint64_t gen;     /* of the last job published (the caller's; even seq = 2 * gen) */
    pthread_t tid[DAIR_POOL_MAX];
    uint64_t tpus;       /* ticks per microsecond (dair_pool_calibrate) */
    uint64_t solo_until; /* ticks: run jobs on the caller alone until then (see dair_pool_window_end) */
    uint64_t solo_start, solo_done; /* the current solo period's start; the length of those before */
    uint64_t first_tick;            /* the first parallel job's time */
    int backoff;         /* bad windows in a row: the next solo period is 2^backoff times the first */
    unsigned win_jobs, win_chunks, win_worker; /* the current window of parallel jobs: their chunks, */
    uint64_t win_ticks, win_stall;             /* those the workers ran, their time, waits' time */
    dair_pool_stats st;
} __attribute__((aligned(64))) dair_P = {.busy = ATOMIC_FLAG_INIT};

static pthread_mutex_t dair_pool_lock = PTHREAD_MUTEX_INITIALIZER;

static void dair_futex_wait(_Atomic uint32_t *addr, uint32_t val) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void dair_futex_wake_all(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
}

static inline int dair_range_lo(int r, int n, int T) { return (int)((long)r * n / T); }

/* Claim a chunk of range r of job `gen`; -1 if the range is used up or the job is over.
 *
 * A tag older than gen means nobody has claimed from this range in job gen yet: it starts at
 * the range's first chunk. A tag newer than gen means job gen is over (a job ends only after
 * every range was used up under its own tag), and so does a range used up under gen: a
 * thread that read the job late claims nothing of it. */
static inline int dair_claim(int r, uint64_t gen, int n, int T) {
    _Atomic uint64_t *p = &dair_slots[r].next;
    uint64_t c = atomic_load_explicit(p, memory_order_relaxed);
    const int hi = dair_range_lo(r + 1, n, T);
    for (;;) {
        uint64_t tag = c >> DAIR_IDX_BITS;
        int idx;
        if (tag == gen)
            idx = (int)(c & DAIR_IDX_MASK);
        else if (((gen - tag) & DAIR_GEN_MASK) < (DAIR_GEN_MASK >> 1))
            idx = dair_range_lo(r, n, T);
        else
            return -1;
        if (idx >= hi)
            return -1;
        if (atomic_compare_exchange_weak_explicit(p, &c, (gen << DAIR_IDX_BITS) | (uint64_t)(idx + 1),
                                                  memory_order_acquire, memory_order_relaxed))
            return idx;
    }
}

/* Thread `self` runs chunks of job gen: its own range first, then what is left of the others'.
 * Returns how many it ran; each completed chunk is published in dair_slots[self].ran. */
static int dair_run_job(int self, uint64_t gen, dair_task_fn fn, void *ctx, int n, int T, unsigned long long *steals) {
    int ran = 0;
    for (int k = 0; k < T; k++) {
        int r = (self + k) % T;
        int c;
        while ((c = dair_claim(r, gen, n, T)) >= 0) {
            fn(ctx, c);
            ran++;
            if (k && steals)
                (*steals)++;
            if (self)
                atomic_store_explicit(&dair_slots[self].ran, (gen << DAIR_IDX_BITS) | (uint64_t)ran,
                                      memory_order_release);
        }
    }
    return ran;
}

/* The current job, if one is open that this worker has not done yet: 1 and its fields. */
static inline int dair_read_job(uint64_t done_gen, uint64_t *gen, dair_task_fn *fn, void **ctx, int *n, int *T) {
    uint64_t s = atomic_load_explicit(&dair_job.seq, memory_order_acquire);
    if ((s & 1) || (s >> 1) == done_gen)
        return 0;
    *fn = atomic_load_explicit(&dair_job.fn, memory_order_relaxed);
    *ctx = atomic_load_explicit(&dair_job.ctx, memory_order_relaxed);
    *n = atomic_load_explicit(&dair_job.nchunks, memory_order_relaxed);
    *T = atomic_load_explicit(&dair_job.nthreads, memory_order_relaxed);
    atomic_thread_fence(memory_order_acquire);
    if (atomic_load_explicit(&dair_job.seq, memory_order_relaxed) != s)
        return 0;
    *gen = (s >> 1) & DAIR_GEN_MASK;
    return 1;
}

static inline int dair_job_waiting(uint64_t done_gen) {
    uint64_t s = atomic_load_explicit(&dair_job.seq, memory_order_acquire);
    return !(s & 1) && ((s >> 1) & DAIR_GEN_MASK) != done_gen;
}

/* Spin this long for the next job before sleeping: kernel calls of one decode step come a few
 * microseconds apart, and the Python between two steps (sampling, the next token's embedding)
 * takes 20-50 us; a stage waiting for its next message parks its workers (dair_pool_park). Every
 * DAIR_YIELD_US of spinning the worker yields: on an idle core sched_yield returns at once, on a
 * busy one the other work runs instead of a poll loop (and the scheduler's share of this process
 * is not spent on polling while its caller waits for a CPU). Yielding after every few polls (the
 * first version) lost the core for a time slice each time another process was runnable; never
 * yielding cost one-thread speed under load (measured: 2 threads at 0.73-0.86x of 1 with 3-4
 * other busy processes, 0.89-1.02x with an 8 us yield, and the same speed when idle). */
#ifndef DAIR_SPIN_US
#define DAIR_SPIN_US 200
#endif
#ifndef DAIR_YIELD_US
#define DAIR_YIELD_US 8
#endif

/* A new thread starts on its creator's CPU and, since it mostly polls, the scheduler can
 * leave it there for tens of milliseconds: it then only runs when the caller is preempted,
 * and takes no part in jobs (measured: 0 of 32000 chunks). Step off the creator's CPU
 * once, then give back the full mask so the scheduler is free to move it later. */
static void dair_pool_leave_cpu(int cpu) {
    cpu_set_t all, other;
    if (cpu < 0 || sched_getaffinity(0, sizeof(all), &all) != 0 || CPU_COUNT(&all) < 2 || !CPU_ISSET(cpu, &all))
        return;
    other = all;
    CPU_CLR(cpu, &other);
    if (sched_setaffinity(0, sizeof(other), &other) == 0)
        sched_setaffinity(0, sizeof(all), &all);
}

/* Worker-side state of the background prefetch: the ranges being read and how far. */
typedef struct {
    uint64_t seen;
    int n, i;
    size_t off;
    const char *p[DAIR_PF_RANGES];
    size_t len[DAIR_PF_RANGES];
} dair_pf_cursor;

/* A new request, if one was posted since c->seen: read it into c. */
static inline void dair_pf_poll(dair_pf_cursor *c) {
    const uint64_t s = atomic_load_explicit(&dair_pf.seq, memory_order_acquire);
    if ((s & 1) || s == c->seen)
        return;
    int n = atomic_load_explicit(&dair_pf.n, memory_order_relaxed);
    n = n < 0 ? 0 : n > DAIR_PF_RANGES ? DAIR_PF_RANGES : n;
    for (int i = 0; i < n; i++) {
        c->p[i] = atomic_load_explicit(&dair_pf.p[i], memory_order_relaxed);
        c->len[i] = atomic_load_explicit(&dair_pf.len[i], memory_order_relaxed);
    }
    atomic_thread_fence(memory_order_acquire);
    if (atomic_load_explicit(&dair_pf.seq, memory_order_relaxed) != s)
        return; /* rewritten meanwhile: the next poll reads it */
    c->seen = s;
    c->n = n;
    c->i = 0;
    c->off = 0;
}

/* Read the next 1 KiB of the request; 0 when there is nothing left to read. Prefetch hints, not
 * loads: a hint never faults, so a range the streaming mode has released is not read back from
 * disk, and a matrix freed after it was named (its pages unmapped) costs nothing. Loads measured
 * no better (0.998x the step time against 0.96-0.98x for hints, Zen 3, 2 threads). */
static inline int dair_pf_step(dair_pf_cursor *c) {
    while (c->i < c->n && c->off >= c->len[c->i]) {
        c->i++;
        c->off = 0;
    }
    if (c->i >= c->n)
        return 0;
    const char *p = c->p[c->i] + c->off;
    size_t m = c->len[c->i] - c->off;
    m = m < 1024 ? m : 1024;
    for (size_t o = 0; o < m; o += 64)
        DAIR_PF_LINE(p + o);
    c->off += m;
    return 1;
}

static void dair_pool_prefetch_impl(const void *const *ptrs, const size_t *lens, int n) {
    /* busy: one caller at a time (and none while a job runs, which would not see it anyway) */
    if (dair_P.threads <= 1 || dair_P.running < 1 || n <= 0 || atomic_flag_test_and_set(&dair_P.busy))
        return;
    n = n > DAIR_PF_RANGES ? DAIR_PF_RANGES : n;
    const uint64_t s = atomic_load_explicit(&dair_pf.seq, memory_order_relaxed);
    atomic_store_explicit(&dair_pf.seq, s + 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    for (int i = 0; i < n; i++) {
        atomic_store_explicit(&dair_pf.p[i], (const char *)ptrs[i], memory_order_relaxed);
        atomic_store_explicit(&dair_pf.len[i], lens[i], memory_order_relaxed);
    }
    atomic_store_explicit(&dair_pf.n, n, memory_order_relaxed);
    atomic_store_explicit(&dair_pf.seq, s + 2, memory_order_release);
    atomic_flag_clear(&dair_P.busy);
}

static void *dair_pool_main(void *arg) {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the Python main thread's business */
    const intptr_t a = (intptr_t)arg;
    const int self = (int)(a >> 16);
    dair_pool_leave_cpu((int)(a & 0xffff) - 1);
    uint64_t done_gen = (atomic_load(&dair_job.seq) >> 1) & DAIR_GEN_MASK; /* jobs before this thread: not ours */
    dair_pf_cursor pf;
    memset(&pf, 0, sizeof(pf));
    pf.seen = atomic_load(&dair_pf.seq);
    for (;;) {
        uint64_t gen;
        dair_task_fn fn;
        void *ctx;
        int n, T;
        if (dair_read_job(done_gen, &gen, &fn, &ctx, &n, &T)) {
            if (self < T)
                dair_run_job(self, gen, fn, ctx, n, T, NULL);
            done_gen = gen;
            continue;
        }
        const uint64_t t0 = DAIR_TICKS(), spin = (uint64_t)DAIR_SPIN_US * dair_P.tpus;
        const uint64_t yield = (uint64_t)DAIR_YIELD_US * dair_P.tpus;
        uint64_t ty = t0, now;
        while (!dair_job_waiting(done_gen) && (now = DAIR_TICKS()) - t0 < spin &&
               !atomic_load_explicit(&dair_P.parked, memory_order_relaxed)) {
            if (self == 1) {
                dair_pf_poll(&pf);
                if (dair_pf_step(&pf))
                    continue;
            }
            DAIR_PAUSE();
            if (now - ty > yield) {
                sched_yield();
                ty = now;
            }
        }
        if (dair_job_waiting(done_gen))
            continue;
        atomic_fetch_add(&dair_P.sleepers, 1); /* seq_cst: pairs with the caller's seq store */
        uint32_t w = atomic_load(&dair_P.futex_word);
        if (!dair_job_waiting(done_gen))
            dair_futex_wait(&dair_P.futex_word, w);
        atomic_fetch_sub(&dair_P.sleepers, 1);
    }
    return NULL; /* not reached: workers live as long as the process */
}

/* A forked child has none of the parent's workers: forget them (jobs would still finish,
 * run by the caller alone, but a later resize would join threads that do not exist). */
static void dair_pool_atfork_child(void) {
    dair_P.running = 0;
    atomic_store(&dair_P.sleepers, 0);
    atomic_flag_clear(&dair_P.busy);
    pthread_mutex_init(&dair_pool_lock, NULL);
}

/* Ticks per microsecond of DAIR_TICKS, measured once against the monotonic clock. */
static void dair_pool_calibrate(void) {
#if defined(__x86_64__)
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    uint64_t t0 = __rdtsc(), ns;
    do {
        clock_gettime(CLOCK_MONOTONIC, &b);
        ns = (uint64_t)(b.tv_sec - a.tv_sec) * 1000000000ULL + (uint64_t)(b.tv_nsec - a.tv_nsec);
    } while (ns < 200000);
    uint64_t t = (__rdtsc() - t0) * 1000 / ns;
    dair_P.tpus = t > 0 ? t : 1;
#else
    dair_P.tpus = 1000; /* DAIR_TICKS counts nanoseconds */
#endif
}

static void dair_pool_ensure_started(void) {
    static int atfork_done = 0;
    int want = dair_P.threads - 1;
    if (dair_P.running >= want)
        return;
    pthread_mutex_lock(&dair_pool_lock);
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, dair_pool_atfork_child);
        dair_pool_calibrate();
        atfork_done = 1;
    }
    if (dair_P.running < want) {
        for (int i = dair_P.running; i < want; i++) {
            intptr_t arg = ((intptr_t)(i + 1) << 16) | (intptr_t)((sched_getcpu() + 1) & 0xffff);
            if (pthread_create(&dair_P.tid[i], NULL, dair_pool_main, (void *)arg) != 0)
                break; /* fewer helpers: still correct, the caller runs what they do not */
            dair_P.running = i + 1;
        }
        if (dair_P.running < want) /* remember what we got, so we do not retry every call */
            dair_P.threads = dair_P.running + 1;
    }
    pthread_mutex_unlock(&dair_pool_lock);
}

/* When to run jobs on the caller alone. A worker preempted in the middle of a chunk makes the
 * caller wait for it, for a scheduler time slice or more when the machine is oversubscribed
 * (a stall: a wait over DAIR_STALL_US); a worker that hardly takes part (the other cores busy
 * with other work) makes every job pay for its publication and wake-up for nothing. Both are
 * measured over windows of DAIR_WIN_JOBS parallel jobs: a window where the caller spent more than
 * 1/DAIR_WIN_STALLED of its time waiting for workers (about what a second thread saves in a
 * decode step), or whose workers ran less than 1/DAIR_WIN_ABSENT of its chunks, starts a solo
 * period, where the caller runs every job alone and the workers sleep. A solo period lasts
 * DAIR_SOLO_US times 2^backoff; backoff grows by one with each bad window (up to
 * DAIR_SOLO_MAX_DOUBLING) and shrinks by one with each good one, so a busy machine spends ever
 * less time trying, a machine that turns idle is used again within a second or two, and a single
 * short stall on an otherwise idle machine (another process running for a moment) is only a
 * small part of its window. */
#ifndef DAIR_STALL_US
#define DAIR_STALL_US 100
#endif
#ifndef DAIR_WIN_JOBS
#define DAIR_WIN_JOBS 256
#endif
#ifndef DAIR_WIN_STALLED
#define DAIR_WIN_STALLED 4
#endif
#ifndef DAIR_WIN_ABSENT
#define DAIR_WIN_ABSENT 8
#endif
#ifndef DAIR_SOLO_US
#define DAIR_SOLO_US 20000
#endif
#ifndef DAIR_SOLO_MAX_DOUBLING
#define DAIR_SOLO_MAX_DOUBLING 6
#endif

static uint64_t dair_now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ULL + (uint64_t)t.tv_nsec;
}

static void dair_pool_window_end(uint64_t now) {
    int stalled = dair_P.win_stall * DAIR_WIN_STALLED > dair_P.win_ticks;
    int absent = dair_P.win_worker * DAIR_WIN_ABSENT < dair_P.win_chunks;
    dair_P.st.solo_stalled += stalled;
    dair_P.st.solo_absent += absent && !stalled;
    if (stalled || absent)
        dair_P.st.solo_why = stalled ? 1 : 2;
    if (stalled || absent) {
        if (dair_P.solo_start) /* the previous period is over: a window ends only in a parallel job */
            dair_P.solo_done += dair_P.solo_until - dair_P.solo_start;
        dair_P.solo_start = now;
        dair_P.solo_until = now + (((uint64_t)DAIR_SOLO_US * dair_P.tpus) << dair_P.backoff);
        dair_P.st.solo_periods++;
        if (dair_P.backoff < DAIR_SOLO_MAX_DOUBLING)
            dair_P.backoff++;
    } else if (dair_P.backoff > 0) {
        dair_P.backoff--; /* one good window does not prove the machine idle again */
    }
    dair_P.win_jobs = dair_P.win_chunks = dair_P.win_worker = 0;
    dair_P.win_ticks = dair_P.win_stall = 0;
}

static inline int dair_pool_ran_by_workers(uint64_t gen, int T) {
    int theirs = 0;
    for (int t = 1; t < T; t++) {
        uint64_t v = atomic_load_explicit(&dair_slots[t].ran, memory_order_acquire);
        theirs += (v >> DAIR_IDX_BITS) == gen ? (int)(v & DAIR_IDX_MASK) : 0;
    }
    return theirs;
}

static void dair_pool_parallel(int nchunks, dair_task_fn fn, void *ctx) {
    if (nchunks <= 1 || dair_P.threads <= 1 || (uint64_t)nchunks > DAIR_IDX_MASK ||
        atomic_flag_test_and_set(&dair_P.busy)) {
        for (int c = 0; c < nchunks; c++)
            fn(ctx, c);
        return;
    }
    dair_P.st.jobs++;
    dair_P.st.chunks += nchunks;
    if (dair_P.solo_until && DAIR_TICKS() < dair_P.solo_until) {
        dair_P.st.serial_jobs++;
        for (int c = 0; c < nchunks; c++)
            fn(ctx, c);
        atomic_flag_clear(&dair_P.busy);
        return;
    }
    dair_pool_ensure_started();
    if (dair_P.first_tick == 0)
        dair_P.first_tick = DAIR_TICKS();
    const int T = dair_P.threads < nchunks ? dair_P.threads : nchunks;
    const uint64_t gen = (dair_P.gen + 1) & DAIR_GEN_MASK;
    dair_P.gen = gen;
    /* The job's fields between two stores of seq (odd, then even): a worker that reads seq the
     * same before and after them has read this job's fields. */
    atomic_store_explicit(&dair_job.seq, 2 * gen - 1, memory_order_relaxed);
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&dair_job.fn, fn, memory_order_relaxed);
    atomic_store_explicit(&dair_job.ctx, ctx, memory_order_relaxed);
    atomic_store_explicit(&dair_job.nchunks, nchunks, memory_order_relaxed);
    atomic_store_explicit(&dair_job.nthreads, T, memory_order_relaxed);
    atomic_store_explicit(&dair_P.parked, 0, memory_order_relaxed);
    atomic_store(&dair_job.seq, 2 * gen); /* seq_cst: pairs with a worker's sleepers increment */
    const uint64_t tj = DAIR_TICKS();
    if (atomic_load(&dair_P.sleepers) > 0) {
        dair_P.st.wakes++;
        atomic_fetch_add(&dair_P.futex_word, 1);
        dair_futex_wake_all(&dair_P.futex_word);
    }
    const int mine = dair_run_job(0, gen, fn, ctx, nchunks, T, &dair_P.st.steals);
    /* Every range is used up: the chunks not run here were claimed by workers, which publish
     * each one they complete. Wait for those (short, unless a worker was preempted). */
    if (mine + dair_pool_ran_by_workers(gen, T) < nchunks) {
        uint64_t t0 = DAIR_TICKS();
        unsigned spins = 0;
        do {
            DAIR_PAUSE();
            if (++spins % 4096 == 0)
                sched_yield();
        } while (mine + dair_pool_ran_by_workers(gen, T) < nchunks);
        uint64_t dt = DAIR_TICKS() - t0;
        dair_P.st.waits++;
        dair_P.st.wait_ticks += dt;
        if (dt > dair_P.st.max_wait_ticks)
            dair_P.st.max_wait_ticks = dt;
        dair_P.win_stall += dt;
        if (dt > (uint64_t)DAIR_STALL_US * dair_P.tpus)
            dair_P.st.stalls++;
    }
    dair_P.st.worker_chunks += nchunks - mine;
    const uint64_t now = DAIR_TICKS();
    dair_P.st.job_ticks += now - tj;
    dair_P.win_ticks += now - tj;
    /* Small jobs do not count for participation: a caller may finish two short chunks before an
     * awake worker has even seen the job. */
    if (nchunks >= 4) {
        dair_P.win_chunks += nchunks;
        dair_P.win_worker += nchunks - mine;
    }
    if (++dair_P.win_jobs >= DAIR_WIN_JOBS)
        dair_pool_window_end(now);
    atomic_flag_clear(&dair_P.busy);
}

static int dair_pool_get_threads(void) { return dair_P.threads < 1 ? 1 : dair_P.threads; }

static void dair_pool_set_threads(int n) {
    if (n < 1)
        n = 1;
    if (n > DAIR_POOL_MAX)
        n = DAIR_POOL_MAX;
    /* Wait out a running job; callers change the count between kernel calls. */
    while (atomic_flag_test_and_set(&dair_P.busy))
        sched_yield();
    /* Workers beyond the new count stay, asleep: jobs name the threads they are split over, and
     * switching back and forth (a measurement of both counts) then costs no thread start. */
    dair_P.threads = n;
    if (dair_P.solo_start) {
        uint64_t now = DAIR_TICKS();
        dair_P.solo_done += (now < dair_P.solo_until ? now : dair_P.solo_until) - dair_P.solo_start;
        dair_P.solo_start = 0;
    }
    dair_P.solo_until = 0;
    dair_P.backoff = 0;
    dair_P.win_jobs = dair_P.win_chunks = dair_P.win_worker = 0;
    dair_P.win_ticks = dair_P.win_stall = 0;
    atomic_flag_clear(&dair_P.busy);
}

/* The caller is going idle (a stage waiting for its next message): workers stop spinning and
 * sleep until the next job, instead of holding a core that the next stage or the bus needs. */
static void dair_pool_park(void) { atomic_store_explicit(&dair_P.parked, 1, memory_order_relaxed); }

/* Work is coming (a stage has just received a message): wake sleeping workers now, so that the
 * scheduler has them running by the first job instead of a wake-up latency into it. */
static int dair_pool_effective_threads(void);

static void dair_pool_wake(void) {
    if (dair_pool_effective_threads() <= 1)
        return; /* solo: no job will be split, a woken worker would only spin */
    atomic_store(&dair_P.parked, 0);
    if (atomic_load(&dair_P.sleepers) > 0) {
        atomic_fetch_add(&dair_P.futex_word, 1);
        dair_futex_wake_all(&dair_P.futex_word);
    }
}

static dair_pool_stats dair_pool_get_stats(void) {
    dair_pool_stats st = dair_P.st;
    const uint64_t now = DAIR_TICKS();
    st.solo_now = dair_P.solo_until && now < dair_P.solo_until;
    st.solo_ticks = dair_P.solo_done +
                    (dair_P.solo_start ? (now < dair_P.solo_until ? now : dair_P.solo_until) - dair_P.solo_start : 0);
    st.since_ticks = dair_P.first_tick ? now - dair_P.first_tick : 0;
    st.ticks_per_us = dair_P.tpus;
    return st;
}

static int dair_pool_effective_threads(void) {
    if (dair_P.threads <= 1 || (dair_P.solo_until && DAIR_TICKS() < dair_P.solo_until))
        return 1;
    return dair_P.threads;
}

static const dair_pool_api dair_pool_impl = {dair_pool_parallel, dair_pool_get_threads, dair_pool_set_threads,
                                             dair_pool_effective_threads, dair_pool_prefetch_impl};

#endif /* DAIR_POOL_IMPL */
#endif
