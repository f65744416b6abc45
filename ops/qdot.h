/* dair compute kernels in C, called from Cython with the GIL released.
 *
 * Quantized matrix products follow llama.cpp: the activation row is first
 * quantized to 8-bit blocks of 32 (Q8_0 for Q8_0 weights, Q8_1-style with the
 * block sum for Q4_0/Q4_1), then each (weight block, activation block) pair is an
 * integer dot product scaled by the two block scales. The SIMD paths
 * (AVX-512 VNNI, else AVX2) and the scalar fallback compute the same integers;
 * only float summation order differs. dair_simd_enabled lets tests run the
 * scalar code in the same build. K-quants (Q4_K, Q6_K) use Q8_K activations
 * instead: see kquants.h.
 */
#ifndef DAIR_QDOT_H
#define DAIR_QDOT_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "act.h"
#include "blocks.h"
#include "cpu.h"
#include "neon_float.h"
#include "neon_quants.h"
#include "quants.h"
#include "rows8_avx2.h"
#include "rows16_avx512.h"

/* Bytes ahead that matrix-vector kernels prefetch: a product streams weights that are not
 * in cache, the hardware prefetchers restart at every 4 KB page, and each 64 bytes cost
 * ~15 instructions, so too few loads are in flight without help (a 30-layer sweep went
 * from ~11 to ~28 GB/s on one core with it). */
#ifndef DAIR_PF_DIST
#define DAIR_PF_DIST 4096
#endif

/* Prefetch never faults, so it may be pointed at memory that is no longer mapped. */
static inline void dair_prefetch_bytes(const void *p, size_t n) {
    for (size_t o = 0; o < n; o += 64)
        __builtin_prefetch((const char *)p + o, 0, 3);
}

/* [p, p + len) clipped at end, with the bound worked out once: a compare per line cost as much
 * as a short row's products. Overshoots by at most 3 lines (harmless, see above). */
static inline void dair_prefetch_clip(const uint8_t *p, size_t len, const uint8_t *end) {
    if (p >= end)
        return;
    if ((size_t)(end - p) < len)
        len = (size_t)(end - p);
    for (size_t o = 0; o < len; o += 256) {
        __builtin_prefetch(p + o, 0, 3);
        __builtin_prefetch(p + o + 64, 0, 3);
        __builtin_prefetch(p + o + 128, 0, 3);
        __builtin_prefetch(p + o + 192, 0, 3);
    }
}

/* n bytes (at least 64), 64-aligned; free() them. NULL when out of memory. */
static void *dair_alloc64(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? (n + 63) / 64 * 64 : 64))
        return NULL;
    return p;
}

/* The instruction set of the best kernels this build runs on this CPU. */
static const char *dair_simd_name(void) {
#if defined(DAIR_HAVE_NEON)
    static const char *const names[3] = {"scalar", DAIR_NEON_NAME, "?"};
#else
    static const char *const names[3] = {"scalar", "avx2", "avx512vnni"};
#endif
    return names[dair_cpu_family()];
}

static int dair_simd_compiled(void) {
#if defined(DAIR_HAVE_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* ---- quantized activations ---------------------------------------------- */

#if defined(DAIR_BUILD_AVX512)
DAIR_AVX512_BEGIN
/* 32 values to int8 as the scalar loop below does; returns amax, *sum = sum(q). */
static float dair_q8_block_avx512(const float *xb, int8_t *qb, int *sum) {
    __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float id = amax != 0.0f ? 127.0f / amax : 0.0f;
    __m512 vid = _mm512_set1_ps(id);
    __m512i i0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512i i1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128((__m128i *)qb, _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128((__m128i *)(qb + 16), _mm512_cvtepi32_epi8(i1));
    *sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
    return amax;
}
DAIR_AVX512_END
#endif

#if defined(DAIR_HAVE_AVX2)
DAIR_INLINE float dair_hmax8_avx2(__m256 v) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* 32 int32 (|v| <= 127) to int8 in order */
DAIR_INLINE __m256i dair_pack32_avx2(__m256i i0, __m256i i1, __m256i i2, __m256i i3) {
    const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    return _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* The scalar loop below for one block, bit for bit: the same max, the same float products and
 * round half to even (cvtps under the default rounding mode is nearbyintf). */
static float dair_q8_block_avx2(const float *xb, int8_t *qb, int *sum) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 v[4], am = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(xb + 8 * k);
        am = _mm256_max_ps(am, _mm256_and_ps(v[k], absmask));
    }
    const float amax = dair_hmax8_avx2(am);
    const __m256 vid = _mm256_set1_ps(amax != 0.0f ? 127.0f / amax : 0.0f);
    __m256i i[4];
    for (int k = 0; k < 4; k++)
        i[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], vid));
    _mm256_storeu_si256((__m256i *)qb, dair_pack32_avx2(i[0], i[1], i[2], i[3]));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    *sum = _mm_cvtsi128_si32(h);
    return amax;
}
#endif

/* llama.cpp's runtime (AVX) quantize_row_q8_0/q8_1: id = 127/amax, round half
 * to even. Differs from the _ref versions only at exact .5 ties. */
static void dair_quantize_act_row(const float *x, int cols, int qtype, int8_t *q, float *d, float *s,
                                  int32_t *isum) {
    int nb = cols / DAIR_QK;
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * DAIR_QK;
        int8_t *qb = q + (size_t)b * DAIR_QK;
        float amax = 0.0f;
        int sum = 0;
#if defined(DAIR_BUILD_AVX512)
        if (dair_use_avx512) {
            amax = dair_q8_block_avx512(xb, qb, &sum);
        } else
#endif
#if defined(DAIR_HAVE_AVX2)
        if (dair_simd_enabled) {
            amax = dair_q8_block_avx2(xb, qb, &sum);
        } else
#endif
        {
            for (int j = 0; j < DAIR_QK; j++) {
                float a = fabsf(xb[j]);
                amax = a > amax ? a : amax;
            }
            float id = amax != 0.0f ? 127.0f / amax : 0.0f;
            for (int j = 0; j < DAIR_QK; j++) {
                int v = (int)nearbyintf(xb[j] * id);
                qb[j] = (int8_t)v;
                sum += v;
            }
        }
        float dd = amax / 127.0f;
        float dr = dair_fp16_to_fp32(dair_fp32_to_fp16(dd));
        d[b] = dr;
        isum[b] = sum;
        if (qtype == DAIR_Q4_1 || qtype == DAIR_Q5_1)
            s[b] = dair_fp16_to_fp32(dair_fp32_to_fp16(dd * (float)sum));
        else if (qtype == DAIR_Q4_0)
            s[b] = dr * (float)sum;
        else
            s[b] = 0.0f;
    }
}

/* ---- wire format: GGUF Q8_0 blocks, as ggml's quantize_row_q8_0_ref ------ */

static void dair_quantize_q8_0_ref(const float *x, size_t nvals, uint8_t *outb) {
    size_t nb = nvals / DAIR_QK;
    for (size_t b = 0; b < nb; b++) {
        const float *xb = x + b * DAIR_QK;
        dair_block_q8_0 blk;
        float amax = 0.0f;
        for (int j = 0; j < DAIR_QK; j++) {
            float a = fabsf(xb[j]);
            amax = a > amax ? a : amax;
        }
        float dd = amax / 127.0f;
        float id = dd != 0.0f ? 1.0f / dd : 0.0f;
        blk.d = dair_fp32_to_fp16(dd);
        for (int j = 0; j < DAIR_QK; j++)
            blk.qs[j] = (int8_t)roundf(xb[j] * id);
        memcpy(outb + b * sizeof(blk), &blk, sizeof(blk));
    }
}

/* ---- dequantization ------------------------------------------------------ */

static void dair_dequant_q4k(const uint8_t *src, int cols, float *dst); /* kquants.h */
static void dair_dequant_q6k(const uint8_t *src, int cols, float *dst);

/* One row of `cols` values of type qtype starting at src into dst. */
static void dair_dequant_row(const uint8_t *src, int qtype, int cols, float *dst) {
    int nb = cols / DAIR_QK;
    switch (qtype) {
    case DAIR_F32:
        memcpy(dst, src, (size_t)cols * 4);
        break;
    case DAIR_F16: {
        int j = 0;
#if defined(DAIR_HAVE_AVX2)
        for (; j + 8 <= cols; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + 2 * (size_t)j))));
#elif defined(DAIR_HAVE_NEON)
        dair_neon_f16_row(src, cols, dst);
        j = cols;
#endif
        for (; j < cols; j++)
            dst[j] = dair_fp16_to_fp32(dair_load_u16(src + 2 * (size_t)j));
        break;
    }
    case DAIR_BF16: {
        int j = 0;
#if defined(DAIR_HAVE_AVX2)
        for (; j + 8 <= cols; j += 8)
            _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(
                                          _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + 2 * (size_t)j))), 16)));
#endif
        for (; j < cols; j++)
            dst[j] = dair_bf16_to_fp32(dair_load_u16(src + 2 * (size_t)j));
        break;
    }
    case DAIR_Q8_0:
        for (int b = 0; b < nb; b++) {
            const dair_block_q8_0 *blk = (const dair_block_q8_0 *)(src + (size_t)b * sizeof(dair_block_q8_0));
            float d = dair_fp16_to_fp32(dair_load_u16(&blk->d));
            float *o = dst + (size_t)b * DAIR_QK;
#if defined(__AVX512F__)
            __m512 vd = _mm512_set1_ps(d);
            _mm512_storeu_ps(o, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                     _mm_loadu_si128((const __m128i *)blk->qs)))));
            _mm512_storeu_ps(o + 16, _mm512_mul_ps(vd, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                                          _mm_loadu_si128((const __m128i *)(blk->qs + 16))))));
#else
            for (int j = 0; j < DAIR_QK; j++)
                o[j] = (float)blk->qs[j] * d;
#endif
        }
        break;
    case DAIR_Q4_0:
    case DAIR_Q4_1: {
        const int q41 = qtype == DAIR_Q4_1;
        const size_t bs = q41 ? sizeof(dair_block_q4_1) : sizeof(dair_block_q4_0);
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = src + (size_t)b * bs;
            const uint8_t *qs = blk + (q41 ? 4 : 2);
            float d = dair_fp16_to_fp32(dair_load_u16(blk));
            /* Q4_0 is Q4_1 with m = -8 d: (nib - 8) d = nib d - 8 d, exact in float */
            float m = q41 ? dair_fp16_to_fp32(dair_load_u16(blk + 2)) : -8.0f * d;
            float *o = dst + (size_t)b * DAIR_QK;
#if defined(__AVX512F__)
            __m128i raw = _mm_loadu_si128((const __m128i *)qs);
            __m128i lo = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
            __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
            __m512 vd = _mm512_set1_ps(d), vm = _mm512_set1_ps(m);
            _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(lo)), vd, vm));
            _mm512_storeu_ps(o + 16, _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(hi)), vd, vm));
#else
            for (int j = 0; j < DAIR_QK / 2; j++) {
                o[j] = (float)(qs[j] & 15) * d + m;
                o[j + 16] = (float)(qs[j] >> 4) * d + m;
            }
#endif
        }
        break;
    }
    case DAIR_Q4_K:
        dair_dequant_q4k(src, cols, dst);
        break;
    case DAIR_Q6_K:
        dair_dequant_q6k(src, cols, dst);
        break;
    default:
        dair_dequant_row_table(src, qtype, cols, dst);
        break;
    }
}

/* ---- float dot ----------------------------------------------------------- */

static inline float dair_dot_f32(const float *a, const float *b, int n) {
#if defined(DAIR_HAVE_AVX2)
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int j = 0;
    for (; j + 32 <= n; j += 32) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
        s2 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 16), _mm256_loadu_ps(b + j + 16), s2);
        s3 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 24), _mm256_loadu_ps(b + j + 24), s3);
    }
    for (; j + 8 <= n; j += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    __m256 s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float r = _mm_cvtss_f32(h);
    for (; j < n; j++)
        r += a[j] * b[j];
    return r;
#elif defined(DAIR_HAVE_NEON)
    return dair_neon_dot_f32(a, b, n);
#else
    float r = 0.0f;
    for (int j = 0; j < n; j++)
        r += a[j] * b[j];
    return r;
#endif
}

/* out[i*ldo + r] for rows [r0, r1), inputs [0, n), float x: dequantize each
 * row once into scratch (cols floats) and dot it with every input. */
static void dair_mm_float(const uint8_t *w, size_t rb, int qtype, int cols, int r0, int r1, const float *x, int n,
                          float *out, size_t ldo, float *scratch) {
    for (int r = r0; r < r1; r++) {
        const float *row;
        if (qtype == DAIR_F32) {
            row = (const float *)(w + (size_t)r * rb);
        } else {
            dair_dequant_row(w + (size_t)r * rb, qtype, cols, scratch);
            row = scratch;
        }
        for (int i = 0; i < n; i++)
            out[(size_t)i * ldo + r] = dair_dot_f32(row, x + (size_t)i * cols, cols);
    }
}

/* ---- quantized dot products: scalar ------------------------------------- */

static float dair_vec_dot_q_scalar(const uint8_t *wrow, int qtype, int nb, const int8_t *q, const float *d,
                                   const float *s) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const int8_t *qb = q + (size_t)b * DAIR_QK;
        int sumi = 0;
        if (qtype == DAIR_Q8_0) {
            const dair_block_q8_0 *blk = (const dair_block_q8_0 *)(wrow + (size_t)b * sizeof(dair_block_q8_0));
            for (int j = 0; j < DAIR_QK; j++)
                sumi += blk->qs[j] * qb[j];
            acc += (float)sumi * (dair_fp16_to_fp32_soft(dair_load_u16(&blk->d)) * d[b]);
        } else if (qtype == DAIR_Q4_0) {
            const dair_block_q4_0 *blk = (const dair_block_q4_0 *)(wrow + (size_t)b * sizeof(dair_block_q4_0));
            for (int j = 0; j < DAIR_QK / 2; j++)
                sumi += ((blk->qs[j] & 15) - 8) * qb[j] + ((blk->qs[j] >> 4) - 8) * qb[j + 16];
            acc += (float)sumi * (dair_fp16_to_fp32_soft(dair_load_u16(&blk->d)) * d[b]);
        } else {
            const dair_block_q4_1 *blk = (const dair_block_q4_1 *)(wrow + (size_t)b * sizeof(dair_block_q4_1));
            for (int j = 0; j < DAIR_QK / 2; j++)
                sumi += (blk->qs[j] & 15) * qb[j] + (blk->qs[j] >> 4) * qb[j + 16];
            acc += (float)sumi * (dair_fp16_to_fp32_soft(dair_load_u16(&blk->d)) * d[b]) +
                   dair_fp16_to_fp32_soft(dair_load_u16(&blk->m)) * s[b];
        }
    }
    return acc;
}

/* ---- quantized dot products: AVX2 / AVX-512 VNNI -------------------------- */

#if defined(DAIR_HAVE_AVX2)

/* sum over groups of 4 of u8 * s8 into int32 lanes */
DAIR_INLINE __m256i dair_dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__) /* modules built with AVX-512 on */
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

DAIR_INLINE float dair_hsum256(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* R weight rows x C activation rows; R, C are constants at every call site so
 * the accumulator arrays live in registers. Q4_0 runs as Q4_1 with m = -8 d
 * (the activation's s is then d * sum(q)), which keeps nibbles unsigned for
 * the u8 x s8 dot. */
DAIR_INLINE void dair_tile_q4(const uint8_t *w, size_t rb, int is_q41, int R, int C, const dair_act *a, int i0,
                              float *out, size_t ldo, int r0) {
    const int nb = a->nb;
    const size_t bs = is_q41 ? sizeof(dair_block_q4_1) : sizeof(dair_block_q4_0);
    const size_t qoff = is_q41 ? 4 : 2;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4][4];
    float sm[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            acc[r][c] = _mm256_setzero_ps();
            sm[r][c] = 0.0f;
        }
    for (int b = 0; b < nb; b++) {
        __m256i wv[4];
        float dw[4], mw[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + (size_t)r * rb + (size_t)b * bs;
            __m128i raw = _mm_loadu_si128((const __m128i *)(blk + qoff));
            wv[r] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), m4);
            dw[r] = _cvtsh_ss(dair_load_u16(blk));
            mw[r] = is_q41 ? _cvtsh_ss(dair_load_u16(blk + 2)) : -8.0f * dw[r];
        }
        for (int c = 0; c < C; c++) {
            size_t ai = (size_t)(i0 + c);
            __m256i xv = _mm256_loadu_si256((const __m256i *)(a->q + ai * a->cols + (size_t)b * DAIR_QK));
            float dx = a->d[ai * nb + b], sx = a->s[ai * nb + b];
            for (int r = 0; r < R; r++) {
                __m256i p = dair_dot_u8s8(wv[r], xv);
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dx), _mm256_cvtepi32_ps(p), acc[r][c]);
                sm[r][c] += mw[r] * sx;
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[(size_t)(i0 + c) * ldo + r0 + r] = dair_hsum256(acc[r][c]) + sm[r][c];
}

/* Q8_0 x Q8_0: signed x signed, via |w| (u8) and x with w's sign (s8). */
DAIR_INLINE void dair_tile_q8(const uint8_t *w, size_t rb, int R, int C, const dair_act *a, int i0, float *out,
                              size_t ldo, int r0) {
    const int nb = a->nb;
    const size_t bs = sizeof(dair_block_q8_0);
    __m256 acc[4][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            acc[r][c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i wv[4], aw[4];
        float dw[4];
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + (size_t)r * rb + (size_t)b * bs;
            wv[r] = _mm256_loadu_si256((const __m256i *)(blk + 2));
            aw[r] = _mm256_sign_epi8(wv[r], wv[r]);
            dw[r] = _cvtsh_ss(dair_load_u16(blk));
        }
        for (int c = 0; c < C; c++) {
            size_t ai = (size_t)(i0 + c);
            __m256i xv = _mm256_loadu_si256((const __m256i *)(a->q + ai * a->cols + (size_t)b * DAIR_QK));
            float dx = a->d[ai * nb + b];
            for (int r = 0; r < R; r++) {
                __m256i p = dair_dot_u8s8(aw[r], _mm256_sign_epi8(xv, wv[r]));
                acc[r][c] = _mm256_fmadd_ps(_mm256_set1_ps(dw[r] * dx), _mm256_cvtepi32_ps(p), acc[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[(size_t)(i0 + c) * ldo + r0 + r] = dair_hsum256(acc[r][c]);
}

#define DAIR_TILE_FN(R, C)                                                                                      \
    static void dair_tile_##R##x##C(const uint8_t *w, size_t rb, int qtype, const dair_act *a, int i0,           \
                                    float *out, size_t ldo, int r0) {                                            \
        if (qtype == DAIR_Q8_0)                                                                                  \
            dair_tile_q8(w, rb, R, C, a, i0, out, ldo, r0);                                                      \
        else if (qtype == DAIR_Q4_1)                                                                             \
            dair_tile_q4(w, rb, 1, R, C, a, i0, out, ldo, r0);                                                   \
        else                                                                                                     \
            dair_tile_q4(w, rb, 0, R, C, a, i0, out, ldo, r0);                                                   \
    }
DAIR_TILE_FN(4, 1)
DAIR_TILE_FN(4, 4)
DAIR_TILE_FN(1, 1)
DAIR_TILE_FN(1, 4)
#endif

static void dair_mm_qk(const uint8_t *w, size_t rb, int qtype, int r0, int r1, const dair_act *a, float *out,
                       size_t ldo); /* kquants.h */

/* rows [r0, r1) of a quantized weight times all n quantized activation rows. */
static void dair_mm_q(const uint8_t *w, size_t rb, int qtype, int r0, int r1, const dair_act *a, float *out,
                      size_t ldo) {
    const int n = a->n;
#if defined(DAIR_HAVE_NEON)
    if (dair_simd_enabled && dair_neon_kernel(qtype)) {
        dair_mm_neon(w, rb, qtype, r0, r1, a, out, ldo);
        return;
    }
#endif
    if (qtype == DAIR_Q4_K || qtype == DAIR_Q6_K) {
        dair_mm_qk(w, rb, qtype, r0, r1, a, out, ldo);
        return;
    }
    if (dair_in_vdot_table(qtype)) {
        dair_mm_vdot(w, rb, qtype, r0, r1, a, out, ldo);
        return;
    }
#if defined(DAIR_HAVE_AVX2)
    if (dair_simd_enabled) {
        int r = r0;
        const uint8_t *end = w + (size_t)r1 * rb;
        if (n < DAIR_STREAM_ROWS) /* streaming weights: see DAIR_PF_DIST */
            dair_prefetch_bytes(w + (size_t)r * rb, (size_t)(r1 - r) * rb < DAIR_PF_DIST ? (size_t)(r1 - r) * rb
                                                                                        : DAIR_PF_DIST);
#if defined(DAIR_BUILD_AVX512)
        /* 16 rows at a time with AVX-512 (rows16_avx512.h) where its table says so; the same
         * float steps as below */
        if (dair_use_avx512 && dair_q32_family(qtype, DAIR_FAM_AVX512, n) == DAIR_FAM_AVX512 && (r1 - r) / 16 > 0 &&
            dair_r512_mm(w, rb, qtype, r, (r1 - r) / 16, a, out, ldo, n < DAIR_STREAM_ROWS ? end : NULL) == 0)
            r += 16 * ((r1 - r) / 16);
#endif
        /* 8 rows at a time (rows8_avx2.h); chunks start at multiples of 16 rows, so a row is in
         * the same group, and gets the same bits, whatever n and the chunking */
        const int groups = (r1 - r) / 8;
        if (groups > 0) {
            void *panel = NULL;
            if (n >= 2 && qtype != DAIR_Q8_0 && posix_memalign(&panel, 64, (size_t)a->nb * DAIR_R8_Q4_PANEL))
                panel = NULL; /* then one activation row at a time, same results */
            /* prefetch two groups ahead (one when a group alone is 16 KB or more) */
            const size_t pf_dist = 8 * rb < 16384 ? 16 * rb : 8 * rb;
            /* a few activation rows (sessions decoding together) still stream the weights: the
             * panel prefetches as the one-row kernel does */
            dair_r8_mm(w, rb, qtype, r, groups, a, out, ldo, (__m256i *)panel, n < DAIR_STREAM_ROWS ? end : NULL,
                       pf_dist);
            free(panel);
            r += 8 * groups;
        }
        for (; r + 4 <= r1; r += 4) {
            const uint8_t *wr = w + (size_t)r * rb;
            if (n < DAIR_STREAM_ROWS)
                dair_prefetch_clip(wr + DAIR_PF_DIST, 4 * rb, end);
            int i = 0;
            for (; i + 4 <= n; i += 4)
                dair_tile_4x4(wr, rb, qtype, a, i, out, ldo, r);
            for (; i < n; i++)
                dair_tile_4x1(wr, rb, qtype, a, i, out, ldo, r);
        }
        for (; r < r1; r++) {
            const uint8_t *wr = w + (size_t)r * rb;
            int i = 0;
            for (; i + 4 <= n; i += 4)
                dair_tile_1x4(wr, rb, qtype, a, i, out, ldo, r);
            for (; i < n; i++)
                dair_tile_1x1(wr, rb, qtype, a, i, out, ldo, r);
        }
        return;
    }
#endif
    for (int r = r0; r < r1; r++)
        for (int i = 0; i < n; i++)
            out[(size_t)i * ldo + r] = dair_vec_dot_q_scalar(w + (size_t)r * rb, qtype, a->nb,
                                                             a->q + (size_t)i * a->cols, a->d + (size_t)i * a->nb,
                                                             a->s + (size_t)i * a->nb);
}

#include "kquants.h"

#endif
