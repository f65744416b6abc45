/* ARM NEON float kernels under attention and the float weight path: an F16 row to float (the KV
 * cache's rows, F16 weights) and the float dot product (scores q . k). qdot.h's dair_dequant_row
 * and dair_dot_f32 use them on aarch64, so attention (attn.h) runs on NEON without a copy of its
 * own; off ARM this header is empty. tests/support/neon/harness.c checks them against plain C. */
#ifndef DAIR_NEON_FLOAT_H
#define DAIR_NEON_FLOAT_H

#include "cpu.h"

#if defined(DAIR_HAVE_NEON)

#include <arm_neon.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* cols halves at src (any alignment) to floats: FCVTL converts subnormals and infinities exactly;
 * NaNs come out quiet. */
static inline void dair_neon_f16_row(const uint8_t *src, int cols, float *dst) {
    int j = 0;
    for (; j + 8 <= cols; j += 8) {
        const float16x8_t h = vreinterpretq_f16_u8(vld1q_u8(src + 2 * (size_t)j));
        vst1q_f32(dst + j, vcvt_f32_f16(vget_low_f16(h)));
        vst1q_f32(dst + j + 4, vcvt_high_f32_f16(h));
    }
    for (; j < cols; j++) {
        __fp16 h;
        memcpy(&h, src + 2 * (size_t)j, 2);
        dst[j] = (float)h;
    }
}

/* sum a[j] b[j]: four accumulators of four lanes (FMA latency), then the tail in order. */
static inline float dair_neon_dot_f32(const float *a, const float *b, int n) {
    float32x4_t s0 = vdupq_n_f32(0.0f), s1 = s0, s2 = s0, s3 = s0;
    int j = 0;
    for (; j + 16 <= n; j += 16) {
        s0 = vfmaq_f32(s0, vld1q_f32(a + j), vld1q_f32(b + j));
        s1 = vfmaq_f32(s1, vld1q_f32(a + j + 4), vld1q_f32(b + j + 4));
        s2 = vfmaq_f32(s2, vld1q_f32(a + j + 8), vld1q_f32(b + j + 8));
        s3 = vfmaq_f32(s3, vld1q_f32(a + j + 12), vld1q_f32(b + j + 12));
    }
    for (; j + 4 <= n; j += 4)
        s0 = vfmaq_f32(s0, vld1q_f32(a + j), vld1q_f32(b + j));
    float r = vaddvq_f32(vaddq_f32(vaddq_f32(s0, s1), vaddq_f32(s2, s3)));
    for (; j < n; j++)
        r += a[j] * b[j];
    return r;
}

#endif /* DAIR_HAVE_NEON */
#endif
