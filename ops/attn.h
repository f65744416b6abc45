/* Causal grouped-query attention of new query rows against a KV cache.
 *
 * Cache rows are positions; a row holds the n_kv heads of hd values each, stored as
 * f32, f16 or GGUF Q8_0 blocks (fp16 scale + 32 int8, 34 bytes per 32 values, as llama.cpp's
 * -ctk q8_0). Query row i attends to positions lo..pos[i], lo = 0 or, with a sliding window w,
 * pos[i] - w + 1 (gemma3's local layers).
 *
 * One arithmetic for every row, whatever the batch: keys are cut into spans of DAIR_ATTN_SPAN
 * positions fixed by absolute position; per (row, kv head, span) the G query heads of that kv
 * head get the span's scores (q.k summed down the SIMD lanes, then across them by one fixed
 * tree), their max, exp and sum, and the probability-weighted values (summed key by key in
 * position order); the spans' partial softmaxes are merged in span order (flash-decoding). A
 * row's result is therefore bit-identical decoded alone or prefilled in a batch of any size, on
 * any thread count, which makes a replay of a session's history (failover, bus restart) give the
 * tokens its decode steps gave. The batch only changes how the work is shared:
 *  - decode (few rows): a task is one (row, span) over all kv heads, so both threads work on
 *    one token and the span's rows are read as one stream; the partials are merged after all
 *    tasks. On AVX2 the heads are visited together, key block by key block (dair_attn_rowkv),
 *    so the stream runs at the arithmetic's pace; AVX-512 visits them one after another.
 *  - prefill: a task is DAIR_ATTN_ROWS consecutive rows and one kv head, over all their spans;
 *    each tile of DAIR_ATTN_KB cached keys (then values) is converted to f32 once and used by
 *    all the rows' G heads, and the rows' partials are merged inside the task. On AVX-512 the
 *    key tile is also transposed (dims x keys), and the scores are made from it 16 keys a vector
 *    by the same operations as the per-key kernels' (dair_attn_dotsT).
 * Keys and values are read once per kv head per task. The per-row primitives (dots, pv, the
 * exp-sum, the merge) are each one non-inlined function, so decode and prefill run the same
 * instructions on a row. The plain-C path is the reference: per (row, kv head), all scores,
 * then one softmax.
 *
 * With an f16 cache the arithmetic is llama.cpp's (its default, non-flash CPU attention): there
 * K.q and P.V are matrix products with an f16 operand, for which ggml converts the f32 operand to
 * f16 first, so q is rounded to f16 before the dots and the normalised probabilities are rounded
 * to f16 before they weight the values. Rounding the probabilities needs the row's max and sum
 * over all its spans first: the spans are visited twice (scores, max and sum; then the rounded
 * probabilities and the weighted values, summed in span order). The decode scheme keeps its
 * scores for the second visit (a second parallel loop; when a row's spans all fall in one task,
 * one span or one chunk, both visits run in that task); a prefill task keeps them too when they
 * fit, else computes them again. Without this rounding llama.cpp's logits are matched 2-5x less
 * closely (README, Model families).
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

#define DAIR_ATTN_SPAN 256 /* key positions per partial softmax (fixed: it defines the arithmetic) */
#define DAIR_ATTN_KB 64    /* key positions converted to f32 at a time */
#define DAIR_ATTN_ROWS 16  /* query rows per prefill task (16: ~0.9x the time of 8, keys and values read half as often) */

#define DAIR_ATTN_NOINLINE __attribute__((noinline))
#define DAIR_ATTN_INLINE static inline __attribute__((always_inline))

typedef struct {
    const float *q;     /* [n][H][hd] */
    float *out;         /* [n][H][hd] */
    const int32_t *pos; /* [n] */
    const uint8_t *k, *v;
    int kind;           /* DAIR_KV_* */
    size_t row_bytes;   /* bytes of one cache position (all kv heads) */
    size_t head_bytes;  /* bytes of one kv head's hd values */
    int n, H, KV, G, hd;
    int window;         /* > 0: row i sees positions pos[i] - window + 1 .. pos[i] */
    int rot;            /* > 0: K and V are stored rotated by dair_attn_wht in blocks of rot values:
                           q is rotated alike first and the output rotated back */
    float scale;
    int isa;            /* DAIR_ATTN_*, already checked to be compiled in */
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

/* x rounded to the nearest f16 (ties to even), as f32 */
static inline float dair_attn_round16(float x) {
#if defined(__F16C__)
    /* f16 subnormals (below 2^-14: multiples of 2^-24) by arithmetic: a conversion that makes
     * one takes a microcode assist of ~100 cycles, and most small probabilities are such */
    if (fabsf(x) < 6.103515625e-05f)
        return __builtin_rintf(x * 16777216.0f) * 5.9604644775390625e-08f;
    return _cvtsh_ss(_cvtss_sh(x, 0));
#elif defined(__aarch64__)
    return (float)(__fp16)x;
#else
    uint32_t b, r;
    memcpy(&b, &x, 4);
    const uint32_t sign = b & 0x80000000u, a = b & 0x7fffffffu;
    if (a >= 0x7f800000u)
        return x;                                      /* inf, nan */
    if (a >= 0x477ff000u) {
        r = 0x7f800000u;                               /* past 65504 + half an ulp: inf */
    } else if (a >= 0x38800000u) {
        r = (a + 0x0fffu + ((a >> 13) & 1u)) & ~0x1fffu; /* normal: 10 mantissa bits */
    } else if (a <= 0x33000000u) {
        r = 0;                                         /* at most half the smallest subnormal */
    } else {                                           /* subnormal: a multiple of 2^-24 */
        const int sh = 126 - (int)(a >> 23);
        const uint32_t m = (a & 0x7fffffu) | 0x800000u, rem = m & ((1u << sh) - 1), half = 1u << (sh - 1);
        uint32_t q = m >> sh;
        q += rem > half || (rem == half && (q & 1u));
        const float f = (float)q * 5.9604644775390625e-8f;
        memcpy(&r, &f, 4);
    }
    r |= sign;
    float out;
    memcpy(&out, &r, 4);
    return out;
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

#ifndef DAIR_ATTN_PF
#define DAIR_ATTN_PF 16 /* rows prefetched ahead */
#endif
#ifndef DAIR_ATTN_PF_HINT
#define DAIR_ATTN_PF_HINT 3
#endif

/* x[0..blk) times the orthonormal Walsh-Hadamard matrix (blk a power of two), in place. The
 * matrix is symmetric and its own inverse, so rotating keys and queries keeps q.k, and rotating
 * a sum of rotated values gives the sum. */
static void dair_attn_wht(float *x, int blk) {
    for (int h = 1; h < blk; h *= 2)
        for (int i = 0; i < blk; i += 2 * h)
            for (int j = i; j < i + h; j++) {
                const float u = x[j], w = x[j + h];
                x[j] = u + w;
                x[j + h] = u - w;
            }
    const float norm = (float)(1.0 / sqrt((double)blk));
    for (int j = 0; j < blk; j++)
        x[j] *= norm;
}

/* Rows t0..t0+nt-1 of kv head kvh (cache `base`) into dst[nt][hd] as f32: one loop per cache
 * type and ISA, the conversion inlined (per row it is a few instructions, less than a call). */
DAIR_ATTN_INLINE void dair_attn_convert(const uint8_t *src, size_t rb, int kind, int hd, int nt, float *dst, int isa) {
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512 && kind == DAIR_KV_F16 && hd % 16 == 0) {
        for (int t = 0; t < nt; t++, src += rb, dst += hd)
            for (int j = 0; j < hd; j += 16)
                _mm512_storeu_ps(dst + j, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + 2 * (size_t)j))));
        return;
    }
    if (isa == DAIR_ATTN_AVX512 && kind == DAIR_KV_Q8_0) {
        for (int t = 0; t < nt; t++, src += rb, dst += hd) {
            const uint8_t *b = src;
            for (int j = 0; j < hd; j += 32, b += 34) {
                uint16_t h;
                memcpy(&h, b, 2);
                const __m512 d = _mm512_set1_ps(dair_attn_h2f(h));
                _mm512_storeu_ps(dst + j, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                              _mm_loadu_si128((const __m128i *)(b + 2))))));
                _mm512_storeu_ps(dst + j + 16, _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                                   _mm_loadu_si128((const __m128i *)(b + 18))))));
            }
        }
        return;
    }
#endif
#if DAIR_ATTN_HAVE_AVX2
    if (isa == DAIR_ATTN_AVX2 && kind == DAIR_KV_F16 && hd % 8 == 0) {
        for (int t = 0; t < nt; t++, src += rb, dst += hd)
            for (int j = 0; j < hd; j += 8)
                _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * (size_t)j))));
        return;
    }
    if (isa == DAIR_ATTN_AVX2 && kind == DAIR_KV_Q8_0) {
        for (int t = 0; t < nt; t++, src += rb, dst += hd) {
            const uint8_t *b = src;
            for (int j = 0; j < hd; j += 32, b += 34) {
                uint16_t h;
                memcpy(&h, b, 2);
                const __m256 d = _mm256_set1_ps(dair_attn_h2f(h));
                for (int u = 0; u < 4; u++)
                    _mm256_storeu_ps(dst + j + 8 * u, _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                                                       _mm_loadl_epi64((const __m128i *)(b + 2 + 8 * u))))));
            }
        }
        return;
    }
#endif
    if (kind == DAIR_KV_F32) {
        for (int t = 0; t < nt; t++, src += rb, dst += hd)
            memcpy(dst, src, sizeof(float) * (size_t)hd);
        return;
    }
    for (int t = 0; t < nt; t++, src += rb, dst += hd)
        dair_attn_row(src, kind, hd, dst, isa);
}

/* Rows t0..t0+nt-1 of kv head kvh into dst[nt][hd] (f32), prefetching ahead: between two visits
 * of a layer's cache a decode step streams every other layer's weights, so the cache is rarely
 * still in the CPU's caches. With pf_end > 0 whole rows (every kv head) of both K and V are
 * prefetched, up to row pf_end: a decode task reads all kv heads of its span, so one contiguous
 * stream per cache, started by its first head, serves the others from L2. */
static void dair_attn_tile(const uint8_t *base, const dair_attn_args *a, int kvh, int t0, int nt, float *dst,
                           int pf_end) {
    const size_t rb = a->row_bytes;
    const uint8_t *src = base + (size_t)t0 * rb + (size_t)kvh * a->head_bytes;
    if (pf_end > 0) {
        const int from = t0 % DAIR_ATTN_SPAN == 0 ? t0 : t0 + DAIR_ATTN_PF; /* a span's first rows too */
        const int to = t0 + nt + DAIR_ATTN_PF < pf_end ? t0 + nt + DAIR_ATTN_PF : pf_end;
        for (int r = from; r < to; r++)
            for (size_t o = 0; o < rb; o += 64) {
                __builtin_prefetch(a->k + (size_t)r * rb + o, 0, DAIR_ATTN_PF_HINT);
                __builtin_prefetch(a->v + (size_t)r * rb + o, 0, DAIR_ATTN_PF_HINT);
            }
    } else {
        /* the next tile (tiles are read in position order): its rows arrive while this one's are
         * used by every row of the task, instead of stalling the conversion below */
        for (int r = 0; r < nt; r++)
            for (size_t o = 0; o < a->head_bytes; o += 64)
                __builtin_prefetch(src + (size_t)(r + nt) * rb + o, 0, DAIR_ATTN_PF_HINT);
    }
    dair_attn_convert(src, rb, a->kind, a->hd, nt, dst, a->isa);
}

/* ---------------------------------------------------------------------------------------------
 * Plain C reference: task = (row i, kv head). sc holds G * (pos + 1) scores, tmp hd floats.
 */
static void dair_attn_task_c(const dair_attn_args *a, int i, int kvh, float *sc, float *tmp) {
    const int G = a->G, hd = a->hd, p = a->pos[i];
    const int lo = a->window > 0 && p - a->window + 1 > 0 ? p - a->window + 1 : 0, npos = p + 1 - lo;
    const float *q = a->q + ((size_t)i * a->H + (size_t)kvh * G) * hd;
    float *out = a->out + ((size_t)i * a->H + (size_t)kvh * G) * hd;
    const size_t off = (size_t)kvh * a->head_bytes;
    for (int t = 0; t < npos; t++) {
        dair_attn_row_c(a->k + (size_t)(lo + t) * a->row_bytes + off, a->kind, hd, tmp);
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
        if (a->kind == DAIR_KV_F16) {
            const float inv = 1.0f / sum;
            for (int t = 0; t < npos; t++)
                s[t] = dair_attn_round16(s[t] * inv);
        } else {
            for (int t = 0; t < npos; t++)
                s[t] /= sum;
        }
    }
    memset(out, 0, sizeof(float) * (size_t)G * hd);
    for (int t = 0; t < npos; t++) {
        dair_attn_row_c(a->v + (size_t)(lo + t) * a->row_bytes + off, a->kind, hd, tmp);
        for (int g = 0; g < G; g++) {
            float pr = sc[(size_t)g * npos + t];
            for (int j = 0; j < hd; j++)
                out[(size_t)g * hd + j] += pr * tmp[j];
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Per-row primitives of the SIMD paths (see the top of this file: one function each).
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
    __m256 n;
    const __m256 p = dair_exp256_poly(x, &n);
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_andnot_ps(small, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

/* s[t] = exp(s[t] - mx), returns the sum */
static DAIR_ATTN_NOINLINE float dair_attn_exp_sum(float *s, float mx, int len, int isa) {
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


/* s[t] = round16(exp(s[t] - mx) * inv): a row's probabilities over the span, normalised by the
 * row's max mx and 1 / sum inv, rounded as llama.cpp rounds them for the f16 values */
static DAIR_ATTN_NOINLINE void dair_attn_probs16(float *s, float mx, float inv, int len, int isa) {
    dair_attn_exp_sum(s, mx, len, isa);
    int t = 0;
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512) {
        /* as dair_attn_round16: values below 2^-14 rounded to multiples of 2^-24 by arithmetic,
         * the others converted (never an f16 subnormal out of the converter) */
        const __m512 vi = _mm512_set1_ps(inv), lo = _mm512_set1_ps(6.103515625e-05f);
        const __m512 up = _mm512_set1_ps(16777216.0f), down = _mm512_set1_ps(5.9604644775390625e-08f);
        for (; t + 16 <= len; t += 16) {
            const __m512 v = _mm512_mul_ps(_mm512_loadu_ps(s + t), vi);
            const __m512 n = _mm512_cvtph_ps(_mm512_cvtps_ph(_mm512_max_ps(v, lo), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            const __m512 sub = _mm512_mul_ps(_mm512_roundscale_ps(_mm512_mul_ps(v, up), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), down);
            _mm512_storeu_ps(s + t, _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, lo, _CMP_LT_OQ), n, sub));
        }
    }
#endif
#if DAIR_ATTN_HAVE_AVX2
    if (isa == DAIR_ATTN_AVX2) {
        const __m256 vi = _mm256_set1_ps(inv), lo = _mm256_set1_ps(6.103515625e-05f);
        const __m256 up = _mm256_set1_ps(16777216.0f), down = _mm256_set1_ps(5.9604644775390625e-08f);
        for (; t + 8 <= len; t += 8) {
            const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(s + t), vi);
            const __m256 n = _mm256_cvtph_ps(_mm256_cvtps_ph(_mm256_max_ps(v, lo), _MM_FROUND_TO_NEAREST_INT));
            const __m256 sub = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(v, up), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), down);
            _mm256_storeu_ps(s + t, _mm256_blendv_ps(n, sub, _mm256_cmp_ps(v, lo, _CMP_LT_OQ)));
        }
    }
#endif
    (void)isa;
    for (; t < len; t++)
        s[t] = dair_attn_round16(s[t] * inv);
}

/* s[t] = (q . kt[t]) * scale for t < nt; kt: nt rows of hd floats. */
#if DAIR_ATTN_HAVE_AVX512
DAIR_ATTN_INLINE void dair_attn_dots512(const float *q, const float *kt, int nt, int hd, int nv, float scale,
                                        float *s) {
    __m512 qv[16];
    const int held = nv <= 16;
    for (int j = 0; held && j < nv; j++)
        qv[j] = _mm512_loadu_ps(q + 16 * j);
#define DAIR_Q512(j) (held ? qv[(j) & 15] : _mm512_loadu_ps(q + 16 * (j)))
    const __m512 vs = _mm512_set1_ps(scale);
    int t = 0;
    for (; t + 16 <= nt; t += 16) {
        __m512 part[16];
#pragma GCC unroll 16
        for (int r = 0; r < 16; r++) {
            const float *kr = kt + (size_t)(t + r) * hd;
            __m512 acc = _mm512_mul_ps(DAIR_Q512(0), _mm512_loadu_ps(kr));
            for (int j = 1; j < nv; j++)
                acc = _mm512_fmadd_ps(DAIR_Q512(j), _mm512_loadu_ps(kr + 16 * j), acc);
            part[r] = acc;
        }
        _mm512_storeu_ps(s + t, _mm512_mul_ps(dair_reduce16x16(part), vs));
    }
    if (t < nt) {
        const int m = nt - t;
        __m512 part[16];
        for (int r = 0; r < 16; r++) {
            __m512 acc = _mm512_setzero_ps();
            if (r < m) {
                const float *kr = kt + (size_t)(t + r) * hd;
                acc = _mm512_mul_ps(DAIR_Q512(0), _mm512_loadu_ps(kr));
                for (int j = 1; j < nv; j++)
                    acc = _mm512_fmadd_ps(DAIR_Q512(j), _mm512_loadu_ps(kr + 16 * j), acc);
            }
            part[r] = acc;
        }
        _mm512_mask_storeu_ps(s + t, (__mmask16)((1u << m) - 1), _mm512_mul_ps(dair_reduce16x16(part), vs));
    }
#undef DAIR_Q512
}
#endif

#if DAIR_ATTN_HAVE_AVX2
DAIR_ATTN_INLINE void dair_attn_dots256(const float *q, const float *kt, int nt, int hd, int nv, float scale,
                                        float *s) {
    __m256 qv[16];
    const int held = nv <= 16;
    for (int j = 0; held && j < nv; j++)
        qv[j] = _mm256_loadu_ps(q + 8 * j);
#define DAIR_Q256(j) (held ? qv[(j) & 15] : _mm256_loadu_ps(q + 8 * (j)))
    const __m256 vs = _mm256_set1_ps(scale);
    for (int t = 0; t < nt; t += 8) {
        const int m = nt - t < 8 ? nt - t : 8;
        __m256 part[8];
        if (m == 8) {
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) {
                const float *kr = kt + (size_t)(t + r) * hd;
                __m256 acc = _mm256_mul_ps(DAIR_Q256(0), _mm256_loadu_ps(kr));
                for (int j = 1; j < nv; j++)
                    acc = _mm256_fmadd_ps(DAIR_Q256(j), _mm256_loadu_ps(kr + 8 * j), acc);
                part[r] = acc;
            }
            _mm256_storeu_ps(s + t, _mm256_mul_ps(dair_reduce8x8(part), vs));
            continue;
        }
        for (int r = 0; r < 8; r++) {
            __m256 acc = _mm256_setzero_ps();
            if (r < m) {
                const float *kr = kt + (size_t)(t + r) * hd;
                acc = _mm256_mul_ps(DAIR_Q256(0), _mm256_loadu_ps(kr));
                for (int j = 1; j < nv; j++)
                    acc = _mm256_fmadd_ps(DAIR_Q256(j), _mm256_loadu_ps(kr + 8 * j), acc);
            }
            part[r] = acc;
        }
        float tmp8[8];
        _mm256_storeu_ps(tmp8, _mm256_mul_ps(dair_reduce8x8(part), vs));
        memcpy(s + t, tmp8, sizeof(float) * (size_t)m);
    }
#undef DAIR_Q256
}
#endif

static DAIR_ATTN_NOINLINE void dair_attn_dots(const float *q, const float *kt, int nt, int hd, float scale, float *s,
                                              int isa) {
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512 && hd % 16 == 0) {
        if (hd == 64)
            dair_attn_dots512(q, kt, nt, 64, 4, scale, s);
        else if (hd == 128)
            dair_attn_dots512(q, kt, nt, 128, 8, scale, s);
        else if (hd == 256)
            dair_attn_dots512(q, kt, nt, 256, 16, scale, s);
        else
            dair_attn_dots512(q, kt, nt, hd, hd / 16, scale, s);
        return;
    }
#endif
#if DAIR_ATTN_HAVE_AVX2
    if (isa == DAIR_ATTN_AVX2 && hd % 8 == 0) {
        if (hd == 64)
            dair_attn_dots256(q, kt, nt, 64, 8, scale, s);
        else if (hd == 128)
            dair_attn_dots256(q, kt, nt, 128, 16, scale, s);
        else
            dair_attn_dots256(q, kt, nt, hd, hd / 8, scale, s);
        return;
    }
#endif
    (void)isa;
    for (int t = 0; t < nt; t++) {
        const float *kr = kt + (size_t)t * hd;
        float acc = 0.0f;
        for (int j = 0; j < hd; j++)
            acc += q[j] * kr[j];
        s[t] = acc * scale;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Scores from a transposed key tile: kT[d * DAIR_ATTN_KB + t] holds dim d of tile key t, so one
 * vector holds one dim of 16 keys. dair_attn_dots512 makes, per key, 16 lane sums
 * P_l = q[l] k[l], then + q[16j + l] k[16j + l] for j = 1.. in order (fmadd), and then adds the
 * lanes by dair_reduce16x16's tree:
 *   ((((P0+P8)+(P4+P12))+((P2+P10)+(P6+P14)))+(((P1+P9)+(P5+P13))+((P3+P11)+(P7+P15))))
 * (its shuffle levels pair lanes l, l+8, then l, l+4, then l, l+2, then l, l+1). Here the lanes
 * are keys: P_l is a vector of 16 keys' lane-l sums, made by the same multiply-adds in the same
 * order with q[16j + l] broadcast, and the tree is 15 vertical adds. Each key's score is thus
 * the same bits as dair_attn_dots (and the decode kernels) give, without the transposing
 * shuffles per key and head, and each loaded key vector serves two queries. AVX2 keeps
 * dair_attn_dots256: the same scheme there (8 lanes, dair_reduce8x8's tree
 * ((P0+P1)+(P2+P3))+((P4+P5)+(P6+P7)), bit-identical too) took ~1.1x its time, with 16 registers
 * and no broadcast operand every multiply-add loads one more value.
 */
/* x as the compiler must take it, computed: the build's -ffast-math lets it reassociate vector
 * adds written with the intrinsics (and contract a multiply and an add into one FMA), which
 * would change the tree's bits; a shuffle between them, as in dair_reduce16x16, stops that */
#define DAIR_ATTN_OPAQUE(x) __asm__("" : "+v"(x))

#if DAIR_ATTN_HAVE_AVX512
/* The lane-class sum P_l for NQ queries and NC vectors of 16 keys (from key vector c0). */
#define DAIR_QKT512_CLASS(l, dst)                                                                     \
    do {                                                                                              \
        for (int j = 0; j < nv; j++) {                                                                \
            const float *kr = kT + (size_t)(16 * j + (l)) * DAIR_ATTN_KB + 16 * c0;                   \
            __m512 kv[2];                                                                             \
            for (int c = 0; c < NC; c++)                                                              \
                kv[c] = _mm512_load_ps(kr + 16 * c);                                                  \
            for (int r = 0; r < NQ; r++) {                                                            \
                const __m512 qb = _mm512_set1_ps(q[r][16 * j + (l)]);                                 \
                for (int c = 0; c < NC; c++)                                                          \
                    dst[r][c] = j == 0 ? _mm512_mul_ps(qb, kv[c]) : _mm512_fmadd_ps(qb, kv[c], dst[r][c]); \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < NQ; r++)                                                                  \
            for (int c = 0; c < NC; c++)                                                              \
                DAIR_ATTN_OPAQUE(dst[r][c]);                                                          \
    } while (0)

DAIR_ATTN_INLINE void dair_attn_qkT512(const float *const *q, const float *kT, int c0, int nv, int NQ, int NC,
                                       __m512 out[2][2]) {
    __m512 A[2][2], B[2][2];
    /* quarters m = 0, 2, 1, 3 of the tree: ((P_m + P_m+8) + (P_m+4 + P_m+12)) */
#pragma GCC unroll 4
    for (int qi = 0; qi < 4; qi++) {
        const int m = qi == 0 ? 0 : qi == 1 ? 2 : qi == 2 ? 1 : 3;
        __m512 p0[2][2], p8[2][2], p4[2][2], p12[2][2];
        DAIR_QKT512_CLASS(m, p0);
        DAIR_QKT512_CLASS(m + 8, p8);
        DAIR_QKT512_CLASS(m + 4, p4);
        DAIR_QKT512_CLASS(m + 12, p12);
        for (int r = 0; r < NQ; r++)
            for (int c = 0; c < NC; c++) {
                __m512 a = _mm512_add_ps(p0[r][c], p8[r][c]), b = _mm512_add_ps(p4[r][c], p12[r][c]);
                DAIR_ATTN_OPAQUE(a);
                DAIR_ATTN_OPAQUE(b);
                __m512 l2 = _mm512_add_ps(a, b);
                DAIR_ATTN_OPAQUE(l2);
                if (qi == 0) {
                    A[r][c] = l2;
                } else if (qi == 1) {
                    A[r][c] = _mm512_add_ps(A[r][c], l2);
                    DAIR_ATTN_OPAQUE(A[r][c]);
                } else if (qi == 2) {
                    B[r][c] = l2;
                } else {
                    __m512 h = _mm512_add_ps(B[r][c], l2);
                    DAIR_ATTN_OPAQUE(h);
                    out[r][c] = _mm512_add_ps(A[r][c], h);
                    DAIR_ATTN_OPAQUE(out[r][c]);
                }
            }
    }
}
#undef DAIR_QKT512_CLASS
#endif


/* Keys [x[r], y[r]) of the tile (x < y <= KB) scored for nq (1 or 2) queries q[r]:
 * s[r][t] = (q[r] . key t) * scale, as dair_attn_dots. kT: the transposed tile. */
DAIR_ATTN_INLINE void dair_attn_dotsT_n(const float *const *q, const float *kT, int hd, int nv, float scale,
                                        float *const *s, const int *x, const int *y, int nq, int isa) {
    const int lo = nq == 2 && x[1] < x[0] ? x[1] : x[0], hi = nq == 2 && y[1] > y[0] ? y[1] : y[0];
    (void)hd;
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512) {
        const __m512 vs = _mm512_set1_ps(scale);
        for (int c0 = lo / 16; 16 * c0 < hi; c0 += 2) {
            const int nc = 16 * (c0 + 1) < hi ? 2 : 1;
            __m512 out[2][2];
            if (nq == 2 && nc == 2)
                dair_attn_qkT512(q, kT, c0, nv, 2, 2, out);
            else if (nq == 2)
                dair_attn_qkT512(q, kT, c0, nv, 2, 1, out);
            else if (nc == 2)
                dair_attn_qkT512(q, kT, c0, nv, 1, 2, out);
            else
                dair_attn_qkT512(q, kT, c0, nv, 1, 1, out);
            for (int r = 0; r < nq; r++)
                for (int c = 0; c < nc; c++) {
                    const int t = 16 * (c0 + c);
                    const int b = x[r] > t ? x[r] - t : 0, e = y[r] < t + 16 ? y[r] - t : 16;
                    if (e > b)
                        _mm512_mask_storeu_ps(s[r] + t, (__mmask16)(((1u << e) - 1) & ~((1u << b) - 1)),
                                              _mm512_mul_ps(out[r][c], vs));
                }
        }
        return;
    }
#endif
    (void)q, (void)kT, (void)nv, (void)scale, (void)s, (void)lo, (void)hi, (void)isa;
}

/* whether this ISA and head size score from a transposed tile (dair_attn_dotsT) */
static inline int dair_attn_transposed(int isa, int hd) {
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512)
        return hd % 16 == 0;
#endif
    (void)isa, (void)hd;
    return 0;
}

/* noclone: a copy specialised to the call sites' constants (GCC 12) ran ~1.3x the time */
static DAIR_ATTN_NOINLINE __attribute__((noclone)) void dair_attn_dotsT(const float *const *q, const float *kT, int hd, float scale,
                                               float *const *s, const int *x, const int *y, int nq, int isa) {
    if (hd == 64)
        dair_attn_dotsT_n(q, kT, 64, 4, scale, s, x, y, nq, isa);
    else if (hd == 128)
        dair_attn_dotsT_n(q, kT, 128, 8, scale, s, x, y, nq, isa);
    else
        dair_attn_dotsT_n(q, kT, hd, hd / 16, scale, s, x, y, nq, isa);
}

/* rows [0, nt) of the row-major tile kt[nt][hd] into kT[hd][KB] (keys nt.. of each vector the
 * transposed tile holds: zeros) */
static DAIR_ATTN_NOINLINE void dair_attn_transpose(const float *kt, int nt, int hd, float *kT, int isa) {
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512) {
        for (int t0 = 0; t0 < nt; t0 += 16)
            for (int d0 = 0; d0 < hd; d0 += 16) {
                __m512 r[16], u[16];
                for (int i = 0; i < 16; i++)
                    r[i] = t0 + i < nt ? _mm512_loadu_ps(kt + (size_t)(t0 + i) * hd + d0) : _mm512_setzero_ps();
                for (int i = 0; i < 16; i += 2) {
                    u[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
                    u[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
                }
                for (int i = 0; i < 16; i += 4) { /* u[i + k]: dims k, k+4, k+8, k+12 of rows i..i+3 */
                    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(u[i]), _mm512_castps_pd(u[i + 2])));
                    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(u[i]), _mm512_castps_pd(u[i + 2])));
                    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(u[i + 1]), _mm512_castps_pd(u[i + 3])));
                    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(u[i + 1]), _mm512_castps_pd(u[i + 3])));
                }
                for (int k = 0; k < 4; k++) {
                    const __m512 v0 = _mm512_shuffle_f32x4(r[k], r[4 + k], _MM_SHUFFLE(2, 0, 2, 0));
                    const __m512 v1 = _mm512_shuffle_f32x4(r[k], r[4 + k], _MM_SHUFFLE(3, 1, 3, 1));
                    const __m512 w0 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(2, 0, 2, 0));
                    const __m512 w1 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], _MM_SHUFFLE(3, 1, 3, 1));
                    float *o = kT + (size_t)(d0 + k) * DAIR_ATTN_KB + t0;
                    _mm512_store_ps(o, _mm512_shuffle_f32x4(v0, w0, _MM_SHUFFLE(2, 0, 2, 0)));
                    _mm512_store_ps(o + 4 * DAIR_ATTN_KB, _mm512_shuffle_f32x4(v1, w1, _MM_SHUFFLE(2, 0, 2, 0)));
                    _mm512_store_ps(o + 8 * DAIR_ATTN_KB, _mm512_shuffle_f32x4(v0, w0, _MM_SHUFFLE(3, 1, 3, 1)));
                    _mm512_store_ps(o + 12 * DAIR_ATTN_KB, _mm512_shuffle_f32x4(v1, w1, _MM_SHUFFLE(3, 1, 3, 1)));
                }
            }
        return;
    }
#endif
    (void)kt, (void)nt, (void)hd, (void)kT, (void)isa;
}

/* acc[g][d] += sum_t p[g * ps + t] * vt[t][d] for the G heads, t = 0..nt-1 in order (one
 * multiply-add per key and dim, so how keys are grouped into calls does not change a bit).
 * Heads go three at a time over DB vectors of dims, each value vector loaded once for them. */
#if DAIR_ATTN_HAVE_AVX512
DAIR_ATTN_INLINE void dair_attn_pv512(const float *vt, int nt, int hd, const float *p, size_t ps, float *acc, int ng,
                                      int nb, int d0) {
    __m512 o[3][4];
    for (int g = 0; g < ng; g++)
        for (int b = 0; b < nb; b++)
            o[g][b] = _mm512_loadu_ps(acc + (size_t)g * hd + d0 + 16 * b);
    for (int t = 0; t < nt; t++) {
        const float *vr = vt + (size_t)t * hd + d0;
        __m512 v[4];
        for (int b = 0; b < nb; b++)
            v[b] = _mm512_loadu_ps(vr + 16 * b);
        for (int g = 0; g < ng; g++) {
            __m512 pp = _mm512_set1_ps(p[(size_t)g * ps + t]);
            for (int b = 0; b < nb; b++)
                o[g][b] = _mm512_fmadd_ps(pp, v[b], o[g][b]);
        }
    }
    for (int g = 0; g < ng; g++)
        for (int b = 0; b < nb; b++)
            _mm512_storeu_ps(acc + (size_t)g * hd + d0 + 16 * b, o[g][b]);
}
#endif

#if DAIR_ATTN_HAVE_AVX2
DAIR_ATTN_INLINE void dair_attn_pv256(const float *vt, int nt, int hd, const float *p, size_t ps, float *acc, int ng,
                                      int nb, int d0) {
    __m256 o[3][4];
    for (int g = 0; g < ng; g++)
        for (int b = 0; b < nb; b++)
            o[g][b] = _mm256_loadu_ps(acc + (size_t)g * hd + d0 + 8 * b);
    for (int t = 0; t < nt; t++) {
        const float *vr = vt + (size_t)t * hd + d0;
        __m256 v[4];
        for (int b = 0; b < nb; b++)
            v[b] = _mm256_loadu_ps(vr + 8 * b);
        for (int g = 0; g < ng; g++) {
            __m256 pp = _mm256_set1_ps(p[(size_t)g * ps + t]);
            for (int b = 0; b < nb; b++)
                o[g][b] = _mm256_fmadd_ps(pp, v[b], o[g][b]);
        }
    }
    for (int g = 0; g < ng; g++)
        for (int b = 0; b < nb; b++)
            _mm256_storeu_ps(acc + (size_t)g * hd + d0 + 8 * b, o[g][b]);
}
#endif

#define DAIR_ATTN_PV_GROUPS(FN, VL)                                                                          \
    for (int g0 = 0; g0 < G; g0 += 3) {                                                                      \
        const int ng = G - g0 < 3 ? G - g0 : 3;                                                              \
        const float *pg = p + (size_t)g0 * ps;                                                               \
        float *ag = acc + (size_t)g0 * hd;                                                                   \
        int d0 = 0;                                                                                          \
        for (; d0 + 4 * (VL) <= hd; d0 += 4 * (VL)) {                                                        \
            if (ng == 3)                                                                                     \
                FN(vt, nt, hd, pg, ps, ag, 3, 4, d0);                                                        \
            else if (ng == 2)                                                                                \
                FN(vt, nt, hd, pg, ps, ag, 2, 4, d0);                                                        \
            else                                                                                             \
                FN(vt, nt, hd, pg, ps, ag, 1, 4, d0);                                                        \
        }                                                                                                    \
        for (; d0 < hd; d0 += (VL)) {                                                                        \
            if (ng == 3)                                                                                     \
                FN(vt, nt, hd, pg, ps, ag, 3, 1, d0);                                                        \
            else if (ng == 2)                                                                                \
                FN(vt, nt, hd, pg, ps, ag, 2, 1, d0);                                                        \
            else                                                                                             \
                FN(vt, nt, hd, pg, ps, ag, 1, 1, d0);                                                        \
        }                                                                                                    \
    }

static DAIR_ATTN_NOINLINE void dair_attn_pv(const float *vt, int nt, int hd, const float *p, size_t ps, float *acc,
                                            int G, int isa) {
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512 && hd % 16 == 0) {
        DAIR_ATTN_PV_GROUPS(dair_attn_pv512, 16)
        return;
    }
#endif
#if DAIR_ATTN_HAVE_AVX2
    if (isa == DAIR_ATTN_AVX2 && hd % 8 == 0) {
        DAIR_ATTN_PV_GROUPS(dair_attn_pv256, 8)
        return;
    }
#endif
    (void)isa;
    for (int g = 0; g < G; g++)
        for (int d = 0; d < hd; d++) {
            float s = acc[(size_t)g * hd + d];
            for (int t = 0; t < nt; t++)
                s = fmaf(p[(size_t)g * ps + t], vt[(size_t)t * hd + d], s);
            acc[(size_t)g * hd + d] = s;
        }
}

/* max of s[0..len) (exact in any order) */
static float dair_attn_max(const float *s, int len, int isa) {
    float mx = -INFINITY;
    int t = 0;
#if DAIR_ATTN_HAVE_AVX512
    if (isa == DAIR_ATTN_AVX512 && len >= 16) {
        __m512 m = _mm512_loadu_ps(s);
        for (t = 16; t + 16 <= len; t += 16)
            m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
        mx = _mm512_reduce_max_ps(m);
    }
#endif
#if DAIR_ATTN_HAVE_AVX2
    if (isa == DAIR_ATTN_AVX2 && len >= 8) {
        __m256 m = _mm256_loadu_ps(s);
        for (t = 8; t + 8 <= len; t += 8)
            m = _mm256_max_ps(m, _mm256_loadu_ps(s + t));
        float tmp[8];
        _mm256_storeu_ps(tmp, m);
        for (int j = 0; j < 8; j++)
            mx = tmp[j] > mx ? tmp[j] : mx;
    }
#endif
    (void)isa;
    for (; t < len; t++)
        mx = s[t] > mx ? s[t] : mx;
    return mx;
}

/* Keys [b, e) of span t0 that row r sees, relative to t0 (empty when e <= b). */
static inline void dair_attn_range(const dair_attn_args *a, int r, int t0, int *b, int *e) {
    const int p = a->pos[r], lo = a->window > 0 ? p - a->window + 1 : 0;
    *b = lo > t0 ? lo - t0 : 0;
    *e = p + 1 - t0 < DAIR_ATTN_SPAN ? p + 1 - t0 : DAIR_ATTN_SPAN;
}

/* Row r's keys [x, y) within the tile [kb, kb + nt); 0 when it has none there. */
static inline int dair_attn_clip(const dair_attn_args *a, int r, int t0, int kb, int nt, int *x, int *y) {
    int b, e;
    dair_attn_range(a, r, t0, &b, &e);
    *x = b > kb ? b : kb;
    *y = e < kb + nt ? e : kb + nt;
    return *y > *x;
}

/* ---------------------------------------------------------------------------------------------
 * Decode: one row's span read straight from the cache, each key and value vector converted once
 * for the G heads in registers instead of through a tile. The per-(head, key) operations are
 * those of dair_attn_dots and dair_attn_pv, in the same order, so the results are the same bits.
 */
#define DAIR_ATTN_GMAX 8 /* query heads per kv head handled here (more: the tile path) */

/* what a visit of a span computes (dair_attn_block, dair_attn_row1) */
enum { DAIR_ATTN_VALUES = 1, /* make the [G][hd] outputs (else only the max and the sum) */
       DAIR_ATTN_KEEP = 2,   /* leave the scores in sc (the exps go to kt) */
       DAIR_ATTN_REUSE = 4   /* sc holds the span's scores already (kept by the first visit) */ };

/* One row's span scores sc[g * SPAN + t] (t < len) to what a visit leaves for them (the tile
 * path and the fused one alike): the max and the sum of exps in acc (the exps in sc, or with
 * KEEP in kt, the scores staying), or with nr (the second visit of an f16 cache) the rounded
 * normalised probabilities in sc. */
static inline void dair_attn_span_stats(const dair_attn_args *a, int G, float *sc, int len, float *acc, int how,
                                        const float *nr, float *kt) {
    if (nr != NULL) {
        for (int g = 0; g < G; g++)
            dair_attn_probs16(sc + (size_t)g * DAIR_ATTN_SPAN, nr[g], nr[G + g], len, a->isa);
        acc[0] = 0.0f;
        return;
    }
    for (int g = 0; g < G; g++) {
        float *sg = sc + (size_t)g * DAIR_ATTN_SPAN;
        float mx = dair_attn_max(sg, len, a->isa);
        acc[g] = mx;
        if (how & DAIR_ATTN_KEEP) {
            memcpy(kt, sg, sizeof(float) * (size_t)len);
            acc[G + g] = dair_attn_exp_sum(kt, mx, len, a->isa);
        } else {
            acc[G + g] = dair_attn_exp_sum(sg, mx, len, a->isa);
        }
    }
    if (!(how & DAIR_ATTN_VALUES))
        memset(acc + 2 * G, 0, sizeof(float) * (size_t)G * a->hd);
}

#if DAIR_ATTN_HAVE_AVX512
/* vector j (16 values) of a cached head row as f32: the values dair_attn_convert writes */
DAIR_ATTN_INLINE __m512 dair_attn_ld512(const uint8_t *row, int kind, int j) {
    if (kind == DAIR_KV_F16)
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 32 * (size_t)j)));
    if (kind == DAIR_KV_Q8_0) {
        const uint8_t *b = row + 34 * (size_t)(j >> 1);
        uint16_t h;
        memcpy(&h, b, 2);
        return _mm512_mul_ps(_mm512_set1_ps(dair_attn_h2f(h)),
                             _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(b + 2 + 16 * (j & 1))))));
    }
    return _mm512_loadu_ps((const float *)row + 16 * (size_t)j);
}

/* vectors j0..j0+n-1 of a cached head row (j0 even), as dair_attn_ld512, each Q8_0 block's
 * scale converted once for its two vectors */
DAIR_ATTN_INLINE void dair_attn_ldn512(const uint8_t *row, int kind, int j0, int n, __m512 *v) {
    if (kind != DAIR_KV_Q8_0) {
        for (int j = 0; j < n; j++)
            v[j] = dair_attn_ld512(row, kind, j0 + j);
        return;
    }
    __m512 d = _mm512_setzero_ps();
    for (int j = 0; j < n; j++) {
        const uint8_t *b = row + 34 * (size_t)((j0 + j) >> 1);
        if (j == 0 || ((j0 + j) & 1) == 0) {
            uint16_t h;
            memcpy(&h, b, 2);
            d = _mm512_set1_ps(dair_attn_h2f(h));
        }
        v[j] = _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                    _mm_loadu_si128((const __m128i *)(b + 2 + 16 * ((j0 + j) & 1))))));
    }
}

DAIR_ATTN_INLINE void dair_attn_row1_512(const dair_attn_args *a, const float *q, const uint8_t *kr, const uint8_t *vr,
                                         int len, float *sc, float *acc, int nv, int pf_end_rows, int kind, int Gc,
                                         int how, const float *nr, float *kt) {
    const int G = Gc ? Gc : a->G, hd = a->hd;
    /* with G and nv constants (Gc != 0, hd 64) the queries stay in registers */
    __m512 qv[4][4];
    const int hold = Gc != 0 && Gc <= 4 && nv == 4;
    for (int g = 0; hold && g < G; g++)
        for (int j = 0; j < 4; j++)
            qv[g & 3][j] = _mm512_loadu_ps(q + (size_t)g * hd + 16 * j);
    const size_t rb = a->row_bytes;
    const __m512 vs = _mm512_set1_ps(a->scale);
    __m512 part[DAIR_ATTN_GMAX][16];
    for (int t = 0; !(how & DAIR_ATTN_REUSE) && t < len; t += 16) {
        const int m = len - t < 16 ? len - t : 16;
        for (int r = t + DAIR_ATTN_PF; r < t + 16 + DAIR_ATTN_PF && r < pf_end_rows; r++)
            for (size_t o = 0; o < rb; o += 64)
                __builtin_prefetch(kr + (size_t)r * rb + o, 0, DAIR_ATTN_PF_HINT);
        for (int r = 0; r < 16; r++) {
            if (r >= m) {
                for (int g = 0; g < G; g++)
                    part[g][r] = _mm512_setzero_ps();
                continue;
            }
            const uint8_t *row = kr + (size_t)(t + r) * rb;
            __m512 k[16];
            dair_attn_ldn512(row, kind, 0, nv, k);
            for (int g = 0; g < G; g++) {
                const float *qg = q + (size_t)g * hd;
                __m512 s = _mm512_mul_ps(hold ? qv[g & 3][0] : _mm512_loadu_ps(qg), k[0]);
                for (int j = 1; j < nv; j++)
                    s = _mm512_fmadd_ps(hold ? qv[g & 3][j & 3] : _mm512_loadu_ps(qg + 16 * j), k[j], s);
                part[g][r] = s;
            }
        }
        for (int g = 0; g < G; g++)
            _mm512_mask_storeu_ps(sc + (size_t)g * DAIR_ATTN_SPAN + t, (__mmask16)((1u << m) - 1),
                                  _mm512_mul_ps(dair_reduce16x16(part[g]), vs));
    }
    dair_attn_span_stats(a, G, sc, len, acc, how, nr, kt);
    if (!(how & DAIR_ATTN_VALUES))
        return;
    float *out = acc + 2 * G;
    for (int g0 = 0; g0 < G; g0 += 3) {
        const int ng = G - g0 < 3 ? G - g0 : 3;
        for (int j0 = 0; j0 < nv; j0 += 4) {
            const int nb = nv - j0 < 4 ? nv - j0 : 4;
            __m512 o[3][4];
            for (int g = 0; g < 3; g++)
                for (int b = 0; b < 4; b++)
                    o[g][b] = _mm512_setzero_ps();
            const int pfv = g0 == 0 && j0 == 0 ? pf_end_rows : 0; /* the first pass streams V */
            for (int t = 0; t < pfv && t < DAIR_ATTN_PF; t++)
                for (size_t o = 0; o < rb; o += 64)
                    __builtin_prefetch(vr + (size_t)t * rb + o, 0, DAIR_ATTN_PF_HINT);
            for (int t = 0; t < len; t++) {
                const uint8_t *row = vr + (size_t)t * rb;
                if (t + DAIR_ATTN_PF < pfv)
                    for (size_t o = 0; o < rb; o += 64)
                        __builtin_prefetch(row + (size_t)DAIR_ATTN_PF * rb + o, 0, DAIR_ATTN_PF_HINT);
                __m512 v[4];
                dair_attn_ldn512(row, kind, j0, nb, v);
                for (int g = 0; g < ng; g++) {
                    const __m512 pp = _mm512_set1_ps(sc[(size_t)(g0 + g) * DAIR_ATTN_SPAN + t]);
                    for (int b = 0; b < nb; b++)
                        o[g][b] = _mm512_fmadd_ps(pp, v[b], o[g][b]);
                }
            }
            for (int g = 0; g < ng; g++)
                for (int b = 0; b < nb; b++)
                    _mm512_storeu_ps(out + (size_t)(g0 + g) * hd + 16 * (j0 + b), o[g][b]);
        }
    }
}
#endif

#if DAIR_ATTN_HAVE_AVX2
DAIR_ATTN_INLINE __m256 dair_attn_ld256(const uint8_t *row, int kind, int j) {
    if (kind == DAIR_KV_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(row + 16 * (size_t)j)));
    if (kind == DAIR_KV_Q8_0) {
        const uint8_t *b = row + 34 * (size_t)(j >> 2);
        uint16_t h;
        memcpy(&h, b, 2);
        return _mm256_mul_ps(_mm256_set1_ps(dair_attn_h2f(h)),
                             _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(b + 2 + 8 * (j & 3))))));
    }
    return _mm256_loadu_ps((const float *)row + 8 * (size_t)j);
}

/* vectors j0..j0+n-1 of a cached head row, as dair_attn_ld256, each Q8_0 block's scale converted
 * once for its four vectors */
DAIR_ATTN_INLINE void dair_attn_ldn256(const uint8_t *row, int kind, int j0, int n, __m256 *v) {
    if (kind != DAIR_KV_Q8_0) {
        for (int j = 0; j < n; j++)
            v[j] = dair_attn_ld256(row, kind, j0 + j);
        return;
    }
    __m256 d = _mm256_setzero_ps();
    for (int j = 0; j < n; j++) {
        const uint8_t *b = row + 34 * (size_t)((j0 + j) >> 2);
        if (j == 0 || ((j0 + j) & 3) == 0) {
            uint16_t h;
            memcpy(&h, b, 2);
            d = _mm256_set1_ps(dair_attn_h2f(h));
        }
        v[j] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
                                    _mm_loadl_epi64((const __m128i *)(b + 2 + 8 * ((j0 + j) & 3))))));
    }
}

#endif

#if DAIR_ATTN_HAVE_AVX2
#define DAIR_ATTN_VB 32 /* value rows per block of the all-heads row (12 KB of f16 V at 3 kv heads of 64) */

/* out[g][8 (j0 + b) ..] += sum_t p[g * SPAN + t] * v_t (vectors j0 .. j0 + nb) for t in [t0, t1), for
 * ng <= 3 heads and nb <= 4 vectors. f16 and f32 take nb = 3: accumulators, values and a
 * probability then fit the 16 registers (with 12 accumulators one of them went through the
 * stack every key, a store-to-load chain that made the loop ~1.25x slower). Q8_0 takes nb = 4,
 * one block's scale per pass: its conversions make each key's work long enough to cover that
 * chain, and three vectors a pass straddle blocks (~1.2x the instructions). */
DAIR_ATTN_INLINE void dair_attn_pv_rows256(const uint8_t *vh, size_t rb, int kind, int j0, const float *p, int t0,
                                           int t1, float *out, int hd, int ng, int nb) {
    __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0, o4 = o0, o5 = o0, o6 = o0, o7 = o0, o8 = o0;
    __m256 o9 = o0, o10 = o0, o11 = o0;
#define DAIR_PV_LD(g, b, o) if (ng > (g) && nb > (b)) o = _mm256_loadu_ps(out + (size_t)(g) * hd + 8 * (j0 + (b)))
#define DAIR_PV_ST(g, b, o) if (ng > (g) && nb > (b)) _mm256_storeu_ps(out + (size_t)(g) * hd + 8 * (j0 + (b)), o)
    DAIR_PV_LD(0, 0, o0); DAIR_PV_LD(0, 1, o1); DAIR_PV_LD(0, 2, o2); DAIR_PV_LD(0, 3, o9);
    DAIR_PV_LD(1, 0, o3); DAIR_PV_LD(1, 1, o4); DAIR_PV_LD(1, 2, o5); DAIR_PV_LD(1, 3, o10);
    DAIR_PV_LD(2, 0, o6); DAIR_PV_LD(2, 1, o7); DAIR_PV_LD(2, 2, o8); DAIR_PV_LD(2, 3, o11);
    for (int t = t0; t < t1; t++) {
        __m256 v[4];
        dair_attn_ldn256(vh + (size_t)t * rb, kind, j0, nb, v);
        __m256 pp = _mm256_set1_ps(p[t]);
        o0 = _mm256_fmadd_ps(pp, v[0], o0);
        if (nb > 1) o1 = _mm256_fmadd_ps(pp, v[1], o1);
        if (nb > 2) o2 = _mm256_fmadd_ps(pp, v[2], o2);
        if (nb > 3) o9 = _mm256_fmadd_ps(pp, v[3], o9);
        if (ng > 1) {
            pp = _mm256_set1_ps(p[DAIR_ATTN_SPAN + t]);
            o3 = _mm256_fmadd_ps(pp, v[0], o3);
            if (nb > 1) o4 = _mm256_fmadd_ps(pp, v[1], o4);
            if (nb > 2) o5 = _mm256_fmadd_ps(pp, v[2], o5);
            if (nb > 3) o10 = _mm256_fmadd_ps(pp, v[3], o10);
        }
        if (ng > 2) {
            pp = _mm256_set1_ps(p[2 * DAIR_ATTN_SPAN + t]);
            o6 = _mm256_fmadd_ps(pp, v[0], o6);
            if (nb > 1) o7 = _mm256_fmadd_ps(pp, v[1], o7);
            if (nb > 2) o8 = _mm256_fmadd_ps(pp, v[2], o8);
            if (nb > 3) o11 = _mm256_fmadd_ps(pp, v[3], o11);
        }
    }
    DAIR_PV_ST(0, 0, o0); DAIR_PV_ST(0, 1, o1); DAIR_PV_ST(0, 2, o2); DAIR_PV_ST(0, 3, o9);
    DAIR_PV_ST(1, 0, o3); DAIR_PV_ST(1, 1, o4); DAIR_PV_ST(1, 2, o5); DAIR_PV_ST(1, 3, o10);
    DAIR_PV_ST(2, 0, o6); DAIR_PV_ST(2, 1, o7); DAIR_PV_ST(2, 2, o8); DAIR_PV_ST(2, 3, o11);
#undef DAIR_PV_LD
#undef DAIR_PV_ST
}

/* rows [r0, min(r1, end)) of a span (rows of rb bytes from base, contiguous), whole: one
 * prefetch per cache line */
DAIR_ATTN_INLINE void dair_attn_pf_rows(const uint8_t *base, size_t rb, int r0, int r1, int end) {
    r1 = r1 < end ? r1 : end;
    if (r1 <= r0)
        return;
    const uint8_t *e = base + (size_t)r1 * rb;
    for (const uint8_t *p = (const uint8_t *)((uintptr_t)(base + (size_t)r0 * rb) & ~(uintptr_t)63); p < e; p += 64)
        __builtin_prefetch(p, 0, DAIR_ATTN_PF_HINT);
}

/* One row's span (len keys from kr/vr, the span's first rows) for nkv kv heads at once (every
 * head; dair_attn_row1 passes one): the operations per (head, key) of a visit of one head, in the
 * same order, so the same bits. Every 8-key block is scored for all heads before the next, and
 * the values are summed in blocks of DAIR_ATTN_VB rows for all heads (the accumulators saved
 * between blocks), so the cache is read as one stream at the pace of the arithmetic on it. Head
 * by head, the first head's pass waited on memory with nothing to overlap it and the others ran
 * from the caches with no memory traffic to hide (bench_attention.py --compare, f16, 2,000
 * positions, caches cold: 0.80x the time at 2 threads, 0.78x at one). Head h's results:
 * part[h * ps], scores sc[h * ss], norm nr[h * ns]; pf: prefetch the rows, whole (every head). */
DAIR_ATTN_INLINE void dair_attn_rowkv_256(const dair_attn_args *a, const float *q, const uint8_t *kr, const uint8_t *vr,
                                          int len, float *sc, size_t ss, float *part, size_t ps, int nv, int kind,
                                          int Gc, int how, const float *nr, size_t ns, float *kt, int nkv, int pf) {
    const int G = Gc ? Gc : a->G, hd = a->hd, KV = nkv;
    const size_t rb = a->row_bytes, hb = a->head_bytes;
    const __m256 vs = _mm256_set1_ps(a->scale);
    __m256 pt[DAIR_ATTN_GMAX][8];
    for (int t = 0; !(how & DAIR_ATTN_REUSE) && t < len; t += 8) {
        const int m = len - t < 8 ? len - t : 8;
        if (pf)
            dair_attn_pf_rows(kr, rb, t + DAIR_ATTN_PF, t + 8 + DAIR_ATTN_PF, len);
        for (int h = 0; h < KV; h++) {
            const float *qh = q + (size_t)h * G * hd;
            for (int r = 0; r < 8; r++) {
                if (r >= m) {
                    for (int g = 0; g < G; g++)
                        pt[g][r] = _mm256_setzero_ps();
                    continue;
                }
                __m256 k[16];
                dair_attn_ldn256(kr + (size_t)(t + r) * rb + (size_t)h * hb, kind, 0, nv, k);
                for (int g = 0; g < G; g++) {
                    const float *qg = qh + (size_t)g * hd;
                    __m256 s = _mm256_mul_ps(_mm256_loadu_ps(qg), k[0]);
                    for (int j = 1; j < nv; j++)
                        s = _mm256_fmadd_ps(_mm256_loadu_ps(qg + 8 * j), k[j], s);
                    pt[g][r] = s;
                }
            }
            for (int g = 0; g < G; g++) {
                __m256 r8 = _mm256_mul_ps(dair_reduce8x8(pt[g]), vs);
                float *dst = sc + (size_t)h * ss + (size_t)g * DAIR_ATTN_SPAN + t;
                if (m == 8) {
                    _mm256_storeu_ps(dst, r8);
                } else {
                    float tmp8[8];
                    _mm256_storeu_ps(tmp8, r8);
                    memcpy(dst, tmp8, sizeof(float) * (size_t)m);
                }
            }
        }
    }
    if (pf && (how & DAIR_ATTN_VALUES)) /* V's first rows arrive while the softmax runs */
        dair_attn_pf_rows(vr, rb, 0, DAIR_ATTN_PF, len);
    for (int h = 0; h < KV; h++)
        dair_attn_span_stats(a, G, sc + (size_t)h * ss, len, part + (size_t)h * ps, how,
                             nr != NULL ? nr + (size_t)h * ns : NULL, kt);
    if (!(how & DAIR_ATTN_VALUES))
        return;
    for (int h = 0; h < KV; h++)
        memset(part + (size_t)h * ps + 2 * G, 0, sizeof(float) * (size_t)G * hd);
    for (int tb = 0; tb < len; tb += DAIR_ATTN_VB) {
        const int te = len - tb < DAIR_ATTN_VB ? len : tb + DAIR_ATTN_VB;
        if (pf)
            dair_attn_pf_rows(vr, rb, tb + DAIR_ATTN_PF, te + DAIR_ATTN_PF, len);
        for (int h = 0; h < KV; h++) {
            const uint8_t *vh = vr + (size_t)h * hb;
            const float *sh = sc + (size_t)h * ss;
            float *out = part + (size_t)h * ps + 2 * G;
            for (int g0 = 0; g0 < G; g0 += 3) {
                const int ng = G - g0 < 3 ? G - g0 : 3;
                const int cw = kind == DAIR_KV_Q8_0 ? 4 : 3; /* see dair_attn_pv_rows256 */
                for (int j0 = 0; j0 < nv; j0 += cw) {
                    const int nb = nv - j0 < cw ? nv - j0 : cw;
                    float *og = out + (size_t)g0 * hd;
                    const float *pg = sh + (size_t)g0 * DAIR_ATTN_SPAN;
                    if (ng == 3 && nb == 3)
                        dair_attn_pv_rows256(vh, rb, kind, j0, pg, tb, te, og, hd, 3, 3);
                    else if (ng == 3 && nb == 2)
                        dair_attn_pv_rows256(vh, rb, kind, j0, pg, tb, te, og, hd, 3, 2);
                    else if (ng == 3 && nb == 4)
                        dair_attn_pv_rows256(vh, rb, kind, j0, pg, tb, te, og, hd, 3, 4);
                    else
                        dair_attn_pv_rows256(vh, rb, kind, j0, pg, tb, te, og, hd, ng, nb);
                }
            }
        }
    }
}
#endif

/* Whether dair_attn_rowkv serves this call's shapes (the AVX2 path; AVX-512 keeps row1 per head) */
static inline int dair_attn_rowkv_ok(const dair_attn_args *a) {
#if DAIR_ATTN_HAVE_AVX2
    return a->isa == DAIR_ATTN_AVX2 && a->hd % 8 == 0 && a->hd <= 128 && a->G <= DAIR_ATTN_GMAX &&
           a->head_bytes * (size_t)a->KV <= a->row_bytes;
#else
    (void)a;
    return 0;
#endif
}

/* Row r's span s for every kv head (dair_attn_rowkv_ok): head h's partial at part + h * ps, its
 * scores at sc + h * ss (with REUSE: kept there), its norm at nr + h * ns; kt as dair_attn_block's. */
static DAIR_ATTN_NOINLINE void dair_attn_rowkv(const dair_attn_args *a, int r, int s, float *part, size_t ps,
                                               float *sc, size_t ss, int how, const float *nr, size_t ns,
                                               float *kt) {
    const int t0 = s * DAIR_ATTN_SPAN;
    int b, e;
    dair_attn_range(a, r, t0, &b, &e);
    if (e <= b) {
        for (int h = 0; h < a->KV; h++)
            part[(size_t)h * ps] = -INFINITY;
        return;
    }
#if DAIR_ATTN_HAVE_AVX2
    const float *q = a->q + (size_t)r * a->H * a->hd;
    const size_t off = (size_t)(t0 + b) * a->row_bytes;
    const uint8_t *kr = a->k + off, *vr = a->v + off;
    const int len = e - b;
    if (!(how & DAIR_ATTN_REUSE))
        dair_attn_pf_rows(kr, a->row_bytes, 0, DAIR_ATTN_PF, len);
    if (a->hd == 64 && a->G == 3 && a->kind == DAIR_KV_F16)
        dair_attn_rowkv_256(a, q, kr, vr, len, sc + b, ss, part, ps, 8, DAIR_KV_F16, 3, how, nr, ns, kt, a->KV, 1);
    else if (a->hd == 64 && a->G == 3 && a->kind == DAIR_KV_Q8_0)
        dair_attn_rowkv_256(a, q, kr, vr, len, sc + b, ss, part, ps, 8, DAIR_KV_Q8_0, 3, how, nr, ns, kt, a->KV, 1);
    else if (a->hd == 64)
        dair_attn_rowkv_256(a, q, kr, vr, len, sc + b, ss, part, ps, 8, a->kind, 0, how, nr, ns, kt, a->KV, 1);
    else
        dair_attn_rowkv_256(a, q, kr, vr, len, sc + b, ss, part, ps, a->hd / 8, a->kind, 0, how, nr, ns, kt, a->KV, 1);
#else
    (void)sc, (void)ss, (void)how, (void)nr, (void)ns, (void)kt;
#endif
}

/* One row's span [b, e) of kv head kvh straight from the cache, if this build and shape have a
 * fused path (returns 0 otherwise): what dair_attn_block computes for the row (how, norm, kt as
 * there; nr: the row's norm). part: [G] max, [G] sum, [G][hd] output; sc: G * SPAN. */
static DAIR_ATTN_NOINLINE int dair_attn_row1(const dair_attn_args *a, int r, int kvh, int t0, int b, int e,
                                             float *part, float *sc, int pf, int how, const float *nr, float *kt) {
    const int G = a->G, hd = a->hd;
    if (G > DAIR_ATTN_GMAX)
        return 0;
    const float *q = a->q + ((size_t)r * a->H + (size_t)kvh * G) * hd;
    const size_t off = (size_t)(t0 + b) * a->row_bytes + (size_t)kvh * a->head_bytes;
    const uint8_t *kr = a->k + off, *vr = a->v + off;
    const int len = e - b, pf_rows = pf ? len : 0;
    if (pf && !(how & DAIR_ATTN_REUSE)) /* the span's first rows of K, whole (every kv head) */
        for (int t = 0; t < DAIR_ATTN_PF && t < len; t++)
            for (size_t o = 0; o < a->row_bytes; o += 64)
                __builtin_prefetch(a->k + (size_t)(t0 + b + t) * a->row_bytes + o, 0, DAIR_ATTN_PF_HINT);
    /* only kv head 0 prefetches (pf), and its kr/vr are the rows' starts: the rows ahead come
     * in whole, for the other heads too. Each pass prefetches what it reads, K in the scores'
     * pass and V in the values' one: with an f16 cache the values are a second parallel loop,
     * and V fetched during the first one would wait in L2 while the second loop's work on it
     * overlaps no memory traffic (attention at 2,000 positions, caches cold: ~0.8x the time
     * of fetching both with the keys) */
#if DAIR_ATTN_HAVE_AVX512
    if (a->isa == DAIR_ATTN_AVX512 && hd % 16 == 0 && hd <= 256) {
        /* the cache type and the common head size as constants: no branch per vector */
#define DAIR_ROW1_512_G(KIND)                                                                          \
    do {                                                                                               \
        if (G == 3)                                                                                    \
            dair_attn_row1_512(a, q, kr, vr, len, sc + b, part, 4, pf_rows, KIND, 3, how, nr, kt);                  \
        else if (G == 4)                                                                               \
            dair_attn_row1_512(a, q, kr, vr, len, sc + b, part, 4, pf_rows, KIND, 4, how, nr, kt);                  \
        else                                                                                           \
            dair_attn_row1_512(a, q, kr, vr, len, sc + b, part, 4, pf_rows, KIND, 0, how, nr, kt);                  \
    } while (0)
        if (hd == 64 && a->kind == DAIR_KV_F16)
            DAIR_ROW1_512_G(DAIR_KV_F16);
        else if (hd == 64 && a->kind == DAIR_KV_Q8_0)
            DAIR_ROW1_512_G(DAIR_KV_Q8_0);
        else
            dair_attn_row1_512(a, q, kr, vr, len, sc + b, part, hd / 16, pf_rows, a->kind, 0, how, nr, kt);
#undef DAIR_ROW1_512_G
        return 1;
    }
#endif
#if DAIR_ATTN_HAVE_AVX2
    if (a->isa == DAIR_ATTN_AVX2 && hd % 8 == 0 && hd <= 128) {
#define DAIR_ROW1_256_G(KIND)                                                                          \
    do {                                                                                               \
        if (G == 3)                                                                                    \
            dair_attn_rowkv_256(a, q, kr, vr, len, sc + b, 0, part, 0, 8, KIND, 3, how, nr, 0, kt, 1, pf_rows > 0); \
        else                                                                                           \
            dair_attn_rowkv_256(a, q, kr, vr, len, sc + b, 0, part, 0, 8, KIND, 0, how, nr, 0, kt, 1, pf_rows > 0); \
    } while (0)
        if (hd == 64 && a->kind == DAIR_KV_F16)
            DAIR_ROW1_256_G(DAIR_KV_F16);
        else if (hd == 64 && a->kind == DAIR_KV_Q8_0)
            DAIR_ROW1_256_G(DAIR_KV_Q8_0);
        else
            dair_attn_rowkv_256(a, q, kr, vr, len, sc + b, 0, part, 0, hd / 8, a->kind, 0, how, nr, 0, kt, 1, pf_rows > 0);
#undef DAIR_ROW1_256_G
        return 1;
    }
#endif
    (void)q;
    (void)kr;
    (void)vr;
    (void)pf_rows;
    return 0;
}

/* The partial softmaxes of rows [r0, r1) over span s of kv head kvh: row r's goes to
 * dst + (r - r0) * rstride as [G] max, [G] sum, [G][hd] unnormalised output, or part[0] = -inf
 * when the row sees no key of the span. With norm (f16 caches, the second visit): row r's
 * [G] max and [G] 1 / sum over all its spans at norm + (r - r0) * 2G, and the [G][hd] output is
 * that of the rounded normalised probabilities (part[0] = 0 marks a span with keys). `how`:
 * DAIR_ATTN_* flags. Scratch: sc (r1 - r0) * G * SPAN floats, kt 2 * KB * hd (>= SPAN) floats on a
 * 64-byte boundary (the row-major tile, then the transposed one).
 * pf: prefetch the span's whole rows (see dair_attn_tile). */
static DAIR_ATTN_NOINLINE void dair_attn_block(const dair_attn_args *a, int r0, int r1, int kvh, int s, float *dst,
                                               size_t rstride, float *sc, float *kt, const float *norm, int how,
                                               int pf) {
    const int G = a->G, hd = a->hd, t0 = s * DAIR_ATTN_SPAN;
    if (r1 - r0 == 1) {
        int b, e;
        dair_attn_range(a, r0, t0, &b, &e);
        if (e <= b) {
            dst[0] = -INFINITY;
            return;
        }
        if (dair_attn_row1(a, r0, kvh, t0, b, e, dst, sc, pf, how, norm, kt))
            return;
    }
    const int tr = dair_attn_transposed(a->isa, hd);
    int lo = DAIR_ATTN_SPAN, hi = 0; /* the union of the rows' keys */
    for (int r = r0; r < r1; r++) {
        int b, e;
        dair_attn_range(a, r, t0, &b, &e);
        if (e > b) {
            lo = b < lo ? b : lo;
            hi = e > hi ? e : hi;
        }
    }
    for (int kb = lo - lo % DAIR_ATTN_KB; !(how & DAIR_ATTN_REUSE) && kb < hi; kb += DAIR_ATTN_KB) {
        const int nt = hi - kb < DAIR_ATTN_KB ? hi - kb : DAIR_ATTN_KB;
        dair_attn_tile(a->k, a, kvh, t0 + kb, nt, kt, pf ? t0 + hi : 0);
        if (tr) {
            /* the rows' G queries two at a time (across rows too: a pair's keys are the union
             * of its two ranges, each query's scores stored for its own) */
            float *kT = kt + (size_t)DAIR_ATTN_KB * hd;
            dair_attn_transpose(kt, nt, hd, kT, a->isa);
            const float *qp[2];
            float *sp[2];
            int xp[2], yp[2], np = 0;
            for (int r = r0; r < r1; r++) {
                int x, y;
                if (!dair_attn_clip(a, r, t0, kb, nt, &x, &y))
                    continue;
                const float *q = a->q + ((size_t)r * a->H + (size_t)kvh * G) * hd;
                float *sr = sc + (size_t)(r - r0) * G * DAIR_ATTN_SPAN + kb;
                for (int g = 0; g < G; g++) {
                    qp[np] = q + (size_t)g * hd;
                    sp[np] = sr + (size_t)g * DAIR_ATTN_SPAN;
                    xp[np] = x - kb;
                    yp[np] = y - kb;
                    if (++np == 2) {
                        dair_attn_dotsT(qp, kT, hd, a->scale, sp, xp, yp, 2, a->isa);
                        np = 0;
                    }
                }
            }
            if (np == 1)
                dair_attn_dotsT(qp, kT, hd, a->scale, sp, xp, yp, 1, a->isa);
            continue;
        }
        for (int r = r0; r < r1; r++) {
            int x, y;
            if (!dair_attn_clip(a, r, t0, kb, nt, &x, &y))
                continue;
            const float *q = a->q + ((size_t)r * a->H + (size_t)kvh * G) * hd;
            float *sr = sc + (size_t)(r - r0) * G * DAIR_ATTN_SPAN;
            for (int g = 0; g < G; g++)
                dair_attn_dots(q + (size_t)g * hd, kt + (size_t)(x - kb) * hd, y - x, hd, a->scale,
                               sr + (size_t)g * DAIR_ATTN_SPAN + x, a->isa);
        }
    }
    for (int r = r0; r < r1; r++) {
        int b, e;
        dair_attn_range(a, r, t0, &b, &e);
        float *part = dst + (size_t)(r - r0) * rstride;
        if (e <= b) {
            part[0] = -INFINITY;
            continue;
        }
        dair_attn_span_stats(a, G, sc + (size_t)(r - r0) * G * DAIR_ATTN_SPAN + b, e - b, part, how,
                             norm != NULL ? norm + (size_t)(r - r0) * 2 * G : NULL, kt);
        memset(part + 2 * G, 0, sizeof(float) * (size_t)G * hd); /* the values are summed into it */
    }
    for (int kb = lo - lo % DAIR_ATTN_KB; (how & DAIR_ATTN_VALUES) && kb < hi; kb += DAIR_ATTN_KB) {
        const int nt = hi - kb < DAIR_ATTN_KB ? hi - kb : DAIR_ATTN_KB;
        dair_attn_tile(a->v, a, kvh, t0 + kb, nt, kt, 0);
        for (int r = r0; r < r1; r++) {
            int b, e;
            dair_attn_range(a, r, t0, &b, &e);
            const int x = b > kb ? b : kb, y = e < kb + nt ? e : kb + nt;
            if (y <= x)
                continue;
            dair_attn_pv(kt + (size_t)(x - kb) * hd, y - x, hd,
                         sc + (size_t)(r - r0) * G * DAIR_ATTN_SPAN + x, DAIR_ATTN_SPAN,
                         dst + (size_t)(r - r0) * rstride + 2 * G, G, a->isa);
        }
    }
}

/* out[G][hd] of one (row, kv head) from its spans' partials (parts + s * sstride, s < nspan):
 * out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, in span order. */
static DAIR_ATTN_NOINLINE void dair_attn_merge_one(const float *parts, size_t sstride, int nspan, int G, int hd,
                                                   float *out) {
    for (int g = 0; g < G; g++) {
        float M = -INFINITY, L = 0.0f;
        for (int s = 0; s < nspan; s++) {
            const float *part = parts + sstride * (size_t)s;
            if (part[0] != -INFINITY && part[g] > M)
                M = part[g];
        }
        float *o = out + (size_t)g * hd;
        memset(o, 0, sizeof(float) * (size_t)hd);
        for (int s = 0; s < nspan; s++) {
            const float *part = parts + sstride * (size_t)s;
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

/* norm[G] max and norm[G + g] 1 / sum of one (row, kv head) over its spans' partials, the max
 * and the sum merge_one divides by */
static DAIR_ATTN_NOINLINE void dair_attn_norm_one(const float *parts, size_t sstride, int nspan, int G, float *norm) {
    for (int g = 0; g < G; g++) {
        float M = -INFINITY, L = 0.0f;
        for (int s = 0; s < nspan; s++) {
            const float *part = parts + sstride * (size_t)s;
            if (part[0] != -INFINITY && part[g] > M)
                M = part[g];
        }
        for (int s = 0; s < nspan; s++) {
            const float *part = parts + sstride * (size_t)s;
            if (part[0] != -INFINITY)
                L += expf(part[g] - M) * part[G + g];
        }
        norm[g] = M;
        norm[G + g] = 1.0f / L;
    }
}

/* out[G][hd] = the sum of the spans' outputs of normalised probabilities, in span order */
static DAIR_ATTN_NOINLINE void dair_attn_sum_one(const float *parts, size_t sstride, int nspan, int G, int hd,
                                                 float *out) {
    memset(out, 0, sizeof(float) * (size_t)G * hd);
    for (int s = 0; s < nspan; s++) {
        const float *part = parts + sstride * (size_t)s;
        if (part[0] == -INFINITY)
            continue;
        for (size_t j = 0; j < (size_t)G * hd; j++)
            out[j] += part[2 * G + j];
    }
}

/* ---------------------------------------------------------------------------------------------
 * Planning and dispatch.
 */
enum { DAIR_ATTN_SCHEME_C = 0, DAIR_ATTN_SCHEME_DECODE = 1, DAIR_ATTN_SCHEME_PREFILL = 2 };

typedef struct {
    const dair_attn_args *a;
    int scheme, nch, ntask;
    int round16;      /* f16 cache: llama.cpp's rounding, two visits of each span */
    int visit;        /* decode scheme: 0 scores, max and sum; 1 rounded probabilities (round16) */
    int fused;        /* decode scheme, round16: a task is a row, both visits in it (one loop) */
    int allkv;        /* decode scheme: a task's row is read for all kv heads at once (dair_attn_rowkv) */
    float *norms;     /* decode scheme, round16: [n * KV][2G] max and 1 / sum */
    float *scores;    /* decode scheme, round16: [ntask][G][SPAN] scores kept between the visits */
    int keep;         /* prefill scheme, round16: each task keeps its spans' scores (when they fit) */
    int nspan;        /* spans per row (the longest row's) */
    size_t per;       /* scratch floats per chunk */
    size_t part_size; /* floats of one partial result: G * (2 + hd) */
    float *scratch, *parts;
} dair_attn_plan;

/* Flush subnormals to zero while attention runs: far from the maximum, softmax weights (e^-87
 * and below) are subnormal, and a multiply-add touching one can take a microcode assist of ~100
 * cycles on x86; Python processes run without FTZ/DAZ. Every step of a row (its spans and their
 * merge) runs under this mode, so the flushing is part of the one arithmetic. */
static inline unsigned int dair_attn_ftz_on(void) {
#if defined(__SSE__)
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
    return csr;
#else
    return 0;
#endif
}

static inline void dair_attn_ftz_off(unsigned int csr) {
#if defined(__SSE__)
    _mm_setcsr(csr);
#else
    (void)csr;
#endif
}

/* p rounded up to a 64-byte boundary (the scratch has DAIR_ATTN_ALIGN_SLACK floats for each) */
#define DAIR_ATTN_ALIGN_SLACK 16
static inline float *dair_attn_align(float *p) {
    return (float *)(((uintptr_t)p + 63) & ~(uintptr_t)63);
}

/* Prefill task: rows [r0, r1), kv head kvh, all their spans, merged into out. */
static void dair_attn_task_prefill(const dair_attn_plan *p, int r0, int r1, int kvh, float *scr) {
    const dair_attn_args *a = p->a;
    int s0 = p->nspan, s1 = 0;
    for (int r = r0; r < r1; r++) {
        const int pr = a->pos[r], lo = a->window > 0 && pr - a->window + 1 > 0 ? pr - a->window + 1 : 0;
        s0 = lo / DAIR_ATTN_SPAN < s0 ? lo / DAIR_ATTN_SPAN : s0;
        s1 = pr / DAIR_ATTN_SPAN + 1 > s1 ? pr / DAIR_ATTN_SPAN + 1 : s1;
    }
    const int ns = s1 - s0, G = a->G;
    const size_t ps = p->part_size, rstride = ps * (size_t)ns, span_sc = (size_t)DAIR_ATTN_ROWS * G * DAIR_ATTN_SPAN;
    /* the f32 tile and the scores on 64-byte boundaries: a vector load that straddles two cache
     * lines costs two, and the tile's loads are most of dots' and pv's (unaligned: ~1.4x the
     * time of the whole prefill attention on the AVX-512 path) */
    float *parts = scr, *kt = dair_attn_align(parts + rstride * DAIR_ATTN_ROWS), *norm = kt + (size_t)2 * DAIR_ATTN_KB * a->hd;
    float *sc = dair_attn_align(norm + (size_t)DAIR_ATTN_ROWS * 2 * G); /* one span's scores, or (keep) every span's */
#define DAIR_ATTN_SC(s) (p->keep ? sc + span_sc * (size_t)((s) - s0) : sc)
    for (int s = s0; s < s1; s++)
        dair_attn_block(a, r0, r1, kvh, s, parts + ps * (size_t)(s - s0), rstride, DAIR_ATTN_SC(s), kt, NULL,
                        !p->round16 ? DAIR_ATTN_VALUES : p->keep ? DAIR_ATTN_KEEP : 0, 0);
    for (int r = r0; r < r1; r++) {
        float *out = a->out + ((size_t)r * a->H + (size_t)kvh * G) * a->hd;
        if (p->round16)
            dair_attn_norm_one(parts + rstride * (size_t)(r - r0), ps, ns, G, norm + (size_t)(r - r0) * 2 * G);
        else
            dair_attn_merge_one(parts + rstride * (size_t)(r - r0), ps, ns, G, a->hd, out);
    }
    if (!p->round16)
        return;
    for (int s = s0; s < s1; s++)
        dair_attn_block(a, r0, r1, kvh, s, parts + ps * (size_t)(s - s0), rstride, DAIR_ATTN_SC(s), kt, norm,
                        DAIR_ATTN_VALUES | (p->keep ? DAIR_ATTN_REUSE : 0), 0);
#undef DAIR_ATTN_SC
    for (int r = r0; r < r1; r++)
        dair_attn_sum_one(parts + rstride * (size_t)(r - r0), ps, ns, G, a->hd,
                          a->out + ((size_t)r * a->H + (size_t)kvh * G) * a->hd);
}

/* Decode scheme: visit `visit` of span s of (row i, kv head kvh), into the row's slot of parts. */
static void dair_attn_decode_visit(const dair_attn_plan *p, int i, int kvh, int s, int visit, float *scr) {
    const dair_attn_args *a = p->a;
    const size_t rk = (size_t)i * a->KV + kvh, slot = rk * (size_t)p->nspan + s;
    /* round16: each (row, kv head, span)'s scores are kept for its second visit */
    float *sc = p->round16 ? p->scores + slot * a->G * DAIR_ATTN_SPAN : scr;
    dair_attn_block(a, i, i + 1, kvh, s, p->parts + p->part_size * slot, 0, sc, scr + (size_t)a->G * DAIR_ATTN_SPAN,
                    visit ? p->norms + rk * 2 * a->G : NULL,
                    !p->round16 ? DAIR_ATTN_VALUES : visit ? DAIR_ATTN_VALUES | DAIR_ATTN_REUSE : DAIR_ATTN_KEEP,
                    kvh == 0);
}

/* Decode scheme with dair_attn_rowkv: visit `visit` of span s of row i, every kv head at once. */
static void dair_attn_decode_visit_kv(const dair_attn_plan *p, int i, int s, int visit, float *scr) {
    const dair_attn_args *a = p->a;
    const size_t rk = (size_t)i * a->KV, slot = rk * (size_t)p->nspan + s, hs = (size_t)p->nspan;
    float *sc = p->round16 ? p->scores + slot * a->G * DAIR_ATTN_SPAN : scr;
    const size_t ss = p->round16 ? hs * a->G * DAIR_ATTN_SPAN : (size_t)a->G * DAIR_ATTN_SPAN;
    dair_attn_rowkv(a, i, s, p->parts + p->part_size * slot, p->part_size * hs, sc, ss,
                    !p->round16 ? DAIR_ATTN_VALUES : visit ? DAIR_ATTN_VALUES | DAIR_ATTN_REUSE : DAIR_ATTN_KEEP,
                    visit ? p->norms + rk * 2 * a->G : NULL, (size_t)2 * a->G, scr + (size_t)a->H * DAIR_ATTN_SPAN);
}

/* Decode scheme, f16 cache, fused (see dair_attention_run): task = (row i, kv head), both
 * visits of its spans and the merges between them in one task; the same calls on the same data
 * as the two parallel loops, so the same bits. One task per kv head rather than per row: a
 * single decode row then still spreads its cache reads over the threads. */
static void dair_attn_task_row16(const dair_attn_plan *p, int i, int kvh, float *scr) {
    const dair_attn_args *a = p->a;
    const size_t rk = (size_t)i * a->KV + kvh;
    const float *parts = p->parts + p->part_size * rk * (size_t)p->nspan;
    for (int s = 0; s < p->nspan; s++)
        dair_attn_decode_visit(p, i, kvh, s, 0, scr);
    dair_attn_norm_one(parts, p->part_size, p->nspan, a->G, p->norms + rk * 2 * a->G);
    for (int s = 0; s < p->nspan; s++)
        dair_attn_decode_visit(p, i, kvh, s, 1, scr);
    dair_attn_sum_one(parts, p->part_size, p->nspan, a->G, a->hd, a->out + rk * a->G * a->hd);
}

static void dair_attn_chunk(void *ctx, int c) {
    dair_attn_plan *p = (dair_attn_plan *)ctx;
    const unsigned int csr = dair_attn_ftz_on();
    const dair_attn_args *a = p->a;
    float *scr = p->scratch + p->per * (size_t)c;
    /* tasks c, c + nch, ...: causal rows grow with position, so contiguous blocks would be unbalanced */
    for (int task = c; task < p->ntask; task += p->nch) {
        if (p->scheme == DAIR_ATTN_SCHEME_C) {
            int i = task / a->KV, kvh = task % a->KV;
            dair_attn_task_c(a, i, kvh, scr, scr + (size_t)a->G * (a->pos[i] + 1));
        } else if (p->scheme == DAIR_ATTN_SCHEME_DECODE && p->fused) {
            dair_attn_task_row16(p, task / a->KV, task % a->KV, scr);
        } else if (p->scheme == DAIR_ATTN_SCHEME_DECODE) {
            /* task = (row, span), all kv heads: the span's rows are read as one stream */
            const int s = task % p->nspan, i = task / p->nspan;
            if (p->allkv)
                dair_attn_decode_visit_kv(p, i, s, p->visit, scr);
            else
                for (int kvh = 0; kvh < a->KV; kvh++)
                    dair_attn_decode_visit(p, i, kvh, s, p->visit, scr);
        } else {
            int blk = task / a->KV, kvh = task % a->KV, r0 = blk * DAIR_ATTN_ROWS;
            int r1 = r0 + DAIR_ATTN_ROWS < a->n ? r0 + DAIR_ATTN_ROWS : a->n;
            dair_attn_task_prefill(p, r0, r1, kvh, scr);
        }
    }
    dair_attn_ftz_off(csr);
}

/* Scratch kept between calls: a fresh allocation of this size is an mmap whose pages fault
 * in on every call, which cost more than a decode step's attention itself. A concurrent call
 * (another Python thread) allocates its own. */
static pthread_mutex_t dair_attn_scratch_lock = PTHREAD_MUTEX_INITIALIZER;
static float *dair_attn_scratch_buf = NULL;
static size_t dair_attn_scratch_n = 0;

/* n floats on a 64-byte boundary (freed by free), or NULL */
static float *dair_attn_alloc(size_t n) {
    void *p = NULL;
    return posix_memalign(&p, 64, sizeof(float) * (n > 0 ? n : 1)) == 0 ? (float *)p : NULL;
}

static float *dair_attn_scratch_get(size_t n, int *cached) {
    *cached = 0;
    if (pthread_mutex_trylock(&dair_attn_scratch_lock) != 0)
        return dair_attn_alloc(n);
    if (dair_attn_scratch_n < n) {
        free(dair_attn_scratch_buf);
        dair_attn_scratch_buf = dair_attn_alloc(n);
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

static int dair_attention_run(const dair_attn_args *a);

/* Returns 0, or -1 when out of memory for the scratch. */
static int dair_attention(const dair_attn_args *a) {
    if (a->rot <= 0)
        return dair_attention_run(a);
    const size_t nq = (size_t)a->n * a->H * a->hd;
    float *qr = (float *)malloc(sizeof(float) * nq);
    if (qr == NULL)
        return -1;
    memcpy(qr, a->q, sizeof(float) * nq);
    for (size_t i = 0; i < nq; i += (size_t)a->rot)
        dair_attn_wht(qr + i, a->rot);
    dair_attn_args b = *a;
    b.q = qr;
    b.rot = 0;
    const int rc = dair_attention_run(&b);
    free(qr);
    for (size_t i = 0; rc == 0 && i < nq; i += (size_t)a->rot)
        dair_attn_wht(a->out + i, a->rot);
    return rc;
}

static int dair_attention_run(const dair_attn_args *args) {
    dair_attn_plan p;
    memset(&p, 0, sizeof(p));
    dair_attn_args local = *args; /* with an f16 cache, q is a rounded copy */
    const dair_attn_args *a = &local;
    p.a = a;
    p.round16 = a->kind == DAIR_KV_F16;
    int maxpos = 0;
    double work = 0.0;
    for (int i = 0; i < a->n; i++) {
        const int pr = a->pos[i];
        maxpos = pr > maxpos ? pr : maxpos;
        work += a->window > 0 && pr + 1 > a->window ? a->window : pr + 1.0;
    }
    const int nt = dair_pool_threads();
    const int nblk = (a->n + DAIR_ATTN_ROWS - 1) / DAIR_ATTN_ROWS;
    p.nspan = maxpos / DAIR_ATTN_SPAN + 1;
    p.part_size = (size_t)a->G * (2 + a->hd);
    if (a->isa == DAIR_ATTN_C) {
        p.scheme = DAIR_ATTN_SCHEME_C;
        p.ntask = a->n * a->KV;
        p.per = (size_t)a->G * (maxpos + 1) + a->hd + 16;
    } else if (nblk * a->KV < (nt > 2 ? 2 * nt : 4)) {
        /* too few prefill tasks to keep the threads busy: split each row's keys instead (the
         * same arithmetic; only the sharing of tiles between rows is lost) */
        p.scheme = DAIR_ATTN_SCHEME_DECODE;
        p.ntask = a->n * p.nspan;
        p.per = (size_t)a->H * DAIR_ATTN_SPAN + (size_t)2 * DAIR_ATTN_KB * a->hd + 16; /* all heads' scores (rowkv) */
        p.allkv = dair_attn_rowkv_ok(a);
    } else {
        p.scheme = DAIR_ATTN_SCHEME_PREFILL;
        p.ntask = nblk * a->KV;
        p.per = (size_t)DAIR_ATTN_ROWS * (p.part_size * (size_t)p.nspan + (size_t)a->G * DAIR_ATTN_SPAN) +
                (size_t)2 * DAIR_ATTN_KB * a->hd + (size_t)DAIR_ATTN_ROWS * 2 * a->G + 16 + 2 * DAIR_ATTN_ALIGN_SLACK;
    }
    if (p.scheme == DAIR_ATTN_SCHEME_PREFILL && p.round16) {
        /* every span's scores of a task: kept for the second visit when all chunks' fit 64 MiB */
        const size_t all = (size_t)DAIR_ATTN_ROWS * a->G * DAIR_ATTN_SPAN * (size_t)(p.nspan - 1);
        const int nch_max = nt <= 1 ? 1 : 8 * nt;
        p.keep = (p.per + all) * (size_t)nch_max * sizeof(float) <= ((size_t)64 << 20);
        if (p.keep)
            p.per += all;
    }
    p.per = (p.per + 15) & ~(size_t)15; /* each chunk's scratch starts on a 64-byte boundary */
    /* a chunk should be worth ~32k multiply-adds: claiming one costs ~0.1 us */
    double want = nt <= 1 ? 1.0 : work * a->H * a->hd * 2.0 / 32768.0;
    if (want > 8.0 * nt)
        want = 8.0 * nt;
    if (want > p.ntask)
        want = p.ntask;
    p.nch = want < 1.0 ? 1 : (int)want;
    if (p.scheme == DAIR_ATTN_SCHEME_DECODE && p.round16 && (p.nspan == 1 || p.nch == 1) && !(p.allkv && p.nch == 1)) {
        /* each row's spans in one task anyway (one span, or one chunk): both visits there, with
         * the row's K and V still in cache and no second parallel loop. With one chunk on AVX2
         * the two loops run instead: a task then reads every kv head's rows in one stream
         * (dair_attn_rowkv), where this scheme's tasks read one head's */
        p.fused = 1;
        p.ntask = a->n * a->KV;
        p.nch = p.nch < p.ntask ? p.nch : p.ntask;
    }
    /* after the chunks' scratch: the decode scheme's partial results (one per row, kv head and
     * span) and (round16) its rows' max and 1 / sum and kept scores, then the rounded q */
    const size_t nrk = (size_t)a->n * a->KV, nq = p.round16 ? (size_t)a->n * a->H * a->hd : 0;
    const size_t nslot = p.scheme == DAIR_ATTN_SCHEME_DECODE ? nrk * (size_t)p.nspan : 0;
    const size_t nparts = p.part_size * nslot;
    const int keep = p.scheme == DAIR_ATTN_SCHEME_DECODE && p.round16;
    const size_t nnorm = keep ? nrk * 2 * a->G : 0;
    const size_t nscores = keep ? nslot * a->G * DAIR_ATTN_SPAN : 0;
    int cached;
    p.scratch = dair_attn_scratch_get(p.per * (size_t)p.nch + nparts + nnorm + nscores + nq, &cached);
    if (p.scratch == NULL)
        return -1;
    p.parts = p.scratch + p.per * (size_t)p.nch;
    p.norms = p.parts + nparts;
    p.scores = p.norms + nnorm;
    if (p.round16) {
        float *qr = p.scores + nscores;
        for (size_t j = 0; j < nq; j++)
            qr[j] = dair_attn_round16(args->q[j]);
        local.q = qr;
    }
    dair_parallel_for(p.nch, dair_attn_chunk, &p);
    if (p.scheme == DAIR_ATTN_SCHEME_DECODE && !p.fused) {
        const unsigned int csr = dair_attn_ftz_on();
        for (size_t rk = 0; rk < nrk; rk++) {
            const float *parts = p.parts + p.part_size * rk * (size_t)p.nspan;
            if (p.round16)
                dair_attn_norm_one(parts, p.part_size, p.nspan, a->G, p.norms + rk * 2 * a->G);
            else
                dair_attn_merge_one(parts, p.part_size, p.nspan, a->G, a->hd, a->out + rk * a->G * a->hd);
        }
        if (p.round16) { /* the second visit of every span, then the sums in span order */
            p.visit = 1;
            dair_parallel_for(p.nch, dair_attn_chunk, &p);
            for (size_t rk = 0; rk < nrk; rk++)
                dair_attn_sum_one(p.parts + p.part_size * rk * (size_t)p.nspan, p.part_size, p.nspan, a->G, a->hd,
                                  a->out + rk * a->G * a->hd);
        }
        dair_attn_ftz_off(csr);
    }
    dair_attn_scratch_put(p.scratch, cached);
    return 0;
}

#endif
