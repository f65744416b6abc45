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

static void dair_attn_group(const float *q, const void *kc, const void *vc, int f16, size_t row_stride, int kvh,
                            int hd, int G, int npos, float scale, float *out, float *sc, float *tmp) {
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
