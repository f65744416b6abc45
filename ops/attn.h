/* Attention over a KV cache, one (query, head) at a time. */
#ifndef DAIR_ATTN_H
#define DAIR_ATTN_H

#include <math.h>
#include "qdot.h"

static inline float dair_dot_f16(const float *a, const uint16_t *b, int n) {
    int j = 0;
    float r = 0.0f;
#if defined(DAIR_HAVE_AVX2)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j))), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8),
                             _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j + 8))), s1);
    }
    for (; j + 8 <= n; j += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(b + j))), s0);
    r = dair_hsum256(_mm256_add_ps(s0, s1));
#endif
    for (; j < n; j++)
        r += a[j] * dair_fp16_to_fp32(b[j]);
    return r;
}

static inline void dair_axpy_f32(float *y, float a, const float *x, int n) {
    for (int j = 0; j < n; j++)
        y[j] += a * x[j];
}

static inline void dair_axpy_f16(float *y, float a, const uint16_t *x, int n) {
    int j = 0;
#if defined(DAIR_HAVE_AVX2)
    __m256 va = _mm256_set1_ps(a);
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(y + j, _mm256_fmadd_ps(va, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + j))),
                                                _mm256_loadu_ps(y + j)));
#endif
    for (; j < n; j++)
        y[j] += a * dair_fp16_to_fp32(x[j]);
}

/* out[hd] = softmax(scale * q . k[t]) . v[t] over t < npos, for kv head kvh.
 * Cache rows are `row_stride` elements apart (n_kv * hd); sc holds npos floats. */
static void dair_attn_head(const float *q, const void *kc, const void *vc, int f16, size_t row_stride, int kvh,
                           int hd, int npos, float scale, float *out, float *sc) {
    float mx = -INFINITY;
    size_t off = (size_t)kvh * hd;
    for (int t = 0; t < npos; t++) {
        size_t o = (size_t)t * row_stride + off;
        float s = f16 ? dair_dot_f16(q, (const uint16_t *)kc + o, hd) : dair_dot_f32(q, (const float *)kc + o, hd);
        s *= scale;
        sc[t] = s;
        mx = s > mx ? s : mx;
    }
    float sum = 0.0f;
    for (int t = 0; t < npos; t++) {
        float e = expf(sc[t] - mx);
        sc[t] = e;
        sum += e;
    }
    for (int j = 0; j < hd; j++)
        out[j] = 0.0f;
    for (int t = 0; t < npos; t++) {
        size_t o = (size_t)t * row_stride + off;
        if (f16)
            dair_axpy_f16(out, sc[t], (const uint16_t *)vc + o, hd);
        else
            dair_axpy_f32(out, sc[t], (const float *)vc + o, hd);
    }
    float inv = 1.0f / sum;
    for (int j = 0; j < hd; j++)
        out[j] *= inv;
}

#endif
