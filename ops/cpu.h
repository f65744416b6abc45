/* Kernel families and the CPU they need: one build carries every family this compiler can
 * emit; which one runs is decided at run time (cpuid), so an AVX-512 machine also runs and
 * tests the AVX2 code and an AVX2-only machine never reaches the AVX-512 code.
 *
 * The matmul module is compiled for the build machine without AVX-512 (setup.py adds
 * -mno-avx512f), so the plain-C and AVX2 code holds no AVX-512 instruction even when the
 * compiler vectorizes it; AVX-512 code sits between DAIR_AVX512_BEGIN and DAIR_AVX512_END.
 * Other modules may be compiled with AVX-512 enabled: the regions are harmless there.
 */
#ifndef DAIR_CPU_H
#define DAIR_CPU_H

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DAIR_HAVE_AVX2 1
#include <immintrin.h>
#endif
#if defined(__aarch64__) && defined(__ARM_NEON)
#define DAIR_HAVE_NEON 1 /* ops/neon_quants.h */
#endif

/* AVX-512 code is built wherever AVX2 code is and the compiler takes per-function targets. */
#if defined(DAIR_HAVE_AVX2) && defined(__x86_64__) && (defined(__clang__) || __GNUC__ >= 8)
#define DAIR_BUILD_AVX512 1
#if defined(__clang__)
#define DAIR_AVX512_BEGIN                                                                                         \
    _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512vl,avx512vnni,avx512dq\"))), " \
            "apply_to = function)")
#define DAIR_AVX512_END _Pragma("clang attribute pop")
#else
#define DAIR_AVX512_BEGIN                                                                                         \
    _Pragma("GCC push_options") _Pragma("GCC target(\"avx512f,avx512bw,avx512vl,avx512vnni,avx512dq,avx512cd\")")
#define DAIR_AVX512_END _Pragma("GCC pop_options")
#endif
#endif

#define DAIR_INLINE static inline __attribute__((always_inline))

/* On ARM, NEON takes AVX2's slot (a build holds one or the other; slot 2 stays empty there). */
enum { DAIR_FAM_SCALAR = 0, DAIR_FAM_AVX2 = 1, DAIR_FAM_AVX512 = 2, DAIR_FAM_NEON = 1 };

#if defined(DAIR_HAVE_NEON)
static const char *const dair_family_names[3] __attribute__((unused)) = {"scalar", "neon", "avx512"};
#else
static const char *const dair_family_names[3] __attribute__((unused)) = {"scalar", "avx2", "avx512"};
#endif

/* The best family this build can run on this CPU. */
static int dair_cpu_family(void) {
#if defined(DAIR_HAVE_AVX2)
    __builtin_cpu_init();
#if defined(DAIR_BUILD_AVX512)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512dq"))
        return DAIR_FAM_AVX512;
#endif
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return DAIR_FAM_AVX2;
#elif defined(DAIR_HAVE_NEON)
    return DAIR_FAM_NEON; /* every aarch64 core has NEON */
#endif
    return DAIR_FAM_SCALAR;
}

/* The family in use (set_kernels); each module has its own copy, matmul is the one that counts.
 * dair_simd_enabled / dair_use_avx512 are the two tests the kernels make. */
#if defined(DAIR_HAVE_AVX2) || defined(DAIR_HAVE_NEON)
static int dair_simd_enabled __attribute__((unused)) = 1;
#else
static int dair_simd_enabled __attribute__((unused)) = 0;
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
static int dair_use_avx512 __attribute__((unused)) = 1; /* a module built for AVX-512 runs only there */
#else
static int dair_use_avx512 __attribute__((unused)) = 0;
#endif

static void dair_set_family(int fam) {
    dair_simd_enabled = fam >= DAIR_FAM_AVX2;
    dair_use_avx512 = fam >= DAIR_FAM_AVX512;
}

#endif
