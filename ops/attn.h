/* Causal grouped-query attention of new query rows against a KV cache.
 *
 * Cache rows are positions; a row holds the n_kv heads of hd values each, stored as
 * f32, f16 or GGUF Q8_0 blocks (fp16 scale + 32 int8, 34 bytes per 32 values, as llama.cpp's
 * -ctk q8_0). Query row i attends to positions 0..pos[i].
 *
 * Two schemes, both reading every cached key and value once per kv head per call:
 *  - "rows" (decode: few query rows). Keys are split into spans; a task is one (row, kv head,
 *    span) with the G query heads of that kv head together, so each cached row is converted
 *    once and dotted with G queries. Spans keep both threads busy on one token; their partial
 *    softmaxes (max, sum, weighted values) are merged at the end (flash-decoding).
 *  - "lanes" (prefill). A task is one kv head and R = 2 vectors' worth of (row, head) query
 *    pairs, one query per SIMD lane. Keys and values come in tiles of DAIR_ATTN_BC positions,
 *    converted to f32 once per tile and used by all R queries; the softmax is online
 *    (FlashAttention): a running max, sum and output per lane, rescaled as tiles arrive. With
 *    queries in lanes the max, the sum and the rescaling are vertical vector operations and
 *    the causal mask is one compare against each lane's position.
 * The plain-C path is the reference: per (row, kv head), scores of all G heads, then softmax.
 */
#ifndef DAIR_ATTN_H
#define DAIR_ATTN_H

#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include "pool.h"
#include "vmath.h"

enum { DAIR_KV_F32 = 0, DAIR_KV_F16 = 1, DAIR_KV_Q8_0 = 2 };
enum { DAIR_ATTN_C = 0, DAIR_ATTN_AVX2 = 1, DAIR_ATTN_AVX512 = 2 };

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define DAIR_ATTN_HAVE_AVX2 1
#else
#define DAIR_ATTN_HAVE_AVX2 0
#endif
#if defined(__AVX512F__)
#define DAIR_ATTN_HAVE_AVX512 1
#else
#define DAIR_ATTN_HAVE_AVX512 0
#endif

#define DAIR_ATTN_BC 64    /* key positions per tile (lanes scheme) */
#define DAIR_ATTN_SPAN 256 /* key positions per task (rows scheme) */

typedef struct {
    const float *q;     /* [n][H][hd] */
    float *out;         /* [n][H][hd] */
    const int32_t *pos; /* [n] */
    const uint8_t *k, *v;
    int kind;           /* DAIR_KV_* */
    size_t row_bytes;   /* bytes of one cache position (all kv heads) */
    size_t head_bytes;  /* bytes of one kv head's hd values */
    int n, H, KV, G, hd;
    float scale;
    int isa;            /* DAIR_ATTN_*, already checked to be compiled in */
    int lanes;          /* allow the query-lanes prefill scheme (faster, but a row's bits then
                           depend on its batch: see dair_attention) */
} dair_attn_args;

static inline float dair_attn_h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0) {
        if (m == 0) {
            bits = s;
        } else { /* subnormal: normalise */
            e = 127 - 15 + 1;
            while (!(m & 0x400)) {
                m <<= 1;
                e--;
            }
            bits = s | (e << 23) | ((m & 0x3ff) << 13);
        }
    } else if (e == 31) {
        bits = s | 0x7f800000u | (m << 13);
    } else {
        bits = s | ((e + 127 - 15) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* hd values of one kv head at one position, as f32 */
static void dair_attn_row_c(const uint8_t *src, int kind, int hd, float *dst) {
    if (kind == DAIR_KV_F32) {
        memcpy(dst, src, sizeof(float) * (size_t)hd);
    } else if (kind == DAIR_KV_F16) {
        for (int j = 0; j < hd; j++) {
            uint16_t h;
            memcpy(&h, src + 2 * (size_t)j, 2);
            dst[j] = dair_attn_h2f(h);
        }
    } else {
        for (int b = 0; b < hd / 32; b++, src += 34) {
            uint16_t h;
            memcpy(&h, src, 2);
            float d = dair_attn_h2f(h);
            for (int j = 0; j < 32; j++)
                dst[32 * b + j] = d * (float)(int8_t)src[2 + j];
        }
    }
}

#if DAIR_ATTN_HAVE_AVX2
static void dair_attn_row_avx2(const uint8_t *src, int kind, int hd, float *dst) {
    int j = 0;
    if (kind == DAIR_KV_F16) {
        for (; j + 8 <= hd; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * (size_t)j))));
        for (; j < hd; j++) {
            uint16_t h;
            memcpy(&h, src + 2 * (size_t)j, 2);
            dst[j] = dair_attn_h2f(h);
        }
    } else if (kind == DAIR_KV_Q8_0) {
        for (int b = 0; b < hd / 32; b++, src += 34) {
            uint16_t h;
            memcpy(&h, src, 2);
            __m256 d = _mm256_set1_ps(dair_attn_h2f(h));
            for (int u = 0; u < 4; u++) {
                __m128i q = _mm_loadl_epi64((const __m128i *)(src + 2 + 8 * u));
                _mm256_storeu_ps(dst + 32 * b + 8 * u, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))));
            }
        }
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)hd);
    }
}
#endif

#if DAIR_ATTN_HAVE_AVX512
static void dair_attn_row_avx512(const uint8_t *src, int kind, int hd, float *dst) {
    int j = 0;
    if (kind == DAIR_KV_F16) {
        for (; j + 16 <= hd; j += 16)
            _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * (size_t)j))));
        for (; j < hd; j++) {
            uint16_t h;
            memcpy(&h, src + 2 * (size_t)j, 2);
            dst[j] = dair_attn_h2f(h);
        }
    } else if (kind == DAIR_KV_Q8_0) {
        for (int b = 0; b < hd / 32; b++, src += 34) {
            uint16_t h;
            memcpy(&h, src, 2);
            __m512 d = _mm512_set1_ps(dair_attn_h2f(h));
            for (int u = 0; u < 2; u++) {
                __m128i q = _mm_loadu_si128((const __m128i *)(src + 2 + 16 * u));
                _mm512_storeu_ps(dst + 32 * b + 16 * u, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
            }
        }
    } else {
        memcpy(dst, src, sizeof(float) * (size_t)hd);
    }
}
#endif

static inline void dair_attn_row(const uint8_t *src, int kind, int hd, float *dst, int isa) {
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512) {
        dair_attn_row_avx512(src, kind, hd, dst);
        return;
    }
#endif
#if DAIR_ATTN_HAVE_AVX2
    if (isa == DAIR_ATTN_AVX2) {
        dair_attn_row_avx2(src, kind, hd, dst);
        return;
    }
#endif
    dair_attn_row_c(src, kind, hd, dst);
}

/* Rows t0..t0+nt-1 of kv head kvh into dst[ntp][hd] (f32), rows nt..ntp-1 zeroed. The rows
 * ahead are prefetched: between two visits of a layer's cache a decode step streams every
 * other layer's weights, so the cache is rarely still in the CPU's caches. */
static void dair_attn_tile(const uint8_t *base, const dair_attn_args *a, int kvh, int t0, int nt, int ntp,
                           float *dst) {
    const size_t off = (size_t)kvh * a->head_bytes;
    for (int t = 0; t < nt; t++) {
        const uint8_t *src = base + (size_t)(t0 + t) * a->row_bytes + off;
        if (t + 8 < nt)
            for (size_t o = 0; o < a->head_bytes; o += 64)
                __builtin_prefetch(src + 8 * a->row_bytes + o, 0, 3);
        dair_attn_row(src, a->kind, a->hd, dst + (size_t)t * a->hd, a->isa);
    }
    if (ntp > nt)
        memset(dst + (size_t)nt * a->hd, 0, sizeof(float) * (size_t)(ntp - nt) * a->hd);
}

/* ---------------------------------------------------------------------------------------------
 * Plain C reference: task = (row i, kv head). sc holds G * (pos + 1) scores, tmp hd floats.
 */
static void dair_attn_task_c(const dair_attn_args *a, int i, int kvh, float *sc, float *tmp) {
    const int G = a->G, hd = a->hd, npos = a->pos[i] + 1;
    const float *q = a->q + ((size_t)i * a->H + (size_t)kvh * G) * hd;
    float *out = a->out + ((size_t)i * a->H + (size_t)kvh * G) * hd;
    const size_t off = (size_t)kvh * a->head_bytes;
    for (int t = 0; t < npos; t++) {
        dair_attn_row_c(a->k + (size_t)t * a->row_bytes + off, a->kind, hd, tmp);
        for (int g = 0; g < G; g++) {
            float s = 0.0f;
            for (int j = 0; j < hd; j++)
                s += q[(size_t)g * hd + j] * tmp[j];
            sc[(size_t)g * npos + t] = s * a->scale;
        }
    }
    for (int g = 0; g < G; g++) {
        float *s = sc + (size_t)g * npos, mx = -INFINITY, sum = 0.0f;
        for (int t = 0; t < npos; t++)
            mx = s[t] > mx ? s[t] : mx;
        for (int t = 0; t < npos; t++) {
            s[t] = expf(s[t] - mx);
            sum += s[t];
        }
        for (int t = 0; t < npos; t++)
            s[t] /= sum;
    }
    memset(out, 0, sizeof(float) * (size_t)G * hd);
    for (int t = 0; t < npos; t++) {
        dair_attn_row_c(a->v + (size_t)t * a->row_bytes + off, a->kind, hd, tmp);
        for (int g = 0; g < G; g++) {
            float p = sc[(size_t)g * npos + t];
            for (int j = 0; j < hd; j++)
                out[(size_t)g * hd + j] += p * tmp[j];
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Rows scheme (decode). Task = (row i, kv head, span [t0, t1)); its result is partial: per
 * head the span's max m, sum l and unnormalised output acc[hd], merged by dair_attn_merge.
 */
#if DAIR_ATTN_HAVE_AVX512
/* r[i] = sum of the 16 lanes of v[i], a transpose-and-add tree */
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
#endif

#if DAIR_ATTN_HAVE_AVX2
static inline __m256 dair_reduce8x8(const __m256 *v) {
    __m256 b0 = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
    __m256 b1 = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(b0, b1, 0x20), _mm256_permute2f128_ps(b0, b1, 0x31));
}

/* exp for x <= 0 (softmax arguments); below -87 the result is flushed to 0 */
static inline __m256 dair_attn_exp256(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    __m256 small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.0f)), lo);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(small, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

/* s[t] = exp(s[t] - mx), returns the sum */
static float dair_attn_exp_sum(float *s, float mx, int len, int isa) {
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512)
        return dair_exp_sub_sum(s, mx, (size_t)len);
#endif
    int t = 0;
    float sum = 0.0f;
#if DAIR_ATTN_HAVE_AVX2
    if (isa == DAIR_ATTN_AVX2) {
        __m256 acc = _mm256_setzero_ps(), vm = _mm256_set1_ps(mx);
        for (; t + 8 <= len; t += 8) {
            __m256 e = dair_attn_exp256(_mm256_sub_ps(_mm256_loadu_ps(s + t), vm));
            _mm256_storeu_ps(s + t, e);
            acc = _mm256_add_ps(acc, e);
        }
        float tmp[8];
        _mm256_storeu_ps(tmp, acc);
        for (int j = 0; j < 8; j++)
            sum += tmp[j];
    }
#endif
    for (; t < len; t++) {
        s[t] = expf(s[t] - mx);
        sum += s[t];
    }
    return sum;
}

/* Scores of the G heads of q against rows [t0, t1): sc[g * len + (t - t0)], scaled. kt is a
 * scratch tile of DAIR_ATTN_BC rows. */
static void dair_attn_scores_rows(const dair_attn_args *a, const float *q, int kvh, int t0, int t1, float *sc,
                                  float *kt) {
    const int G = a->G, hd = a->hd, len = t1 - t0;
    for (int b0 = t0; b0 < t1; b0 += DAIR_ATTN_BC) {
        int nt = t1 - b0 < DAIR_ATTN_BC ? t1 - b0 : DAIR_ATTN_BC;
        int ntp = (nt + 15) & ~15;
        dair_attn_tile(a->k, a, kvh, b0, nt, ntp, kt);
        for (int g = 0; g < G; g++) {
            const float *qg = q + (size_t)g * hd;
            float *s = sc + (size_t)g * len + (b0 - t0);
            int t = 0;
#if DAIR_ATTN_HAVE_AVX512
            if (a->isa == DAIR_ATTN_AVX512 && hd % 16 == 0) {
                const __m512 vs = _mm512_set1_ps(a->scale);
                for (; t < nt; t += 16) {
                    __m512 part[16];
                    for (int r = 0; r < 16; r++) {
                        const float *kr = kt + (size_t)(t + r) * hd;
                        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(qg), _mm512_loadu_ps(kr));
                        for (int j = 16; j < hd; j += 16)
                            acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + j), _mm512_loadu_ps(kr + j), acc);
                        part[r] = acc;
                    }
                    int m = nt - t < 16 ? nt - t : 16;
                    _mm512_mask_storeu_ps(s + t, (__mmask16)((1u << m) - 1), _mm512_mul_ps(dair_reduce16x16(part), vs));
                }
                continue;
            }
#endif
#if DAIR_ATTN_HAVE_AVX2
            if (a->isa == DAIR_ATTN_AVX2 && hd % 8 == 0) {
                const __m256 vs = _mm256_set1_ps(a->scale);
                for (; t < nt; t += 8) {
                    __m256 part[8];
                    for (int r = 0; r < 8; r++) {
                        const float *kr = kt + (size_t)(t + r) * hd;
                        __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), _mm256_loadu_ps(kr));
                        for (int j = 8; j < hd; j += 8)
                            acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + j), _mm256_loadu_ps(kr + j), acc);
                        part[r] = acc;
                    }
                    __m256 r8 = _mm256_mul_ps(dair_reduce8x8(part), vs);
                    if (nt - t >= 8) {
                        _mm256_storeu_ps(s + t, r8);
                    } else {
                        float tmp8[8];
                        _mm256_storeu_ps(tmp8, r8);
                        memcpy(s + t, tmp8, sizeof(float) * (size_t)(nt - t));
                    }
                }
                continue;
            }
#endif
            for (; t < nt; t++) {
                const float *kr = kt + (size_t)t * hd;
                float acc = 0.0f;
                for (int j = 0; j < hd; j++)
                    acc += qg[j] * kr[j];
                s[t] = acc * a->scale;
            }
        }
    }
}

/* acc[g][:] += sum over rows of p[g][t] * v[t] (rows [t0, t1)) */
static void dair_attn_values_rows(const dair_attn_args *a, int kvh, int t0, int t1, const float *p, float *acc,
                                  float *vt) {
    const int G = a->G, hd = a->hd, len = t1 - t0;
    for (int b0 = t0; b0 < t1; b0 += DAIR_ATTN_BC) {
        int nt = t1 - b0 < DAIR_ATTN_BC ? t1 - b0 : DAIR_ATTN_BC;
        dair_attn_tile(a->v, a, kvh, b0, nt, nt, vt);
        for (int g = 0; g < G; g++) {
            const float *pg = p + (size_t)g * len + (b0 - t0);
            float *o = acc + (size_t)g * hd;
            int j = 0;
#if DAIR_ATTN_HAVE_AVX512
            if (a->isa == DAIR_ATTN_AVX512) {
                for (; j + 64 <= hd; j += 64) {
                    __m512 o0 = _mm512_loadu_ps(o + j), o1 = _mm512_loadu_ps(o + j + 16);
                    __m512 o2 = _mm512_loadu_ps(o + j + 32), o3 = _mm512_loadu_ps(o + j + 48);
                    for (int t = 0; t < nt; t++) {
                        const float *vr = vt + (size_t)t * hd + j;
                        __m512 pp = _mm512_set1_ps(pg[t]);
                        o0 = _mm512_fmadd_ps(pp, _mm512_loadu_ps(vr), o0);
                        o1 = _mm512_fmadd_ps(pp, _mm512_loadu_ps(vr + 16), o1);
                        o2 = _mm512_fmadd_ps(pp, _mm512_loadu_ps(vr + 32), o2);
                        o3 = _mm512_fmadd_ps(pp, _mm512_loadu_ps(vr + 48), o3);
                    }
                    _mm512_storeu_ps(o + j, o0);
                    _mm512_storeu_ps(o + j + 16, o1);
                    _mm512_storeu_ps(o + j + 32, o2);
                    _mm512_storeu_ps(o + j + 48, o3);
                }
                for (; j + 16 <= hd; j += 16) {
                    __m512 o0 = _mm512_loadu_ps(o + j);
                    for (int t = 0; t < nt; t++)
                        o0 = _mm512_fmadd_ps(_mm512_set1_ps(pg[t]), _mm512_loadu_ps(vt + (size_t)t * hd + j), o0);
                    _mm512_storeu_ps(o + j, o0);
                }
            }
#endif
#if DAIR_ATTN_HAVE_AVX2
            if (a->isa == DAIR_ATTN_AVX2) {
                for (; j + 32 <= hd; j += 32) {
                    __m256 o0 = _mm256_loadu_ps(o + j), o1 = _mm256_loadu_ps(o + j + 8);
                    __m256 o2 = _mm256_loadu_ps(o + j + 16), o3 = _mm256_loadu_ps(o + j + 24);
                    for (int t = 0; t < nt; t++) {
                        const float *vr = vt + (size_t)t * hd + j;
                        __m256 pp = _mm256_set1_ps(pg[t]);
                        o0 = _mm256_fmadd_ps(pp, _mm256_loadu_ps(vr), o0);
                        o1 = _mm256_fmadd_ps(pp, _mm256_loadu_ps(vr + 8), o1);
                        o2 = _mm256_fmadd_ps(pp, _mm256_loadu_ps(vr + 16), o2);
                        o3 = _mm256_fmadd_ps(pp, _mm256_loadu_ps(vr + 24), o3);
                    }
                    _mm256_storeu_ps(o + j, o0);
                    _mm256_storeu_ps(o + j + 8, o1);
                    _mm256_storeu_ps(o + j + 16, o2);
                    _mm256_storeu_ps(o + j + 24, o3);
                }
                for (; j + 8 <= hd; j += 8) {
                    __m256 o0 = _mm256_loadu_ps(o + j);
                    for (int t = 0; t < nt; t++)
                        o0 = _mm256_fmadd_ps(_mm256_set1_ps(pg[t]), _mm256_loadu_ps(vt + (size_t)t * hd + j), o0);
                    _mm256_storeu_ps(o + j, o0);
                }
            }
#endif
            for (; j < hd; j++) {
                float s = o[j];
                for (int t = 0; t < nt; t++)
                    s += pg[t] * vt[(size_t)t * hd + j];
                o[j] = s;
            }
        }
    }
}

/* The same two passes reading f32 or f16 rows straight from the cache (no tile copy): per
 * block of rows one head at a time, so the group's later heads find the rows in L1. */
#if DAIR_ATTN_HAVE_AVX512
static inline __m512 dair_attn_ld16(const uint8_t *p, int f16) {
    return f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_ps((const float *)p);
}

static void dair_attn_direct512(const dair_attn_args *a, const float *q, int kvh, int t0, int t1, float *sc,
                                float *acc, float *m, float *l) {
    const int G = a->G, hd = a->hd, nv = hd / 16, len = t1 - t0, f16 = a->kind == DAIR_KV_F16;
    const size_t esz = f16 ? 2 : 4, rb = a->row_bytes;
    const uint8_t *kb = a->k + (size_t)t0 * rb + (size_t)kvh * a->head_bytes;
    const uint8_t *vb = a->v + (size_t)t0 * rb + (size_t)kvh * a->head_bytes;
    const __m512 vs = _mm512_set1_ps(a->scale);
    for (int t = 0; t < len; t += 16) {
        int nr = len - t < 16 ? len - t : 16;
        for (int r = 0; r < nr; r++)
            for (size_t o = 0; o < a->head_bytes; o += 64)
                __builtin_prefetch(kb + (size_t)(t + r + 32) * rb + o, 0, 3);
        for (int g = 0; g < G; g++) {
            const float *qg = q + (size_t)g * hd;
            __m512 part[16];
            for (int r = 0; r < 16; r++) {
                __m512 s = _mm512_setzero_ps();
                if (r < nr) {
                    const uint8_t *kr = kb + (size_t)(t + r) * rb;
                    for (int j = 0; j < nv; j++)
                        s = _mm512_fmadd_ps(_mm512_loadu_ps(qg + 16 * j), dair_attn_ld16(kr + 16 * j * esz, f16), s);
                }
                part[r] = s;
            }
            _mm512_mask_storeu_ps(sc + (size_t)g * len + t, (__mmask16)((1u << nr) - 1),
                                  _mm512_mul_ps(dair_reduce16x16(part), vs));
        }
    }
    for (int g = 0; g < G; g++) {
        float *s = sc + (size_t)g * len, mx = -INFINITY;
        for (int t = 0; t < len; t++)
            mx = s[t] > mx ? s[t] : mx;
        m[g] = mx;
        l[g] = dair_exp_sub_sum(s, mx, (size_t)len);
    }
    for (int b0 = 0; b0 < len; b0 += 32) {
        int nr = len - b0 < 32 ? len - b0 : 32;
        for (int r = 0; r < nr; r++)
            for (size_t o = 0; o < a->head_bytes; o += 64)
                __builtin_prefetch(vb + (size_t)(b0 + r + 32) * rb + o, 0, 3);
        for (int g = 0; g < G; g++) {
            const float *pg = sc + (size_t)g * len + b0;
            float *o = acc + (size_t)g * hd;
            for (int j0 = 0; j0 < nv; j0 += 4) {
                int nj = nv - j0 < 4 ? nv - j0 : 4;
                __m512 o0 = _mm512_loadu_ps(o + 16 * j0), o1 = o0, o2 = o0, o3 = o0;
                if (nj > 1) o1 = _mm512_loadu_ps(o + 16 * j0 + 16);
                if (nj > 2) o2 = _mm512_loadu_ps(o + 16 * j0 + 32);
                if (nj > 3) o3 = _mm512_loadu_ps(o + 16 * j0 + 48);
                for (int r = 0; r < nr; r++) {
                    const uint8_t *vr = vb + (size_t)(b0 + r) * rb + 16 * (size_t)j0 * esz;
                    __m512 pp = _mm512_set1_ps(pg[r]);
                    o0 = _mm512_fmadd_ps(pp, dair_attn_ld16(vr, f16), o0);
                    if (nj > 1) o1 = _mm512_fmadd_ps(pp, dair_attn_ld16(vr + 16 * esz, f16), o1);
                    if (nj > 2) o2 = _mm512_fmadd_ps(pp, dair_attn_ld16(vr + 32 * esz, f16), o2);
                    if (nj > 3) o3 = _mm512_fmadd_ps(pp, dair_attn_ld16(vr + 48 * esz, f16), o3);
                }
                _mm512_storeu_ps(o + 16 * j0, o0);
                if (nj > 1) _mm512_storeu_ps(o + 16 * j0 + 16, o1);
                if (nj > 2) _mm512_storeu_ps(o + 16 * j0 + 32, o2);
                if (nj > 3) _mm512_storeu_ps(o + 16 * j0 + 48, o3);
            }
        }
    }
}
#endif

#if DAIR_ATTN_HAVE_AVX2
static inline __m256 dair_attn_ld8(const uint8_t *p, int f16) {
    return f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)) : _mm256_loadu_ps((const float *)p);
}

static void dair_attn_direct256(const dair_attn_args *a, const float *q, int kvh, int t0, int t1, float *sc,
                                float *acc, float *m, float *l) {
    const int G = a->G, hd = a->hd, nv = hd / 8, len = t1 - t0, f16 = a->kind == DAIR_KV_F16;
    const size_t esz = f16 ? 2 : 4, rb = a->row_bytes;
    const uint8_t *kb = a->k + (size_t)t0 * rb + (size_t)kvh * a->head_bytes;
    const uint8_t *vb = a->v + (size_t)t0 * rb + (size_t)kvh * a->head_bytes;
    const __m256 vs = _mm256_set1_ps(a->scale);
    for (int t = 0; t < len; t += 8) {
        int nr = len - t < 8 ? len - t : 8;
        for (int r = 0; r < nr; r++)
            for (size_t o = 0; o < a->head_bytes; o += 64)
                __builtin_prefetch(kb + (size_t)(t + r + 32) * rb + o, 0, 3);
        for (int g = 0; g < G; g++) {
            const float *qg = q + (size_t)g * hd;
            __m256 part[8];
            for (int r = 0; r < 8; r++) {
                __m256 s = _mm256_setzero_ps();
                if (r < nr) {
                    const uint8_t *kr = kb + (size_t)(t + r) * rb;
                    for (int j = 0; j < nv; j++)
                        s = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * j), dair_attn_ld8(kr + 8 * j * esz, f16), s);
                }
                part[r] = s;
            }
            __m256 r8 = _mm256_mul_ps(dair_reduce8x8(part), vs);
            float *dst = sc + (size_t)g * len + t;
            if (nr == 8) {
                _mm256_storeu_ps(dst, r8);
            } else {
                float tmp8[8];
                _mm256_storeu_ps(tmp8, r8);
                memcpy(dst, tmp8, sizeof(float) * (size_t)nr);
            }
        }
    }
    for (int g = 0; g < G; g++) {
        float *s = sc + (size_t)g * len, mx = -INFINITY;
        for (int t = 0; t < len; t++)
            mx = s[t] > mx ? s[t] : mx;
        m[g] = mx;
        l[g] = dair_attn_exp_sum(s, mx, len, DAIR_ATTN_AVX2);
    }
    for (int b0 = 0; b0 < len; b0 += 32) {
        int nr = len - b0 < 32 ? len - b0 : 32;
        for (int r = 0; r < nr; r++)
            for (size_t o = 0; o < a->head_bytes; o += 64)
                __builtin_prefetch(vb + (size_t)(b0 + r + 32) * rb + o, 0, 3);
        for (int g = 0; g < G; g++) {
            const float *pg = sc + (size_t)g * len + b0;
            float *o = acc + (size_t)g * hd;
            for (int j0 = 0; j0 < nv; j0 += 4) {
                int nj = nv - j0 < 4 ? nv - j0 : 4;
                __m256 o0 = _mm256_loadu_ps(o + 8 * j0), o1 = o0, o2 = o0, o3 = o0;
                if (nj > 1) o1 = _mm256_loadu_ps(o + 8 * j0 + 8);
                if (nj > 2) o2 = _mm256_loadu_ps(o + 8 * j0 + 16);
                if (nj > 3) o3 = _mm256_loadu_ps(o + 8 * j0 + 24);
                for (int r = 0; r < nr; r++) {
                    const uint8_t *vr = vb + (size_t)(b0 + r) * rb + 8 * (size_t)j0 * esz;
                    __m256 pp = _mm256_set1_ps(pg[r]);
                    o0 = _mm256_fmadd_ps(pp, dair_attn_ld8(vr, f16), o0);
                    if (nj > 1) o1 = _mm256_fmadd_ps(pp, dair_attn_ld8(vr + 8 * esz, f16), o1);
                    if (nj > 2) o2 = _mm256_fmadd_ps(pp, dair_attn_ld8(vr + 16 * esz, f16), o2);
                    if (nj > 3) o3 = _mm256_fmadd_ps(pp, dair_attn_ld8(vr + 24 * esz, f16), o3);
                }
                _mm256_storeu_ps(o + 8 * j0, o0);
                if (nj > 1) _mm256_storeu_ps(o + 8 * j0 + 8, o1);
                if (nj > 2) _mm256_storeu_ps(o + 8 * j0 + 16, o2);
                if (nj > 3) _mm256_storeu_ps(o + 8 * j0 + 24, o3);
            }
        }
    }
}
#endif

/* part = [G] max, [G] sum, [G][hd] unnormalised output. sc: G * DAIR_ATTN_SPAN floats;
 * kt: DAIR_ATTN_BC * hd floats. */
static void dair_attn_task_rows(const dair_attn_args *a, int i, int kvh, int t0, int t1, float *part, float *sc,
                                float *kt) {
    const int G = a->G, hd = a->hd, len = t1 - t0;
    const float *q = a->q + ((size_t)i * a->H + (size_t)kvh * G) * hd;
    float *m = part, *l = part + G, *acc = part + 2 * G;
    if (a->kind != DAIR_KV_Q8_0) {
#if DAIR_ATTN_HAVE_AVX512
        if (a->isa == DAIR_ATTN_AVX512 && hd % 16 == 0) {
            memset(acc, 0, sizeof(float) * (size_t)G * hd);
            dair_attn_direct512(a, q, kvh, t0, t1, sc, acc, m, l);
            return;
        }
#endif
#if DAIR_ATTN_HAVE_AVX2
        if (a->isa == DAIR_ATTN_AVX2 && hd % 8 == 0) {
            memset(acc, 0, sizeof(float) * (size_t)G * hd);
            dair_attn_direct256(a, q, kvh, t0, t1, sc, acc, m, l);
            return;
        }
#endif
    }
    dair_attn_scores_rows(a, q, kvh, t0, t1, sc, kt);
    for (int g = 0; g < G; g++) {
        float *s = sc + (size_t)g * len, mx = -INFINITY;
        for (int t = 0; t < len; t++)
            mx = s[t] > mx ? s[t] : mx;
        m[g] = mx;
        l[g] = dair_attn_exp_sum(s, mx, len, a->isa);
    }
    memset(acc, 0, sizeof(float) * (size_t)G * hd);
    dair_attn_values_rows(a, kvh, t0, t1, sc, acc, kt);
}

/* ---------------------------------------------------------------------------------------------
 * Lanes scheme (prefill), written once over a small vector vocabulary and instantiated per ISA.
 * Scratch per task (floats): QT hd*R, OT hd*R, S BC*R, K and V tiles BC*hd each, 4*R.
 */
#define DAIR_ATTN_DB 8 /* output dims per register block in the P.V update */

#define DAIR_ATTN_LANES_BODY                                                                                        \
    const int G = a->G, hd = a->hd, nq = a->n * G;                                                                \
    float *QT = scr, *OT = QT + (size_t)hd * R, *S = OT + (size_t)hd * R, *KT = S + (size_t)DAIR_ATTN_BC * R;    \
    float *VT = KT + (size_t)DAIR_ATTN_BC * hd, *posf = VT + (size_t)DAIR_ATTN_BC * hd, *M = posf + R;            \
    float *L = M + R, *AL = L + R;                                                                                \
    int rowof[R], headof[R], valid = 0, minpos = 0x7fffffff, maxpos = -1;                                         \
    for (int r = 0; r < R; r++) {                                                                                 \
        int idx = q0 + r < nq ? q0 + r : nq - 1; /* spare lanes repeat the last query */                           \
        if (q0 + r < nq)                                                                                          \
            valid = r + 1;                                                                                        \
        rowof[r] = idx / G;                                                                                       \
        headof[r] = kvh * G + idx % G;                                                                            \
        int p = a->pos[rowof[r]];                                                                                 \
        posf[r] = (float)p;                                                                                       \
        minpos = p < minpos ? p : minpos;                                                                         \
        maxpos = p > maxpos ? p : maxpos;                                                                         \
        const float *qr = a->q + ((size_t)rowof[r] * a->H + headof[r]) * hd;                                      \
        for (int d = 0; d < hd; d++)                                                                              \
            QT[(size_t)d * R + r] = qr[d] * a->scale;                                                             \
    }                                                                                                             \
    memset(OT, 0, sizeof(float) * (size_t)hd * R);                                                                \
    for (int r = 0; r < R; r++) {                                                                                 \
        M[r] = -INFINITY;                                                                                         \
        L[r] = 0.0f;                                                                                              \
    }                                                                                                             \
    VT_ const VT_ninf = VSET1(-INFINITY), VT_zero = VSET1(0.0f);                                                  \
    for (int t0 = 0; t0 <= maxpos; t0 += DAIR_ATTN_BC) {                                                          \
        int nt = maxpos + 1 - t0 < DAIR_ATTN_BC ? maxpos + 1 - t0 : DAIR_ATTN_BC;                                 \
        int ntp = (nt + 3) & ~3;                                                                                  \
        dair_attn_tile(a->k, a, kvh, t0, nt, ntp, KT);                                                            \
        dair_attn_tile(a->v, a, kvh, t0, nt, ntp, VT);                                                            \
        /* S[t][r] = K[t] . q_r, four keys at a time against both lane vectors */                                 \
        for (int t = 0; t < ntp; t += 4) {                                                                        \
            VT_ s00 = VT_zero, s01 = VT_zero, s10 = VT_zero, s11 = VT_zero;                                       \
            VT_ s20 = VT_zero, s21 = VT_zero, s30 = VT_zero, s31 = VT_zero;                                       \
            const float *k0 = KT + (size_t)t * hd, *k1 = k0 + hd, *k2 = k1 + hd, *k3 = k2 + hd;                    \
            for (int d = 0; d < hd; d++) {                                                                        \
                VT_ qa = VLOAD(QT + (size_t)d * R), qb = VLOAD(QT + (size_t)d * R + VL);                          \
                VT_ b0 = VSET1(k0[d]), b1 = VSET1(k1[d]), b2 = VSET1(k2[d]), b3 = VSET1(k3[d]);                   \
                s00 = VFMA(b0, qa, s00);                                                                          \
                s01 = VFMA(b0, qb, s01);                                                                          \
                s10 = VFMA(b1, qa, s10);                                                                          \
                s11 = VFMA(b1, qb, s11);                                                                          \
                s20 = VFMA(b2, qa, s20);                                                                          \
                s21 = VFMA(b2, qb, s21);                                                                          \
                s30 = VFMA(b3, qa, s30);                                                                          \
                s31 = VFMA(b3, qb, s31);                                                                          \
            }                                                                                                     \
            VSTORE(S + (size_t)t * R, s00);                                                                       \
            VSTORE(S + (size_t)t * R + VL, s01);                                                                  \
            VSTORE(S + (size_t)(t + 1) * R, s10);                                                                 \
            VSTORE(S + (size_t)(t + 1) * R + VL, s11);                                                            \
            VSTORE(S + (size_t)(t + 2) * R, s20);                                                                 \
            VSTORE(S + (size_t)(t + 2) * R + VL, s21);                                                            \
            VSTORE(S + (size_t)(t + 3) * R, s30);                                                                 \
            VSTORE(S + (size_t)(t + 3) * R + VL, s31);                                                            \
        }                                                                                                         \
        const int masked = t0 + ntp - 1 > minpos;                                                                 \
        for (int w = 0; w < 2; w++) {                                                                             \
            VT_ pv = VLOAD(posf + w * VL), mold = VLOAD(M + w * VL), mx = mold;                                   \
            for (int t = 0; t < ntp; t++) {                                                                       \
                VT_ s = VLOAD(S + (size_t)t * R + w * VL);                                                        \
                if (masked)                                                                                       \
                    s = VSEL_GT(VSET1((float)(t0 + t)), pv, VT_ninf, s);                                          \
                mx = VMAX(mx, s);                                                                                 \
            }                                                                                                     \
            VT_ alpha = VEXP(VSUB(mold, mx)), sum = VT_zero;                                                      \
            for (int t = 0; t < ntp; t++) {                                                                       \
                VT_ p = VEXP(VSUB(VLOAD(S + (size_t)t * R + w * VL), mx));                                        \
                if (masked)                                                                                       \
                    p = VSEL_GT(VSET1((float)(t0 + t)), pv, VT_zero, p);                                          \
                sum = VADD(sum, p);                                                                               \
                VSTORE(S + (size_t)t * R + w * VL, p);                                                            \
            }                                                                                                     \
            VSTORE(M + w * VL, mx);                                                                               \
            VSTORE(L + w * VL, VFMA(VLOAD(L + w * VL), alpha, sum));                                              \
            VSTORE(AL + w * VL, alpha);                                                                           \
        }                                                                                                         \
        /* OT[d][r] = OT[d][r] * alpha[r] + sum_t V[t][d] * P[t][r], DAIR_ATTN_DB dims at a time */              \
        VT_ al0 = VLOAD(AL), al1 = VLOAD(AL + VL);                                                                \
        int d0 = 0;                                                                                               \
        for (; d0 + DAIR_ATTN_DB <= hd; d0 += DAIR_ATTN_DB) {                                                     \
            VT_ o[DAIR_ATTN_DB][2];                                                                               \
            for (int u = 0; u < DAIR_ATTN_DB; u++) {                                                              \
                o[u][0] = VMUL(VLOAD(OT + (size_t)(d0 + u) * R), al0);                                            \
                o[u][1] = VMUL(VLOAD(OT + (size_t)(d0 + u) * R + VL), al1);                                       \
            }                                                                                                     \
            for (int t = 0; t < ntp; t++) {                                                                       \
                VT_ p0 = VLOAD(S + (size_t)t * R), p1 = VLOAD(S + (size_t)t * R + VL);                            \
                const float *vr = VT + (size_t)t * hd + d0;                                                       \
                for (int u = 0; u < DAIR_ATTN_DB; u++) {                                                          \
                    VT_ b = VSET1(vr[u]);                                                                         \
                    o[u][0] = VFMA(b, p0, o[u][0]);                                                               \
                    o[u][1] = VFMA(b, p1, o[u][1]);                                                               \
                }                                                                                                 \
            }                                                                                                     \
            for (int u = 0; u < DAIR_ATTN_DB; u++) {                                                              \
                VSTORE(OT + (size_t)(d0 + u) * R, o[u][0]);                                                       \
                VSTORE(OT + (size_t)(d0 + u) * R + VL, o[u][1]);                                                  \
            }                                                                                                     \
        }                                                                                                         \
        for (; d0 < hd; d0++) {                                                                                   \
            VT_ o0 = VMUL(VLOAD(OT + (size_t)d0 * R), al0), o1 = VMUL(VLOAD(OT + (size_t)d0 * R + VL), al1);      \
            for (int t = 0; t < ntp; t++) {                                                                       \
                VT_ b = VSET1(VT[(size_t)t * hd + d0]);                                                           \
                o0 = VFMA(b, VLOAD(S + (size_t)t * R), o0);                                                       \
                o1 = VFMA(b, VLOAD(S + (size_t)t * R + VL), o1);                                                  \
            }                                                                                                     \
            VSTORE(OT + (size_t)d0 * R, o0);                                                                      \
            VSTORE(OT + (size_t)d0 * R + VL, o1);                                                                 \
        }                                                                                                         \
    }                                                                                                             \
    for (int r = 0; r < valid; r++) {                                                                             \
        float inv = 1.0f / L[r];                                                                                  \
        float *o = a->out + ((size_t)rowof[r] * a->H + headof[r]) * hd;                                           \
        for (int d = 0; d < hd; d++)                                                                              \
            o[d] = OT[(size_t)d * R + r] * inv;                                                                   \
    }

#if DAIR_ATTN_HAVE_AVX512
#define R 32
#define VL 16
#define VT_ __m512
#define VSET1 _mm512_set1_ps
#define VLOAD _mm512_loadu_ps
#define VSTORE _mm512_storeu_ps
#define VFMA _mm512_fmadd_ps
#define VMUL _mm512_mul_ps
#define VADD _mm512_add_ps
#define VSUB _mm512_sub_ps
#define VMAX _mm512_max_ps
#define VEXP dair_exp512
#define VSEL_GT(a, b, x, y) _mm512_mask_blend_ps(_mm512_cmp_ps_mask((a), (b), _CMP_GT_OQ), (y), (x))
static void dair_attn_task_lanes512(const dair_attn_args *a, int kvh, int q0, float *scr) { DAIR_ATTN_LANES_BODY }
#undef R
#undef VL
#undef VT_
#undef VSET1
#undef VLOAD
#undef VSTORE
#undef VFMA
#undef VMUL
#undef VADD
#undef VSUB
#undef VMAX
#undef VEXP
#undef VSEL_GT
#endif

#if DAIR_ATTN_HAVE_AVX2
#define R 16
#define VL 8
#define VT_ __m256
#define VSET1 _mm256_set1_ps
#define VLOAD _mm256_loadu_ps
#define VSTORE _mm256_storeu_ps
#define VFMA _mm256_fmadd_ps
#define VMUL _mm256_mul_ps
#define VADD _mm256_add_ps
#define VSUB _mm256_sub_ps
#define VMAX _mm256_max_ps
#define VEXP dair_attn_exp256
#define VSEL_GT(a, b, x, y) _mm256_blendv_ps((y), (x), _mm256_cmp_ps((a), (b), _CMP_GT_OQ))
static void dair_attn_task_lanes256(const dair_attn_args *a, int kvh, int q0, float *scr) { DAIR_ATTN_LANES_BODY }
#undef R
#undef VL
#undef VT_
#undef VSET1
#undef VLOAD
#undef VSTORE
#undef VFMA
#undef VMUL
#undef VADD
#undef VSUB
#undef VMAX
#undef VEXP
#undef VSEL_GT
#endif

/* ---------------------------------------------------------------------------------------------
 * Planning and dispatch.
 */
enum { DAIR_ATTN_SCHEME_C = 0, DAIR_ATTN_SCHEME_ROWS = 1, DAIR_ATTN_SCHEME_LANES = 2 };

typedef struct {
    const dair_attn_args *a;
    int scheme, nch, ntask, R;
    int nspan;        /* rows scheme: spans per (row, kv head) (the longest row's) */
    size_t per;       /* scratch floats per chunk */
    size_t part_size; /* rows scheme: floats of one partial result */
    float *scratch, *parts;
} dair_attn_plan;

static void dair_attn_chunk(void *ctx, int c) {
    dair_attn_plan *p = (dair_attn_plan *)ctx;
#if defined(__SSE__)
    /* Flush subnormals to zero while this chunk runs: far from the maximum, softmax weights
     * (e^-87 and below) are subnormal, and a multiply-add touching one can take a microcode
     * assist of ~100 cycles on x86; Python processes run without FTZ/DAZ. */
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
#endif
    const dair_attn_args *a = p->a;
    float *scr = p->scratch + p->per * (size_t)c;
    /* tasks c, c + nch, ...: causal rows grow with position, so contiguous blocks would be unbalanced */
    for (int task = c; task < p->ntask; task += p->nch) {
        if (p->scheme == DAIR_ATTN_SCHEME_C) {
            int i = task / a->KV, kvh = task % a->KV;
            dair_attn_task_c(a, i, kvh, scr, scr + (size_t)a->G * (a->pos[i] + 1));
        } else if (p->scheme == DAIR_ATTN_SCHEME_ROWS) {
            int s = task % p->nspan, rk = task / p->nspan, i = rk / a->KV, kvh = rk % a->KV;
            int npos = a->pos[i] + 1, t0 = s * DAIR_ATTN_SPAN;
            float *part = p->parts + p->part_size * (size_t)task;
            if (t0 >= npos) {
                part[0] = -INFINITY; /* an empty span (a shorter row than the longest) */
                continue;
            }
            int t1 = t0 + DAIR_ATTN_SPAN < npos ? t0 + DAIR_ATTN_SPAN : npos;
            dair_attn_task_rows(a, i, kvh, t0, t1, part, scr, scr + (size_t)a->G * DAIR_ATTN_SPAN);
        } else {
            int nblk = (a->n * a->G + p->R - 1) / p->R, kvh = task / nblk, blk = task % nblk;
            (void)kvh;
            (void)blk; /* unused where neither SIMD path is compiled in */
#if DAIR_ATTN_HAVE_AVX512
            if (a->isa == DAIR_ATTN_AVX512)
                dair_attn_task_lanes512(a, kvh, blk * p->R, scr);
#endif
#if DAIR_ATTN_HAVE_AVX2
            if (a->isa == DAIR_ATTN_AVX2)
                dair_attn_task_lanes256(a, kvh, blk * p->R, scr);
#endif
        }
    }
#if defined(__SSE__)
    _mm_setcsr(csr);
#endif
}

/* The spans of each (row, kv head) into out: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s */
static void dair_attn_merge(const dair_attn_plan *p) {
    const dair_attn_args *a = p->a;
    const int G = a->G, hd = a->hd;
    for (int rk = 0; rk < a->n * a->KV; rk++) {
        int i = rk / a->KV, kvh = rk % a->KV;
        float *out = a->out + ((size_t)i * a->H + (size_t)kvh * G) * hd;
        for (int g = 0; g < G; g++) {
            float M = -INFINITY, L = 0.0f;
            for (int s = 0; s < p->nspan; s++) {
                const float *part = p->parts + p->part_size * (size_t)(rk * p->nspan + s);
                if (part[0] != -INFINITY && part[g] > M)
                    M = part[g];
            }
            float *o = out + (size_t)g * hd;
            memset(o, 0, sizeof(float) * (size_t)hd);
            for (int s = 0; s < p->nspan; s++) {
                const float *part = p->parts + p->part_size * (size_t)(rk * p->nspan + s);
                if (part[0] == -INFINITY)
                    continue;
                float w = expf(part[g] - M);
                L += w * part[G + g];
                const float *acc = part + 2 * G + (size_t)g * hd;
                for (int j = 0; j < hd; j++)
                    o[j] += w * acc[j];
            }
            float inv = 1.0f / L;
            for (int j = 0; j < hd; j++)
                o[j] *= inv;
        }
    }
}

/* Scratch kept between calls: a fresh allocation of this size is an mmap whose pages fault
 * in on every call, which cost more than a decode step's attention itself. A concurrent call
 * (another Python thread) allocates its own. */
static pthread_mutex_t dair_attn_scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static float *dair_attn_scratch_buf = NULL;
static size_t dair_attn_scratch_n = 0;

static float *dair_attn_scratch_get(size_t n, int *cached) {
    *cached = 0;
    if (pthread_mutex_trylock(&dair_attn_scratch_lock) != 0)
        return (float *)malloc(sizeof(float) * n);
    if (dair_attn_scratch_n < n) {
        free(dair_attn_scratch_buf);
        dair_attn_scratch_buf = (float *)malloc(sizeof(float) * n);
        dair_attn_scratch_n = dair_attn_scratch_buf != NULL ? n : 0;
    }
    if (dair_attn_scratch_buf == NULL) {
        pthread_mutex_unlock(&dair_attn_scratch_lock);
        return NULL;
    }
    *cached = 1;
    return dair_attn_scratch_buf;
}

static void dair_attn_scratch_put(float *p, int cached) {
    if (cached)
        pthread_mutex_unlock(&dair_attn_scratch_lock);
    else
        free(p);
}

/* Returns 0, or -1 when out of memory for the scratch. */
static int dair_attention(const dair_attn_args *a) {
    dair_attn_plan p;
    memset(&p, 0, sizeof(p));
    p.a = a;
    int maxpos = 0;
    double work = 0.0;
    for (int i = 0; i < a->n; i++) {
        maxpos = a->pos[i] > maxpos ? a->pos[i] : maxpos;
        work += a->pos[i] + 1.0;
    }
    const int nt = dair_pool_threads();
    const int VLq = a->isa == DAIR_ATTN_AVX512 ? 16 : 8;
    if (a->isa == DAIR_ATTN_C) {
        p.scheme = DAIR_ATTN_SCHEME_C;
        p.ntask = a->n * a->KV;
        p.per = (size_t)a->G * (maxpos + 1) + a->hd + 16;
    } else if (!a->lanes || a->n * a->G < VLq) {
        /* Each row on its own, in spans fixed by absolute position and merged in order: a row's
         * result is then bit-identical whether it is decoded alone or prefilled in a batch of any
         * size, on any thread count. Replaying a session's history after a failover or a bus
         * restart (one prefill) must give the tokens its decode steps gave, so this is the default;
         * the lanes scheme below (one query per SIMD lane) is faster for long prompts but sums in
         * another order. */
        p.scheme = DAIR_ATTN_SCHEME_ROWS;
        p.nspan = maxpos / DAIR_ATTN_SPAN + 1;
        p.ntask = a->n * a->KV * p.nspan;
        p.part_size = (size_t)a->G * (2 + a->hd);
        p.per = (size_t)a->G * DAIR_ATTN_SPAN + (size_t)DAIR_ATTN_BC * a->hd + 16;
    } else {
        p.scheme = DAIR_ATTN_SCHEME_LANES;
        p.R = 2 * VLq;
        p.ntask = a->KV * ((a->n * a->G + p.R - 1) / p.R);
        p.per = (size_t)a->hd * p.R * 2 + (size_t)DAIR_ATTN_BC * p.R + (size_t)DAIR_ATTN_BC * a->hd * 2 +
                5 * (size_t)p.R + 16;
    }
    /* a chunk should be worth ~32k multiply-adds: claiming one costs ~0.1 us */
    double want = nt <= 1 ? 1.0 : work * a->H * a->hd * 2.0 / 32768.0;
    if (want > 8.0 * nt)
        want = 8.0 * nt;
    if (want > p.ntask)
        want = p.ntask;
    p.nch = want < 1.0 ? 1 : (int)want;
    /* partial results of the rows scheme after the chunks' scratch */
    size_t nparts = p.scheme == DAIR_ATTN_SCHEME_ROWS ? p.part_size * (size_t)p.ntask : 0;
    int cached;
    p.scratch = dair_attn_scratch_get(p.per * (size_t)p.nch + nparts, &cached);
    if (p.scratch == NULL)
        return -1;
    p.parts = p.scratch + p.per * (size_t)p.nch;
    dair_parallel_for(p.nch, dair_attn_chunk, &p);
    if (p.scheme == DAIR_ATTN_SCHEME_ROWS)
        dair_attn_merge(&p);
    dair_attn_scratch_put(p.scratch, cached);
    return 0;
}

#endif
