/* ARM NEON kernels for the 8-bit products of Q4_0, Q4_1, Q8_0 (Q8_0-style activations, blocks of
 * 32) and Q4_K, Q6_K (Q8_K activations, blocks of 256): the family "neon" (cpu.h), written from the
 * layouts in blocks.h and the maths of llama.cpp's ggml-cpu/arch/arm/quants.c.
 *
 * Each product forms llama.cpp's integer sums per (sub-)block exactly, as the plain-C kernels of
 * qdot.h / kquants.h do, so the two differ only in float summation order. With the dot-product
 * extension (__ARM_FEATURE_DOTPROD, e.g. -march=armv8.2-a+dotprod or -mcpu=native on a core that
 * has it) a 16-byte product is one SDOT; plain ARMv8 NEON widens with SMULL and pairwise adds.
 * tests/support/neon/harness.c checks both builds against the plain-C kernels under qemu-aarch64.
 *
 * The signatures are dair_vdot_fn's (act.h): wrow, nb blocks, activation q, d, s, isum.
 */
#ifndef DAIR_NEON_QUANTS_H
#define DAIR_NEON_QUANTS_H

#include "cpu.h"

#if defined(DAIR_HAVE_NEON)

#include <arm_neon.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "act.h"
#include "blocks.h"

#if defined(__ARM_FEATURE_DOTPROD)
#define DAIR_NEON_NAME "neon+dotprod"
#else
#define DAIR_NEON_NAME "neon"
#endif

/* blocks.h's conversion is the portable one off x86; aarch64 converts halves in hardware (FCVT),
 * subnormals included, so this agrees with dair_fp16_to_fp32_soft bit for bit. */
DAIR_INLINE float dair_neon_h2f(const void *p) {
    __fp16 h;
    memcpy(&h, p, 2);
    return (float)h;
}

/* acc + the 4 sums of 4 products of a and b (which lane holds which sum differs between the two
 * builds; every caller adds the lanes up). No saturation: |product| <= 128 * 128. */
DAIR_INLINE int32x4_t dair_neon_dot(int32x4_t acc, int8x16_t a, int8x16_t b) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(acc, a, b);
#else
    const int16x8_t p0 = vmull_s8(vget_low_s8(a), vget_low_s8(b));
    const int16x8_t p1 = vmull_high_s8(a, b);
    return vaddq_s32(acc, vaddq_s32(vpaddlq_s16(p0), vpaddlq_s16(p1)));
#endif
}

static float dair_vec_dot_q8_0_neon(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *isum) {
    (void)s, (void)isum;
    float32x4_t acc0 = vdupq_n_f32(0.0f), acc1 = vdupq_n_f32(0.0f);
    int b = 0;
    /* two blocks per step in two accumulators, as llama.cpp does: the FMA latency is the bound */
    for (; b + 2 <= nb; b += 2) {
        const dair_block_q8_0 *x0 = (const dair_block_q8_0 *)(w + (size_t)b * sizeof(dair_block_q8_0));
        const dair_block_q8_0 *x1 = x0 + 1;
        const int8_t *y = q + (size_t)b * DAIR_QK;
        int32x4_t p0 = dair_neon_dot(vdupq_n_s32(0), vld1q_s8(x0->qs), vld1q_s8(y));
        p0 = dair_neon_dot(p0, vld1q_s8(x0->qs + 16), vld1q_s8(y + 16));
        int32x4_t p1 = dair_neon_dot(vdupq_n_s32(0), vld1q_s8(x1->qs), vld1q_s8(y + 32));
        p1 = dair_neon_dot(p1, vld1q_s8(x1->qs + 16), vld1q_s8(y + 48));
        acc0 = vmlaq_n_f32(acc0, vcvtq_f32_s32(p0), dair_neon_h2f(&x0->d) * d[b]);
        acc1 = vmlaq_n_f32(acc1, vcvtq_f32_s32(p1), dair_neon_h2f(&x1->d) * d[b + 1]);
    }
    for (; b < nb; b++) {
        const dair_block_q8_0 *x0 = (const dair_block_q8_0 *)(w + (size_t)b * sizeof(dair_block_q8_0));
        const int8_t *y = q + (size_t)b * DAIR_QK;
        int32x4_t p0 = dair_neon_dot(vdupq_n_s32(0), vld1q_s8(x0->qs), vld1q_s8(y));
        p0 = dair_neon_dot(p0, vld1q_s8(x0->qs + 16), vld1q_s8(y + 16));
        acc0 = vmlaq_n_f32(acc0, vcvtq_f32_s32(p0), dair_neon_h2f(&x0->d) * d[b]);
    }
    return vaddvq_f32(vaddq_f32(acc0, acc1));
}

/* Q4_0 and Q4_1 (is_q41): nibbles, minus 8 for Q4_0 (signed, as llama.cpp's NEON code), plus
 * m * s per block for Q4_1 (s = Q8_1's d * sum(q)). */
DAIR_INLINE float dair_neon_dot_q4(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                   int is_q41) {
    const size_t bs = is_q41 ? sizeof(dair_block_q4_1) : sizeof(dair_block_q4_0);
    const size_t qoff = is_q41 ? 4 : 2;
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    const int8x16_t off = vdupq_n_s8(is_q41 ? 0 : 8);
    float32x4_t acc = vdupq_n_f32(0.0f);
    float accm = 0.0f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * bs;
        const int8_t *y = q + (size_t)b * DAIR_QK;
        const uint8x16_t raw = vld1q_u8(blk + qoff);
        const int8x16_t lo = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(raw, m4)), off);
        const int8x16_t hi = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(raw, 4)), off);
        const int32x4_t p = dair_neon_dot(dair_neon_dot(vdupq_n_s32(0), lo, vld1q_s8(y)), hi, vld1q_s8(y + 16));
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(p), dair_neon_h2f(blk) * d[b]);
        if (is_q41)
            accm += dair_neon_h2f(blk + 2) * s[b];
    }
    return vaddvq_f32(acc) + accm;
}

static float dair_vec_dot_q4_0_neon(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *isum) {
    (void)isum;
    return dair_neon_dot_q4(w, nb, q, d, s, 0);
}

static float dair_vec_dot_q4_1_neon(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *isum) {
    (void)isum;
    return dair_neon_dot_q4(w, nb, q, d, s, 1);
}

/* Q4_K x Q8_K: d_w d_x sum_j sc[j] (nib_j . q_j) - dmin_w d_x sum_j m[j] (bsums of sub-block j). */
static float dair_vec_dot_q4_k_neon(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *bsums) {
    (void)s;
    const uint8x16_t m4 = vdupq_n_u8(0x0F);
    float32x4_t acc = vdupq_n_f32(0.0f);
    float accm = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q4_K *x = (const dair_block_q4_K *)(w + (size_t)b * sizeof(dair_block_q4_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        const int32_t *bs = bsums + (size_t)b * 16;
        uint8_t sc[8], m[8];
        dair_q4k_scales(x->scales, sc, m);
        int32x4_t sumi = vdupq_n_s32(0);
        for (int c = 0; c < 4; c++) {
            const uint8x16_t r0 = vld1q_u8(x->qs + 32 * c), r1 = vld1q_u8(x->qs + 32 * c + 16);
            const int8_t *yc = y + 64 * c;
            int32x4_t p0 = dair_neon_dot(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(r0, m4)), vld1q_s8(yc));
            p0 = dair_neon_dot(p0, vreinterpretq_s8_u8(vandq_u8(r1, m4)), vld1q_s8(yc + 16));
            int32x4_t p1 = dair_neon_dot(vdupq_n_s32(0), vreinterpretq_s8_u8(vshrq_n_u8(r0, 4)), vld1q_s8(yc + 32));
            p1 = dair_neon_dot(p1, vreinterpretq_s8_u8(vshrq_n_u8(r1, 4)), vld1q_s8(yc + 48));
            sumi = vmlaq_n_s32(sumi, p0, sc[2 * c]);
            sumi = vmlaq_n_s32(sumi, p1, sc[2 * c + 1]);
        }
        /* the sums of 32 of sub-blocks 0-3 and 4-7 from the sixteen sums of 16, times the mins */
        const int32x4_t s03 = vpaddq_s32(vld1q_s32(bs), vld1q_s32(bs + 4));
        const int32x4_t s47 = vpaddq_s32(vld1q_s32(bs + 8), vld1q_s32(bs + 12));
        const uint16x8_t m16 = vmovl_u8(vld1_u8(m));
        int32x4_t mm = vmulq_s32(s03, vreinterpretq_s32_u32(vmovl_u16(vget_low_u16(m16))));
        mm = vmlaq_s32(mm, s47, vreinterpretq_s32_u32(vmovl_u16(vget_high_u16(m16))));
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(sumi), dair_neon_h2f(&x->d) * d[b]);
        accm += dair_neon_h2f(&x->dmin) * d[b] * (float)vaddvq_s32(mm);
    }
    return vaddvq_f32(acc) - accm;
}

/* Q6_K x Q8_K: d_w d_x sum_k scales[k] ((q6_k - 32) . q_k) over the sixteen sub-blocks of 16. */
static float dair_vec_dot_q6_k_neon(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *bsums) {
    (void)s, (void)bsums;
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m30 = vdupq_n_u8(0x30);
    const int8x16_t k32 = vdupq_n_s8(32);
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int b = 0; b < nb; b++) {
        const dair_block_q6_K *x = (const dair_block_q6_K *)(w + (size_t)b * sizeof(dair_block_q6_K));
        int32x4_t sumi = vdupq_n_s32(0);
        for (int h = 0; h < 2; h++) {
            const uint8_t *L = x->ql + 64 * h, *H = x->qh + 32 * h;
            const int8_t *sc = x->scales + 8 * h;
            const int8_t *y = q + (size_t)b * DAIR_QKK + 128 * h;
            for (int k = 0; k < 2; k++) { /* values 16k .. 16k+15 of each quarter */
                const uint8x16_t l0 = vld1q_u8(L + 16 * k), l1 = vld1q_u8(L + 32 + 16 * k);
                const uint8x16_t hb = vld1q_u8(H + 16 * k);
                /* the high bit pair t of each byte of qh moved to bits 4-5 */
                const uint8x16_t h0 = vandq_u8(vshlq_n_u8(hb, 4), m30), h1 = vandq_u8(vshlq_n_u8(hb, 2), m30);
                const uint8x16_t h2 = vandq_u8(hb, m30), h3 = vandq_u8(vshrq_n_u8(hb, 2), m30);
                const int8x16_t q0 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l0, m4), h0)), k32);
                const int8x16_t q1 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vandq_u8(l1, m4), h1)), k32);
                const int8x16_t q2 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(l0, 4), h2)), k32);
                const int8x16_t q3 = vsubq_s8(vreinterpretq_s8_u8(vorrq_u8(vshrq_n_u8(l1, 4), h3)), k32);
                sumi = vmlaq_n_s32(sumi, dair_neon_dot(vdupq_n_s32(0), q0, vld1q_s8(y + 16 * k)), sc[k]);
                sumi = vmlaq_n_s32(sumi, dair_neon_dot(vdupq_n_s32(0), q1, vld1q_s8(y + 32 + 16 * k)), sc[k + 2]);
                sumi = vmlaq_n_s32(sumi, dair_neon_dot(vdupq_n_s32(0), q2, vld1q_s8(y + 64 + 16 * k)), sc[k + 4]);
                sumi = vmlaq_n_s32(sumi, dair_neon_dot(vdupq_n_s32(0), q3, vld1q_s8(y + 96 + 16 * k)), sc[k + 6]);
            }
        }
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(sumi), dair_neon_h2f(&x->d) * d[b]);
    }
    return vaddvq_f32(acc);
}

/* The NEON product of a weight type, or NULL where the family has none (the type then runs on
 * its plain-C kernel). */
static inline dair_vdot_fn dair_neon_kernel(int qtype) {
    switch (qtype) {
    case DAIR_Q8_0: return dair_vec_dot_q8_0_neon;
    case DAIR_Q4_0: return dair_vec_dot_q4_0_neon;
    case DAIR_Q4_1: return dair_vec_dot_q4_1_neon;
    case DAIR_Q4_K: return dair_vec_dot_q4_k_neon;
    case DAIR_Q6_K: return dair_vec_dot_q6_k_neon;
    default: return NULL;
    }
}

/* rows [r0, r1) x all n activation rows (act.h); a row (a few KB) stays in L1 across them.
 * Prefetch as qdot.h's DAIR_PF_DIST says (weights stream from memory at decode). */
static void dair_mm_neon(const uint8_t *w, size_t rb, int qtype, int r0, int r1, const dair_act *a, float *out,
                         size_t ldo) {
    const dair_vdot_fn dot = dair_neon_kernel(qtype);
    const int n = a->n, nb = a->nb, per = dair_uses_q8k(qtype) ? 16 : 1;
    const uint8_t *end = w + (size_t)r1 * rb;
    const size_t pf_dist = 4096;
    if (n < DAIR_STREAM_ROWS) {
        const size_t left = (size_t)(r1 - r0) * rb;
        for (size_t o = 0; o < (left < pf_dist ? left : pf_dist); o += 64)
            __builtin_prefetch(w + (size_t)r0 * rb + o, 0, 3);
    }
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * rb;
        if (n < DAIR_STREAM_ROWS) {
            const uint8_t *pf = wr + pf_dist;
            for (size_t o = 0; o < rb && pf + o < end; o += 64)
                __builtin_prefetch(pf + o, 0, 3);
        }
        for (int i = 0; i < n; i++)
            out[(size_t)i * ldo + r] = dot(wr, nb, a->q + (size_t)i * a->cols, a->d + (size_t)i * nb,
                                           a->s + (size_t)i * nb, a->isum + (size_t)i * nb * per);
    }
}

#endif /* DAIR_HAVE_NEON */
#endif
