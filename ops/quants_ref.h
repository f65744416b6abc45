/* Plain-C kernels of the types llama.cpp added after Q4_0/Q4_1/Q8_0 and Q4_K/Q6_K: one function
 * per (type, operation), written from the layouts in blocks.h and the maths of llama.cpp's
 * ggml-quants.c (dequantize_row_*, ggml_vec_dot_*_q8_*_generic).
 *
 * dair_dequant_row_T(src, cols, dst): one row to float.
 * dair_vec_dot_T_ref(wrow, nb, q, d, s, isum): one row against one 8-bit activation row (act.h):
 * integer sums per (sub-)block exactly as llama.cpp forms them, then its float scaling, so the
 * SIMD kernels (quants_avx2.h, quants_avx512.h) differ from these only in float summation order.
 */
#ifndef DAIR_QUANTS_REF_H
#define DAIR_QUANTS_REF_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "act.h"
#include "blocks.h"

/* The value codes of one Q5 block (0..31) in value order. */
static inline void dair_q5_codes(const uint8_t qh4[4], const uint8_t qs[16], int codes[32]) {
    uint32_t qh;
    memcpy(&qh, qh4, 4);
    for (int j = 0; j < 16; j++) {
        codes[j] = (qs[j] & 15) | (int)(((qh >> j) & 1) << 4);
        codes[j + 16] = (qs[j] >> 4) | (int)(((qh >> (j + 16)) & 1) << 4);
    }
}

/* ---- dequantization -------------------------------------------------------------------- */

static void dair_dequant_row_q5_0(const uint8_t *src, int cols, float *dst) {
    for (int b = 0; b < cols / DAIR_QK; b++) {
        const dair_block_q5_0 *x = (const dair_block_q5_0 *)(src + (size_t)b * sizeof(dair_block_q5_0));
        const float d = dair_fp16_to_fp32(dair_load_u16(&x->d));
        int c[32];
        dair_q5_codes(x->qh, x->qs, c);
        for (int j = 0; j < 32; j++)
            dst[(size_t)b * 32 + j] = (float)(c[j] - 16) * d;
    }
}

static void dair_dequant_row_q5_1(const uint8_t *src, int cols, float *dst) {
    for (int b = 0; b < cols / DAIR_QK; b++) {
        const dair_block_q5_1 *x = (const dair_block_q5_1 *)(src + (size_t)b * sizeof(dair_block_q5_1));
        const float d = dair_fp16_to_fp32(dair_load_u16(&x->d)), m = dair_fp16_to_fp32(dair_load_u16(&x->m));
        int c[32];
        dair_q5_codes(x->qh, x->qs, c);
        for (int j = 0; j < 32; j++)
            dst[(size_t)b * 32 + j] = (float)c[j] * d + m;
    }
}

static void dair_dequant_row_iq4_nl(const uint8_t *src, int cols, float *dst) {
    for (int b = 0; b < cols / DAIR_QK; b++) {
        const dair_block_iq4_nl *x = (const dair_block_iq4_nl *)(src + (size_t)b * sizeof(dair_block_iq4_nl));
        const float d = dair_fp16_to_fp32(dair_load_u16(&x->d));
        for (int j = 0; j < 16; j++) {
            dst[(size_t)b * 32 + j] = d * dair_iq4_values[x->qs[j] & 15];
            dst[(size_t)b * 32 + j + 16] = d * dair_iq4_values[x->qs[j] >> 4];
        }
    }
}

static void dair_dequant_row_q2_k(const uint8_t *src, int cols, float *dst) {
    for (int b = 0; b < cols / DAIR_QKK; b++) {
        const dair_block_q2_K *x = (const dair_block_q2_K *)(src + (size_t)b * sizeof(dair_block_q2_K));
        const float d = dair_fp16_to_fp32(dair_load_u16(&x->d)), dmin = dair_fp16_to_fp32(dair_load_u16(&x->dmin));
        float *y = dst + (size_t)b * DAIR_QKK;
        for (int i = 0; i < DAIR_QKK; i++) {
            const int h = i / 128, j = (i % 128) / 32, l = i % 32, sc = x->scales[i / 16];
            const float dl = d * (float)(sc & 15), ml = dmin * (float)(sc >> 4);
            y[i] = dl * (float)((x->qs[32 * h + l] >> (2 * j)) & 3) - ml;
        }
    }
}

static inline int dair_q3k_code(const dair_block_q3_K *x, int i) {
    const int h = i / 128, j = (i % 128) / 32, l = i % 32;
    return ((x->qs[32 * h + l] >> (2 * j)) & 3) - ((x->hmask[l] >> (4 * h + j)) & 1 ? 0 : 4);
}

static void dair_dequant_row_q3_k(const uint8_t *src, int cols, float *dst) {
    for (int b = 0; b < cols / DAIR_QKK; b++) {
        const dair_block_q3_K *x = (const dair_block_q3_K *)(src + (size_t)b * sizeof(dair_block_q3_K));
        const float d = dair_fp16_to_fp32(dair_load_u16(&x->d));
        int8_t sc[16];
        dair_q3k_scales(x->scales, sc);
        for (int i = 0; i < DAIR_QKK; i++)
            dst[(size_t)b * DAIR_QKK + i] = d * (float)(sc[i / 16] - 32) * (float)dair_q3k_code(x, i);
    }
}

static inline int dair_q5k_code(const dair_block_q5_K *x, int i) {
    const int s = i / 32, l = i % 32, c = s / 2;
    const int nib = s & 1 ? x->qs[32 * c + l] >> 4 : x->qs[32 * c + l] & 15;
    return nib | (((x->qh[l] >> s) & 1) << 4);
}

static void dair_dequant_row_q5_k(const uint8_t *src, int cols, float *dst) {
    for (int b = 0; b < cols / DAIR_QKK; b++) {
        const dair_block_q5_K *x = (const dair_block_q5_K *)(src + (size_t)b * sizeof(dair_block_q5_K));
        const float d = dair_fp16_to_fp32(dair_load_u16(&x->d)), dmin = dair_fp16_to_fp32(dair_load_u16(&x->dmin));
        uint8_t sc[8], m[8];
        dair_q4k_scales(x->scales, sc, m);
        for (int i = 0; i < DAIR_QKK; i++) {
            const float dl = d * (float)sc[i / 32], ml = dmin * (float)m[i / 32];
            dst[(size_t)b * DAIR_QKK + i] = dl * (float)dair_q5k_code(x, i) - ml;
        }
    }
}

static inline int dair_iq4xs_scale(const dair_block_iq4_xs *x, int s) {
    const int sh = dair_load_u16(&x->scales_h);
    return (((x->scales_l[s / 2] >> (4 * (s % 2))) & 15) | (((sh >> (2 * s)) & 3) << 4)) - 32;
}

static void dair_dequant_row_iq4_xs(const uint8_t *src, int cols, float *dst) {
    for (int b = 0; b < cols / DAIR_QKK; b++) {
        const dair_block_iq4_xs *x = (const dair_block_iq4_xs *)(src + (size_t)b * sizeof(dair_block_iq4_xs));
        const float d = dair_fp16_to_fp32(dair_load_u16(&x->d));
        for (int s = 0; s < 8; s++) {
            const float dl = d * (float)dair_iq4xs_scale(x, s);
            float *y = dst + (size_t)b * DAIR_QKK + 32 * s;
            for (int j = 0; j < 16; j++) {
                y[j] = dl * dair_iq4_values[x->qs[16 * s + j] & 15];
                y[j + 16] = dl * dair_iq4_values[x->qs[16 * s + j] >> 4];
            }
        }
    }
}

static void dair_dequant_row_bf16(const uint8_t *src, int cols, float *dst) {
    for (int j = 0; j < cols; j++)
        dst[j] = dair_bf16_to_fp32(dair_load_u16(src + 2 * (size_t)j));
}

/* ---- dot products with 8-bit activations ------------------------------------------------ */
/* Scales go through the portable fp16 conversion so these need no instruction set. */

static float dair_vec_dot_q5_0_ref(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                   const int32_t *isum) {
    (void)s, (void)isum;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_0 *x = (const dair_block_q5_0 *)(w + (size_t)b * sizeof(dair_block_q5_0));
        int c[32], sumi = 0;
        dair_q5_codes(x->qh, x->qs, c);
        for (int j = 0; j < 32; j++)
            sumi += (c[j] - 16) * q[(size_t)b * 32 + j];
        acc += (dair_fp16_to_fp32_soft(dair_load_u16(&x->d)) * d[b]) * (float)sumi;
    }
    return acc;
}

static float dair_vec_dot_q5_1_ref(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                   const int32_t *isum) {
    (void)isum;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_1 *x = (const dair_block_q5_1 *)(w + (size_t)b * sizeof(dair_block_q5_1));
        int c[32], sumi = 0;
        dair_q5_codes(x->qh, x->qs, c);
        for (int j = 0; j < 32; j++)
            sumi += c[j] * q[(size_t)b * 32 + j];
        acc += (dair_fp16_to_fp32_soft(dair_load_u16(&x->d)) * d[b]) * (float)sumi +
               dair_fp16_to_fp32_soft(dair_load_u16(&x->m)) * s[b];
    }
    return acc;
}

static float dair_vec_dot_iq4_nl_ref(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                     const int32_t *isum) {
    (void)s, (void)isum;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_iq4_nl *x = (const dair_block_iq4_nl *)(w + (size_t)b * sizeof(dair_block_iq4_nl));
        const int8_t *y = q + (size_t)b * 32;
        int sumi = 0;
        for (int j = 0; j < 16; j++)
            sumi += dair_iq4_values[x->qs[j] & 15] * y[j] + dair_iq4_values[x->qs[j] >> 4] * y[j + 16];
        acc += (dair_fp16_to_fp32_soft(dair_load_u16(&x->d)) * d[b]) * (float)sumi;
    }
    return acc;
}

static float dair_vec_dot_q2_k_ref(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                   const int32_t *bsums) {
    (void)s;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q2_K *x = (const dair_block_q2_K *)(w + (size_t)b * sizeof(dair_block_q2_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        int isum = 0, summs = 0;
        for (int k = 0; k < 16; k++) {
            int sub = 0;
            for (int i = 16 * k; i < 16 * k + 16; i++)
                sub += ((x->qs[32 * (i / 128) + i % 32] >> (2 * ((i % 128) / 32))) & 3) * y[i];
            isum += (x->scales[k] & 15) * sub;
            summs += (x->scales[k] >> 4) * bsums[(size_t)b * 16 + k];
        }
        const float dall = d[b] * dair_fp16_to_fp32_soft(dair_load_u16(&x->d));
        const float dmin = d[b] * dair_fp16_to_fp32_soft(dair_load_u16(&x->dmin));
        acc += dall * (float)isum - dmin * (float)summs;
    }
    return acc;
}

static float dair_vec_dot_q3_k_ref(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                   const int32_t *bsums) {
    (void)s, (void)bsums;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q3_K *x = (const dair_block_q3_K *)(w + (size_t)b * sizeof(dair_block_q3_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        int8_t sc[16];
        dair_q3k_scales(x->scales, sc);
        int sumi = 0;
        for (int k = 0; k < 16; k++) {
            int sub = 0;
            for (int i = 16 * k; i < 16 * k + 16; i++)
                sub += dair_q3k_code(x, i) * y[i];
            sumi += (sc[k] - 32) * sub;
        }
        acc += (dair_fp16_to_fp32_soft(dair_load_u16(&x->d)) * d[b]) * (float)sumi;
    }
    return acc;
}

static float dair_vec_dot_q5_k_ref(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                   const int32_t *bsums) {
    (void)s;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_K *x = (const dair_block_q5_K *)(w + (size_t)b * sizeof(dair_block_q5_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        uint8_t sc[8], m[8];
        dair_q4k_scales(x->scales, sc, m);
        int sumi = 0, summ = 0;
        for (int j = 0; j < 8; j++) {
            int sub = 0;
            for (int i = 32 * j; i < 32 * j + 32; i++)
                sub += dair_q5k_code(x, i) * y[i];
            sumi += sc[j] * sub;
            summ += m[j] * (bsums[(size_t)b * 16 + 2 * j] + bsums[(size_t)b * 16 + 2 * j + 1]);
        }
        acc += dair_fp16_to_fp32_soft(dair_load_u16(&x->d)) * d[b] * (float)sumi -
               dair_fp16_to_fp32_soft(dair_load_u16(&x->dmin)) * d[b] * (float)summ;
    }
    return acc;
}

static float dair_vec_dot_iq4_xs_ref(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                     const int32_t *bsums) {
    (void)s, (void)bsums;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_iq4_xs *x = (const dair_block_iq4_xs *)(w + (size_t)b * sizeof(dair_block_iq4_xs));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        int sumi = 0;
        for (int sb = 0; sb < 8; sb++) {
            int sub = 0;
            for (int j = 0; j < 16; j++)
                sub += dair_iq4_values[x->qs[16 * sb + j] & 15] * y[32 * sb + j] +
                       dair_iq4_values[x->qs[16 * sb + j] >> 4] * y[32 * sb + 16 + j];
            sumi += dair_iq4xs_scale(x, sb) * sub;
        }
        acc += (dair_fp16_to_fp32_soft(dair_load_u16(&x->d)) * d[b]) * (float)sumi;
    }
    return acc;
}

#endif
