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
} dair_pool_api;

typedef struct {
    unsigned long long jobs, serial_jobs, chunks, worker_chunks, waits, wait_ticks, max_wait_ticks, solo_periods, wakes,
        job_ticks;
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

static inline int dair_pool_threads(void) { return dair_pool != NULL ? dair_pool->get_threads() : 1; }

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
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#include <x86intrin.h>
#define DAIR_PAUSE() _mm_pause()
#else
#define DAIR_PAUSE() ((void)0)
#endif

#define DAIR_POOL_MAX 256

/* state = generation << 32 | next chunk. An odd generation means "job being
 * written, nothing to claim"; a worker reads the job fields and then claims a
 * chunk with a CAS on the state it read, so a successful claim proves the
 * fields it read belong to that generation. */
static struct {
    _Atomic uint64_t state;
    _Atomic int done;
    _Atomic(dair_task_fn) fn;
    _Atomic(void *) ctx;
    _Atomic int nchunks;
    _Atomic uint32_t futex_word;
    _Atomic int sleepers;
    _Atomic int quit;
    atomic_flag busy; /* one caller at a time; others run their loop serially */
    int threads;      /* wanted, including the caller */
    int running;      /* worker threads started */
    pthread_t tid[DAIR_POOL_MAX];
    uint64_t solo_until; /* TSC: run jobs on the caller alone until then (see dair_pool_parallel) */
    unsigned win_jobs, win_chunks, win_worker; /* participation over the current window of jobs */
    dair_pool_stats st;
} dair_P = {.busy = ATOMIC_FLAG_INIT};

static pthread_mutex_t dair_pool_lock = PTHREAD_MUTEX_INITIALIZER;

static void dair_futex_wait(_Atomic uint32_t *addr, uint32_t val) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAIT_PRIVATE, val, NULL, NULL, 0);
}

static void dair_futex_wake_all(_Atomic uint32_t *addr) {
    syscall(SYS_futex, (uint32_t *)addr, FUTEX_WAKE_PRIVATE, 0x7fffffff, NULL, NULL, 0);
}

/* Claim and run chunks of the current job; returns how many ran. */
static int dair_pool_work(void) {
    int ran = 0;
    for (;;) {
        uint64_t s = atomic_load_explicit(&dair_P.state, memory_order_acquire);
        if ((s >> 32) & 1)
            return ran;
        dair_task_fn fn = atomic_load_explicit(&dair_P.fn, memory_order_relaxed);
        void *ctx = atomic_load_explicit(&dair_P.ctx, memory_order_relaxed);
        int n = atomic_load_explicit(&dair_P.nchunks, memory_order_relaxed);
        uint32_t c = (uint32_t)s;
        if ((int)c >= n)
            return ran;
        if (!atomic_compare_exchange_weak_explicit(&dair_P.state, &s, s + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        fn(ctx, (int)c);
        atomic_fetch_add_explicit(&dair_P.done, 1, memory_order_release);
        ran++;
    }
}

static int dair_pool_has_work(void) {
    uint64_t s = atomic_load_explicit(&dair_P.state, memory_order_acquire);
    return !((s >> 32) & 1) && (int)(uint32_t)s < atomic_load_explicit(&dair_P.nchunks, memory_order_relaxed);
}

/* Spin this many TSC ticks (~30-50 us) for the next job before sleeping: kernel calls of
 * one decode step come a few microseconds apart. */
#define DAIR_SPIN_TICKS 100000ULL
#ifndef DAIR_YIELD_POLLS
#define DAIR_YIELD_POLLS 16
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

static void *dair_pool_main(void *arg) {
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the Python main thread's business */
    dair_pool_leave_cpu((int)(intptr_t)arg);
    for (;;) {
        if (atomic_load_explicit(&dair_P.quit, memory_order_acquire))
            return NULL;
        if (dair_pool_work())
            continue;
#if defined(__x86_64__)
        /* Poll for the next job, yielding the core between polls: on an idle machine
         * sched_yield returns at once, on a loaded one this thread does not take CPU
         * time from the caller or anyone else while it waits. */
        uint64_t t0 = __rdtsc();
        unsigned polls = 0;
        while (!dair_pool_has_work() && !atomic_load_explicit(&dair_P.quit, memory_order_relaxed) &&
               __rdtsc() - t0 < DAIR_SPIN_TICKS) {
            DAIR_PAUSE();
            if (++polls % DAIR_YIELD_POLLS == 0)
                sched_yield();
        }
#endif
        if (dair_pool_has_work())
            continue;
        atomic_fetch_add(&dair_P.sleepers, 1); /* seq_cst: pairs with the caller's state store */
        uint32_t w = atomic_load(&dair_P.futex_word);
        if (!dair_pool_has_work() && !atomic_load(&dair_P.quit))
            dair_futex_wait(&dair_P.futex_word, w);
        atomic_fetch_sub(&dair_P.sleepers, 1);
    }
}

static void dair_pool_stop(void) {
    atomic_store(&dair_P.quit, 1);
    atomic_fetch_add(&dair_P.futex_word, 1);
    dair_futex_wake_all(&dair_P.futex_word);
    for (int i = 0; i < dair_P.running; i++)
        pthread_join(dair_P.tid[i], NULL);
    dair_P.running = 0;
    atomic_store(&dair_P.quit, 0);
}

/* A forked child has none of the parent's workers: forget them (jobs would still finish,
 * run by the caller alone, but a later resize would join threads that do not exist). */
static void dair_pool_atfork_child(void) {
    dair_P.running = 0;
    atomic_store(&dair_P.sleepers, 0);
    atomic_flag_clear(&dair_P.busy);
    pthread_mutex_init(&dair_pool_lock, NULL);
}

static void dair_pool_ensure_started(void) {
    static int atfork_done = 0;
    int want = dair_P.threads - 1;
    if (dair_P.running == want)
        return;
    pthread_mutex_lock(&dair_pool_lock);
    if (!atfork_done) {
        pthread_atfork(NULL, NULL, dair_pool_atfork_child);
        atfork_done = 1;
    }
    if (dair_P.running != want) {
        if (dair_P.running)
            dair_pool_stop();
        for (int i = 0; i < want; i++) {
            if (pthread_create(&dair_P.tid[i], NULL, dair_pool_main, (void *)(intptr_t)sched_getcpu()) != 0)
                break; /* fewer helpers: still correct, the caller runs what they do not */
            dair_P.running = i + 1;
        }
        if (dair_P.running != want) /* remember what we got, so we do not retry every call */
            dair_P.threads = dair_P.running + 1;
    }
    pthread_mutex_unlock(&dair_pool_lock);
}

/* A worker that was preempted in the middle of a chunk makes the caller wait for it, for
 * a scheduler time slice or more when the machine is oversubscribed. After such a wait the
 * caller runs jobs alone for a while (DAIR_SOLO_TICKS), so a loaded machine degrades to
 * one-thread speed instead of stalling on every other job. */
#define DAIR_STALL_TICKS 300000ULL   /* ~100 us */
#define DAIR_SOLO_TICKS 150000000ULL /* ~50 ms */
/* The same when workers hardly take part: over a window of DAIR_WIN_JOBS jobs they ran
 * less than 1/DAIR_WIN_SHARE of the chunks, i.e. the machine's other cores are busy with
 * other work and splitting jobs only costs (measured: 2 threads 20% slower than 1 then). */
#define DAIR_WIN_JOBS 256
#define DAIR_WIN_SHARE 8

static void dair_pool_parallel(int nchunks, dair_task_fn fn, void *ctx) {
    if (nchunks <= 1 || dair_P.threads <= 1 || atomic_flag_test_and_set(&dair_P.busy)) {
        for (int c = 0; c < nchunks; c++)
            fn(ctx, c);
        return;
    }
    dair_P.st.jobs++;
    dair_P.st.chunks += nchunks;
#if defined(__x86_64__)
    if (dair_P.solo_until && __rdtsc() < dair_P.solo_until) {
        dair_P.st.serial_jobs++;
        for (int c = 0; c < nchunks; c++)
            fn(ctx, c);
        atomic_flag_clear(&dair_P.busy);
        return;
    }
#endif
    dair_pool_ensure_started();
    uint64_t gen = atomic_load(&dair_P.state) >> 32; /* even: only this caller changes it */
    atomic_store(&dair_P.state, (gen + 1) << 32);    /* odd: closed while the job is written */
    atomic_store(&dair_P.fn, fn);
    atomic_store(&dair_P.ctx, ctx);
    atomic_store(&dair_P.nchunks, nchunks);
    atomic_store(&dair_P.done, 0);
    atomic_store(&dair_P.state, (gen + 2) << 32); /* open, chunk 0 */
#if defined(__x86_64__)
    uint64_t tj = __rdtsc();
#endif
    if (atomic_load(&dair_P.sleepers) > 0) {
        dair_P.st.wakes++;
        atomic_fetch_add(&dair_P.futex_word, 1);
        dair_futex_wake_all(&dair_P.futex_word);
    }
    /* The caller claims with fetch_add: it alone changes the generation. */
    int mine = 0;
    for (;;) {
        uint64_t s = atomic_fetch_add_explicit(&dair_P.state, 1, memory_order_acq_rel);
        int c = (int)(uint32_t)s;
        if (c >= nchunks)
            break;
        fn(ctx, c);
        mine++;
        atomic_fetch_add_explicit(&dair_P.done, 1, memory_order_release);
    }
    dair_P.st.worker_chunks += nchunks - mine;
    /* Small jobs do not count: a caller may finish two short chunks before an awake worker
     * has even seen the job. */
    if (nchunks >= 4) {
        dair_P.win_jobs++;
        dair_P.win_chunks += nchunks;
        dair_P.win_worker += nchunks - mine;
    }
    if (dair_P.win_jobs >= DAIR_WIN_JOBS) {
#if defined(__x86_64__)
        if (dair_P.win_worker * DAIR_WIN_SHARE < dair_P.win_chunks) {
            dair_P.solo_until = __rdtsc() + DAIR_SOLO_TICKS;
            dair_P.st.solo_periods++;
        }
#endif
        dair_P.win_jobs = dair_P.win_chunks = dair_P.win_worker = 0;
    }
    /* Only chunks a worker claimed are outstanding now; they are short unless it was preempted. */
    if (atomic_load_explicit(&dair_P.done, memory_order_acquire) < nchunks) {
#if defined(__x86_64__)
        uint64_t t0 = __rdtsc();
#endif
        unsigned spins = 0;
        while (atomic_load_explicit(&dair_P.done, memory_order_acquire) < nchunks) {
            DAIR_PAUSE();
            if (++spins % 4096 == 0)
                sched_yield();
        }
#if defined(__x86_64__)
        uint64_t t1 = __rdtsc(), dt = t1 - t0;
        dair_P.st.waits++;
        dair_P.st.wait_ticks += dt;
        if (dt > dair_P.st.max_wait_ticks)
            dair_P.st.max_wait_ticks = dt;
        if (dt > DAIR_STALL_TICKS) {
            dair_P.solo_until = t1 + DAIR_SOLO_TICKS;
            dair_P.st.solo_periods++;
        }
#endif
    }
#if defined(__x86_64__)
    dair_P.st.job_ticks += __rdtsc() - tj;
#endif
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
    pthread_mutex_lock(&dair_pool_lock);
    if (dair_P.running > n - 1)
        dair_pool_stop();
    dair_P.threads = n;
    pthread_mutex_unlock(&dair_pool_lock);
    atomic_flag_clear(&dair_P.busy);
}

static dair_pool_stats dair_pool_get_stats(void) { return dair_P.st; }

static const dair_pool_api dair_pool_impl = {dair_pool_parallel, dair_pool_get_threads, dair_pool_set_threads};

#endif /* DAIR_POOL_IMPL */
#endif
