/* Which kernel runs for a (type, family): the one dispatch table of the 8-bit products of the
 * types in quants_ref.h, and the loop that runs a row range with it.
 *
 * dair_vdot_table[type][family] is the kernel, or NULL where that family has none for the type;
 * dair_kernel_family(type, family) is the family that then actually runs (the best one at or
 * below the selected family that has a kernel). */
#ifndef DAIR_QUANTS_H
#define DAIR_QUANTS_H

#include "act.h"
#include "blocks.h"
#include "cpu.h"
#include "quants_avx2.h"
#include "quants_avx512.h"
#include "quants_ref.h"

#if defined(DAIR_HAVE_AVX2)
#define DAIR_K2(f) f
#else
#define DAIR_K2(f) NULL
#endif
#if defined(DAIR_BUILD_AVX512)
#define DAIR_K5(f) f
#else
#define DAIR_K5(f) NULL
#endif

static const dair_vdot_fn dair_vdot_table[DAIR_NTYPES][3] = {
    [DAIR_Q5_0] = {dair_vec_dot_q5_0_ref, DAIR_K2(dair_vec_dot_q5_0_avx2), DAIR_K5(dair_vec_dot_q5_0_avx512)},
    [DAIR_Q5_1] = {dair_vec_dot_q5_1_ref, DAIR_K2(dair_vec_dot_q5_1_avx2), DAIR_K5(dair_vec_dot_q5_1_avx512)},
    [DAIR_IQ4_NL] = {dair_vec_dot_iq4_nl_ref, DAIR_K2(dair_vec_dot_iq4_nl_avx2), DAIR_K5(dair_vec_dot_iq4_nl_avx512)},
    [DAIR_Q2_K] = {dair_vec_dot_q2_k_ref, DAIR_K2(dair_vec_dot_q2_k_avx2), DAIR_K5(dair_vec_dot_q2_k_avx512)},
    [DAIR_Q3_K] = {dair_vec_dot_q3_k_ref, DAIR_K2(dair_vec_dot_q3_k_avx2), DAIR_K5(dair_vec_dot_q3_k_avx512)},
    [DAIR_Q5_K] = {dair_vec_dot_q5_k_ref, DAIR_K2(dair_vec_dot_q5_k_avx2), DAIR_K5(dair_vec_dot_q5_k_avx512)},
    [DAIR_IQ4_XS] = {dair_vec_dot_iq4_xs_ref, DAIR_K2(dair_vec_dot_iq4_xs_avx2), DAIR_K5(dair_vec_dot_iq4_xs_avx512)},
};

/* Four-row kernels where a family has one (NULL: four calls of the one-row kernel). */
static const dair_vdot4_fn dair_vdot4_table[DAIR_NTYPES][3] = {
    [DAIR_Q5_0] = {NULL, DAIR_K2(dair_vec_dot4_q5_0_avx2), DAIR_K5(dair_vec_dot4_q5_0_avx512)},
    [DAIR_Q5_1] = {NULL, DAIR_K2(dair_vec_dot4_q5_1_avx2), DAIR_K5(dair_vec_dot4_q5_1_avx512)},
    [DAIR_IQ4_NL] = {NULL, DAIR_K2(dair_vec_dot4_iq4_nl_avx2), DAIR_K5(dair_vec_dot4_iq4_nl_avx512)},
    [DAIR_IQ4_XS] = {NULL, DAIR_K2(dair_vec_dot4_iq4_xs_avx2), DAIR_K5(dair_vec_dot4_iq4_xs_avx512)},
    [DAIR_Q2_K] = {NULL, NULL, DAIR_K5(dair_vec_dot4_q2_k_avx512)},
    [DAIR_Q3_K] = {NULL, NULL, DAIR_K5(dair_vec_dot4_q3_k_avx512)},
    [DAIR_Q5_K] = {NULL, DAIR_K2(dair_vec_dot4_q5_k_avx2), DAIR_K5(dair_vec_dot4_q5_k_avx512)},
};

/* Types whose products go through dair_vdot_table (the others have their own loops in qdot.h). */
static inline int dair_in_vdot_table(int qtype) {
    return qtype >= 0 && qtype < DAIR_NTYPES && dair_vdot_table[qtype][DAIR_FAM_SCALAR] != NULL;
}

static int dair_kernel_family(int qtype, int family) {
    for (int f = family; f > DAIR_FAM_SCALAR; f--)
        if (dair_vdot_table[qtype][f] != NULL)
            return f;
    return DAIR_FAM_SCALAR;
}

static inline int dair_selected_family(void) {
    return dair_use_avx512 ? DAIR_FAM_AVX512 : dair_simd_enabled ? DAIR_FAM_AVX2 : DAIR_FAM_SCALAR;
}

/* One row of a table type to float (get_rows and the float path). */
static void dair_dequant_row_table(const uint8_t *src, int qtype, int cols, float *dst) {
    switch (qtype) {
    case DAIR_Q5_0: dair_dequant_row_q5_0(src, cols, dst); break;
    case DAIR_Q5_1: dair_dequant_row_q5_1(src, cols, dst); break;
    case DAIR_IQ4_NL: dair_dequant_row_iq4_nl(src, cols, dst); break;
    case DAIR_Q2_K: dair_dequant_row_q2_k(src, cols, dst); break;
    case DAIR_Q3_K: dair_dequant_row_q3_k(src, cols, dst); break;
    case DAIR_Q5_K: dair_dequant_row_q5_k(src, cols, dst); break;
    case DAIR_IQ4_XS: dair_dequant_row_iq4_xs(src, cols, dst); break;
    case DAIR_BF16: dair_dequant_row_bf16(src, cols, dst); break;
    }
}

/* rows [r0, r1) x all n activation rows; a row (a few KB) stays in L1 across them. */
static void dair_mm_vdot(const uint8_t *w, size_t rb, int qtype, int r0, int r1, const dair_act *a, float *out,
                         size_t ldo) {
    const int fam = dair_kernel_family(qtype, dair_selected_family());
    const dair_vdot_fn dot = dair_vdot_table[qtype][fam];
    const dair_vdot4_fn dot4 = dair_vdot4_table[qtype][fam];
    const int n = a->n, nb = a->nb, per = dair_uses_q8k(qtype) ? 16 : 1;
    const uint8_t *end = w + (size_t)r1 * rb;
    const size_t pf_dist = 4096; /* weights stream from memory: see DAIR_PF_DIST in qdot.h */
    if (n < DAIR_STREAM_ROWS) {
        size_t left = (size_t)(r1 - r0) * rb;
        for (size_t o = 0; o < (left < pf_dist ? left : pf_dist); o += 64)
            __builtin_prefetch(w + (size_t)r0 * rb + o, 0, 3);
    }
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * rb;
        if (n < DAIR_STREAM_ROWS && wr + pf_dist < end) { /* the bound worked out once, not per line */
            const uint8_t *pf = wr + pf_dist;
            const size_t len = (size_t)(end - pf) < rb ? (size_t)(end - pf) : rb;
            for (size_t o = 0; o < len; o += 64)
                __builtin_prefetch(pf + o, 0, 3);
        }
        int i = 0;
        if (dot4 != NULL) {
            float res[4];
            for (; i + 4 <= n; i += 4) {
                dot4(wr, nb, a->q + (size_t)i * a->cols, a->d + (size_t)i * nb, a->s + (size_t)i * nb,
                     a->isum + (size_t)i * nb * per, res);
                for (int c = 0; c < 4; c++)
                    out[(size_t)(i + c) * ldo + r] = res[c];
            }
        }
        for (; i < n; i++)
            out[(size_t)i * ldo + r] = dot(wr, nb, a->q + (size_t)i * a->cols, a->d + (size_t)i * nb,
                                           a->s + (size_t)i * nb, a->isum + (size_t)i * nb * per);
    }
}

#endif
