/* Attention over a KV cache for one query row and one kv head's group of query heads. */
#ifndef DAIR_ATTN_H
#define DAIR_ATTN_H

#include <math.h>
#include "qdot.h"
#include "vmath.h"

static inline void dair_axpy_f32(float *y, float a, const float *x, int n) {
    for (int j = 0; j < n; j++)
        y[j] += a * x[j];
}

/* The G query heads of one kv head (contiguous in q and out) against cache rows
 * 0..npos-1. Keys and values are read once per row for the whole group, which is
 * what grouped-query attention saves. Cache rows are row_stride elements apart;
 * an f16 cache is converted row by row into tmp. sc holds G * npos floats, tmp hd. */
/* The cache is usually not in cache: a decode step streams all layers' weights between two
 * visits of a layer's K/V, and rows of one kv head are row_stride apart. Prefetching
 * DAIR_ATTN_PF rows ahead keeps the reads from waiting on memory one row at a time. */
#define DAIR_ATTN_PF 8

static inline void dair_prefetch_span(const void *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64)
        __builtin_prefetch((const char *)p + o, 0, 3);
}

#if defined(__AVX512F__)
/* r[i] = sum of the 16 lanes of v[i]: a transpose-and-add tree, ~3 instructions per
 * vector instead of a full horizontal reduction each. */
static inline __m512 dair_reduce16x16(const __m512 *v) {
    __m512 a[8], b[4], c[2];
    for (int i = 0; i < 8; i++)
        a[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(1, 0, 1, 0)),
                             _mm512_shuffle_f32x4(v[i], v[i + 8], _MM_SHUFFLE(3, 2, 3, 2)));
    for (int i = 0; i < 4; i++)
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(a[i], a[i + 4], _MM_SHUFFLE(3, 1, 3, 1)));
    for (int i = 0; i < 2; i++)
        c[i] = _mm512_add_ps(_mm512_unpacklo_ps(b[i], b[i + 2]), _mm512_unpackhi_ps(b[i], b[i + 2]));
    __m512 r = _mm512_add_ps(_mm512_unpacklo_ps(c[0], c[1]), _mm512_unpackhi_ps(c[0], c[1]));
    /* lanes come out as v0-3, v8-11, v4-7, v12-15 */
    return _mm512_shuffle_f32x4(r, r, _MM_SHUFFLE(3, 1, 2, 0));
}

/* hd a multiple of 16 up to 256: scores 16 rows at a time. One head of the
 * group at a time keeps its q (or output) in registers; the group's later heads find
 * the K/V rows in L2. */
static inline __m512 dair_load16(const void *base, size_t i, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + i)))
               : _mm512_loadu_ps((const float *)base + i);
}

static void dair_attn_group512(const float *q, const void *kc, const void *vc, int f16, size_t row_stride,
                               size_t off, int hd, int G, int npos, float scale, float *out, float *sc) {
    const size_t esz = f16 ? 2 : 4;
    const int nv = hd / 16;
    const __m512 vscale = _mm512_set1_ps(scale);
    for (int g = 0; g < G; g++) {
        const float *qg = q + (size_t)g * hd;
        float *s = sc + (size_t)g * npos;
        __m512 qv[16];
        for (int j = 0; j < nv; j++)
            qv[j] = _mm512_loadu_ps(qg + 16 * j);
        for (int t0 = 0; t0 < npos; t0 += 16) {
            int nt = npos - t0 < 16 ? npos - t0 : 16;
            __m512 part[16];
            for (int i = 0; i < 16; i++) {
                part[i] = _mm512_setzero_ps();
                if (i < nt) {
                    size_t k = (size_t)(t0 + i) * row_stride + off;
                    if (g == 0 && t0 + i + DAIR_ATTN_PF < npos)
                        dair_prefetch_span((const char *)kc + (k + DAIR_ATTN_PF * row_stride) * esz, (size_t)hd * esz);
                    for (int j = 0; j < nv; j++)
                        part[i] = _mm512_fmadd_ps(qv[j], dair_load16(kc, k + 16 * j, f16), part[i]);
                }
            }
            _mm512_mask_storeu_ps(s + t0, (__mmask16)((1u << nt) - 1),
                                  _mm512_mul_ps(dair_reduce16x16(part), vscale));
        }
        __m512 vm = _mm512_set1_ps(-INFINITY);
        int t = 0;
        for (; t + 16 <= npos; t += 16)
            vm = _mm512_max_ps(vm, _mm512_loadu_ps(s + t));
        float mx = _mm512_reduce_max_ps(vm);
        for (; t < npos; t++)
            mx = s[t] > mx ? s[t] : mx;
        float inv = 1.0f / dair_exp_sub_sum(s, mx, (size_t)npos);
        __m512 acc[16];
        for (int j = 0; j < nv; j++)
            acc[j] = _mm512_setzero_ps();
        for (t = 0; t < npos; t++) {
            size_t v = (size_t)t * row_stride + off;
            if (g == 0 && t + DAIR_ATTN_PF < npos)
                dair_prefetch_span((const char *)vc + (v + DAIR_ATTN_PF * row_stride) * esz, (size_t)hd * esz);
            __m512 p = _mm512_set1_ps(s[t]);
            for (int j = 0; j < nv; j++)
                acc[j] = _mm512_fmadd_ps(p, dair_load16(vc, v + 16 * j, f16), acc[j]);
        }
        const __m512 vinv = _mm512_set1_ps(inv);
        for (int j = 0; j < nv; j++)
            _mm512_storeu_ps(out + (size_t)g * hd + 16 * j, _mm512_mul_ps(acc[j], vinv));
    }
}
#endif

static void dair_attn_group(const float *q, const void *kc, const void *vc, int f16, size_t row_stride, int kvh,
                            int hd, int G, int npos, float scale, float *out, float *sc, float *tmp) {
#if defined(__AVX512F__)
    if (hd % 16 == 0 && hd <= 256) {
        dair_attn_group512(q, kc, vc, f16, row_stride, (size_t)kvh * hd, hd, G, npos, scale, out, sc);
        return;
    }
#endif
    size_t off = (size_t)kvh * hd;
    size_t esz = f16 ? 2 : 4, rbytes = (size_t)hd * esz;
    for (int t = 0; t < npos && t < DAIR_ATTN_PF; t++) {
        dair_prefetch_span((const char *)kc + ((size_t)t * row_stride + off) * esz, rbytes);
        dair_prefetch_span((const char *)vc + ((size_t)t * row_stride + off) * esz, rbytes);
    }
    for (int t = 0; t < npos; t++) {
        size_t o = (size_t)t * row_stride + off;
        if (t + DAIR_ATTN_PF < npos) {
            dair_prefetch_span((const char *)kc + (o + DAIR_ATTN_PF * row_stride) * esz, rbytes);
            dair_prefetch_span((const char *)vc + (o + DAIR_ATTN_PF * row_stride) * esz, rbytes);
        }
        const float *k;
        if (f16) {
            dair_dequant_row((const uint8_t *)((const uint16_t *)kc + o), DAIR_F16, hd, tmp);
            k = tmp;
        } else {
            k = (const float *)kc + o;
        }
        for (int g = 0; g < G; g++)
            sc[(size_t)g * npos + t] = dair_dot_f32(q + (size_t)g * hd, k, hd) * scale;
    }
    for (int g = 0; g < G; g++) {
        float *s = sc + (size_t)g * npos;
        float mx = -INFINITY;
        for (int t = 0; t < npos; t++)
            mx = s[t] > mx ? s[t] : mx;
        float inv = 1.0f / dair_exp_sub_sum(s, mx, (size_t)npos);
        for (int t = 0; t < npos; t++)
            s[t] *= inv;
    }
    memset(out, 0, sizeof(float) * (size_t)G * hd);
    for (int t = 0; t < npos; t++) {
        size_t o = (size_t)t * row_stride + off;
        const float *v;
        if (f16) {
            dair_dequant_row((const uint8_t *)((const uint16_t *)vc + o), DAIR_F16, hd, tmp);
            v = tmp;
        } else {
            v = (const float *)vc + o;
        }
        for (int g = 0; g < G; g++)
            dair_axpy_f32(out + (size_t)g * hd, sc[(size_t)g * npos + t], v, hd);
    }
}

#endif
