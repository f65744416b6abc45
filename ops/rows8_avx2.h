/* AVX2 products of 8 weight rows at a time (Q4_0, Q4_1, Q8_0) with the quantized activations,
 * read from the GGUF row bytes as they are: no repacked copy, so the map stays zero-copy and a
 * streamed layer costs nothing to set up.
 *
 * Why: one row at a time, every 32-value block costs ~15 instructions per row (nibble split,
 * two scalar fp16 conversions, a scale product and its broadcast, a float FMA), and each row
 * ends in a horizontal sum. Across 8 rows of the same block:
 *  - Q4_0/Q4_1: the 16 code bytes of the 8 rows are transposed (a 4x4 dword transpose per
 *    128-bit lane, rows j and j + 4 in the two lanes) so that dword lane j of ymm k holds bytes
 *    4k .. 4k+3 of row j. The activation's 4 matching values are broadcast to every lane, and
 *    eight maddubs (u8 nibbles x s8, pairs at most 2 * 15 * 127) add up in int16 (at most
 *    8 * 3810 < 32767) before one madd: the block's exact integer sum for each row in its lane;
 *  - Q8_0: per row |w| x sign(q, w) (maddubs, madd, as llama.cpp), and a hadd tree reduces the
 *    8 rows' int32 vectors to one vector with row j in lane j.
 * The 8 rows' fp16 scales of a block are gathered into one vector, so the float work (convert,
 * scale, FMA; Q4's m * s term) is one instruction per 8 rows, and nothing is summed across lanes.
 *
 * Bit-exactness between decode and prefill: every path (one activation row, or a prefill's
 * several) does the same float operations per block in the same order, so a row's result does
 * not depend on how many activation rows came with it. Q4_0 runs as Q4_1 with m = -8 d (exact),
 * its activation s being d * sum(q), as in dair_tile_q4.
 *
 * Prefill (n >= 2) for Q4: the 8 rows' transposed nibbles and float scales for every block are
 * laid out once in a small panel (320 bytes a block, in L1/L2) and every activation row, four at
 * a time, is multiplied against it.
 */
#ifndef DAIR_ROWS8_AVX2_H
#define DAIR_ROWS8_AVX2_H

#include "act.h"
#include "blocks.h"
#include "cpu.h"

#if defined(DAIR_HAVE_AVX2)

DAIR_INLINE int32_t dair_r8_ld32(const void *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* The dwords at p + j * rb, j < 8, in lanes 0..7 (two xmm of four). */
DAIR_INLINE void dair_r8_gather32(const uint8_t *p, size_t rb, __m128i *lo, __m128i *hi) {
    __m128i a = _mm_cvtsi32_si128(dair_r8_ld32(p));
    a = _mm_insert_epi32(a, dair_r8_ld32(p + rb), 1);
    a = _mm_insert_epi32(a, dair_r8_ld32(p + 2 * rb), 2);
    a = _mm_insert_epi32(a, dair_r8_ld32(p + 3 * rb), 3);
    __m128i b = _mm_cvtsi32_si128(dair_r8_ld32(p + 4 * rb));
    b = _mm_insert_epi32(b, dair_r8_ld32(p + 5 * rb), 1);
    b = _mm_insert_epi32(b, dair_r8_ld32(p + 6 * rb), 2);
    b = _mm_insert_epi32(b, dair_r8_ld32(p + 7 * rb), 3);
    *lo = a;
    *hi = b;
}

/* Block scales of 8 rows from the dwords at each block's start: d (fp16 at byte 0) and, for
 * Q4_1, m (fp16 at byte 2); Q4_0's m is -8 d. */
DAIR_INLINE void dair_r8_q4_scales(const uint8_t *blk0, size_t rb, int q41, __m256 *d, __m256 *m) {
    __m128i a, b;
    dair_r8_gather32(blk0, rb, &a, &b);
    const __m128i split = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    a = _mm_shuffle_epi8(a, split); /* d0 d1 d2 d3 m0 m1 m2 m3 (words) */
    b = _mm_shuffle_epi8(b, split);
    *d = _mm256_cvtph_ps(_mm_unpacklo_epi64(a, b));
    *m = q41 ? _mm256_cvtph_ps(_mm_unpackhi_epi64(a, b)) : _mm256_mul_ps(*d, _mm256_set1_ps(-8.0f));
}

/* The 16 code bytes at p + j * rb of 8 rows, transposed: lane j of t[k] = bytes 4k..4k+3 of row j. */
DAIR_INLINE void dair_r8_t16(const uint8_t *p, size_t rb, __m256i t[4]) {
#define DAIR_R8_PAIR(j)                                                                                       \
    _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(p + (j) * rb))),          \
                            _mm_loadu_si128((const __m128i *)(p + ((j) + 4) * rb)), 1)
    const __m256i y0 = DAIR_R8_PAIR(0), y1 = DAIR_R8_PAIR(1), y2 = DAIR_R8_PAIR(2), y3 = DAIR_R8_PAIR(3);
#undef DAIR_R8_PAIR
    const __m256i t0 = _mm256_unpacklo_epi32(y0, y1), t1 = _mm256_unpackhi_epi32(y0, y1);
    const __m256i t2 = _mm256_unpacklo_epi32(y2, y3), t3 = _mm256_unpackhi_epi32(y2, y3);
    t[0] = _mm256_unpacklo_epi64(t0, t2);
    t[1] = _mm256_unpackhi_epi64(t0, t2);
    t[2] = _mm256_unpacklo_epi64(t1, t3);
    t[3] = _mm256_unpackhi_epi64(t1, t3);
}

/* Prefetch of the group after next, spread over the block loop: block b asks for the next
 * group's b-th share of bytes (8 blocks of the row group's size), so a few requests go out with
 * each block's work. A burst of ~80 requests at a group's start filled the miss buffers, stalled
 * the products behind them and halved the rate from memory. */
DAIR_INLINE void dair_r8_pf_block(const uint8_t *pf, const uint8_t *pf_end, size_t share, int b) {
    const uint8_t *p = pf + (size_t)b * share;
    if (p < pf_end) /* no prefetch: pf == pf_end */
        for (size_t o = 0; o < share; o += 64)
            __builtin_prefetch(p + o, 0, 3);
}

/* acc += (int sum) * (d * dx) + m * sx: the per-block float step every Q4 path shares. The two
 * terms nearly cancel (m is about -8 d for Q4_0 and often for Q4_1), so they are combined at the
 * block's own magnitude (a product and an FMA) before the add to the running sum, which also
 * leaves one dependent add per block on the accumulator's chain. */
DAIR_INLINE __m256 dair_r8_q4_fma(__m256i s16, __m256 d, __m256 m, const float *dx, const float *sx, __m256 acc) {
    const __m256 p = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
    __m256 dd = _mm256_mul_ps(d, _mm256_broadcast_ss(dx));
    /* opaque to the optimizer: under -ffast-math p * (d * dx) may be reassociated, and differently
     * where the decode and prefill paths inline this, which changed the last bit */
    __asm__("" : "+x"(dd));
    const __m256 blk = _mm256_fmadd_ps(m, _mm256_broadcast_ss(sx), _mm256_mul_ps(p, dd));
    acc = _mm256_add_ps(acc, blk);
    __asm__("" : "+x"(acc)); /* and the running sum is never regrouped across blocks */
    return acc;
}

/* d and m as floats from 8 rows' header dwords (lane j = row j's fp16 d | m << 16). */
DAIR_INLINE void dair_r8_dm(__m256i v, __m256 *d, __m256 *m) {
    const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15, 0, 1, 4, 5, 8, 9, 12,
                                           13, 2, 3, 6, 7, 10, 11, 14, 15);
    const __m256i g = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, split), 0xD8); /* d0..d7 | m0..m7 */
    *d = _mm256_cvtph_ps(_mm256_castsi256_si128(g));
    *m = _mm256_cvtph_ps(_mm256_extracti128_si256(g, 1));
}

/* A block's integer sums for 8 rows from its 4 transposed code vectors (t0..t3: qs dwords 0..3)
 * and the activation block qb (or its expanded form xb). */
DAIR_INLINE __m256i dair_r8_q4_s16(__m256i t0, __m256i t1, __m256i t2, __m256i t3, const int8_t *qb,
                                   const __m256i *xb) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i t[4] = {t0, t1, t2, t3};
    __m256i s16 = _mm256_setzero_si256();
    for (int k = 0; k < 4; k++) {
        const __m256i lo = _mm256_and_si256(t[k], m4), hi = _mm256_and_si256(_mm256_srli_epi16(t[k], 4), m4);
        const __m256i xl = xb ? _mm256_load_si256(xb + k) : _mm256_set1_epi32(dair_r8_ld32(qb + 4 * k));
        const __m256i xh = xb ? _mm256_load_si256(xb + 4 + k) : _mm256_set1_epi32(dair_r8_ld32(qb + 16 + 4 * k));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo, xl));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi, xh));
    }
    return s16;
}

/* Activation row i with each 4-byte group broadcast to a whole ymm, in the order the Q4 kernels
 * meet them (per block: values 4k.. for k = 0..3, then 16 + 4k..): 256 bytes a block, built once
 * per product for decode, so that each maddubs takes its activation straight from memory instead
 * of a broadcast of its own (8 instructions fewer per block and 8 rows). */
static void dair_r8_expand(const dair_act *a, int i, __m256i *xe) {
    const int8_t *q = a->q + (size_t)i * a->cols;
    for (int b = 0; b < a->nb; b++)
        for (int k = 0; k < 8; k++)
            _mm256_store_si256(xe + 8 * b + k,
                               _mm256_set1_epi32(dair_r8_ld32(q + (size_t)b * DAIR_QK + (k < 4 ? 4 * k : 16 + 4 * (k - 4)))));
}

/* Q4_0's activation row for the 4-block loop below: per block 10 ymm, lanes under each of the
 * block's weight dwords (low nibbles, then high ones). An even block's codes start 2 bytes into a
 * dword (18-byte blocks), so its 16 code bytes span 5 dwords whose d bytes meet zeros here. */
static void dair_r8_expand_q40(const dair_act *a, int i, __m256i *xz) {
    const uint8_t *q = (const uint8_t *)(a->q + (size_t)i * a->cols);
    for (int b = 0; b < a->nb; b++) {
        const uint8_t *qb = q + (size_t)b * DAIR_QK;
        __m256i *o = xz + 10 * (size_t)b;
        for (int h = 0; h < 2; h++) {
            const uint8_t *v = qb + 16 * h;
            uint32_t dw[5];
            if (b % 2 == 0) {
                dw[0] = (uint32_t)v[0] << 16 | (uint32_t)v[1] << 24;
                for (int k = 1; k < 4; k++)
                    memcpy(&dw[k], v + 4 * k - 2, 4);
                dw[4] = (uint32_t)v[14] | (uint32_t)v[15] << 8;
            } else {
                memcpy(dw, v, 16);
                dw[4] = 0;
            }
            for (int k = 0; k < 5; k++)
                _mm256_store_si256(o + 5 * h + k, _mm256_set1_epi32((int)dw[k]));
        }
    }
}

/* The fp16 in the low (hi = 0) or high (hi = 1) word of each row's dword lane, as floats. */
DAIR_INLINE __m256 dair_r8_f16_words(__m256i v, int hi) {
    const __m256i lo_w = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1, -1, 0, 1, 4, 5, 8, 9,
                                          12, 13, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i hi_w = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1, 2, 3, 6, 7, 10,
                                          11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
    const __m256i g = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(v, hi ? hi_w : lo_w), 0x08);
    return _mm256_cvtph_ps(_mm256_castsi256_si128(g));
}

/* A block's integer sums over 5 transposed dword vectors against the Q4_0 layout (lo at xb[0..4],
 * hi at xb[5..9]); at most 8 pairs land in any int16, as for 4 vectors. */
DAIR_INLINE __m256i dair_r8_q40_s16(const __m256i *t, int nt, const __m256i *xb) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256i s16 = _mm256_setzero_si256();
    for (int k = 0; k < nt; k++) {
        const __m256i lo = _mm256_and_si256(t[k], m4), hi = _mm256_and_si256(_mm256_srli_epi16(t[k], 4), m4);
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo, _mm256_load_si256(xb + k)));
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi, _mm256_load_si256(xb + 5 + k)));
    }
    return s16;
}

/* Rows r0 .. r0+7 against one activation row i; q41 a constant at each call site; xe: the row as
 * dair_r8_expand lays it out, or NULL. */
DAIR_INLINE void dair_r8_q4_1col_t(const uint8_t *w, size_t rb, const int q41, const dair_act *a, int i, float *out,
                                   size_t ldo, int r0, const uint8_t *pf, const uint8_t *pf_end, const __m256i *xe) {
    const size_t bs = q41 ? sizeof(dair_block_q4_1) : sizeof(dair_block_q4_0), qoff = q41 ? 4 : 2;
    const int nb = a->nb;
    const uint8_t *w0 = w + (size_t)r0 * rb;
    const int8_t *q = a->q + (size_t)i * a->cols;
    const float *dx = a->d + (size_t)i * nb, *sx = a->s + (size_t)i * nb;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    int b = 0;
    /* Q4_1: four 20-byte blocks are 20 dwords, five 4x4 transposes, which bring each block's
     * d | m dword out as a vector of the 8 rows too (gathering it cost ~20% of the product):
     * chunk c holds dwords 4c .. 4c+3 of the four blocks' [dm, q0, q1, q2, q3] x 4 */
    if (q41)
        for (; b + 4 <= nb; b += 4) {
            const uint8_t *g4 = w0 + (size_t)b * bs;
            for (int j = 0; j < 4; j++)
                dair_r8_pf_block(pf, pf_end, 8 * bs, b + j);
            __m256i c0[4], c1[4], c2[4], c3[4], c4[4];
            __m256 d, m;
            const int8_t *qb = q + (size_t)b * DAIR_QK;
            const __m256i *xb = xe ? xe + 8 * (size_t)b : NULL;
            dair_r8_t16(g4, rb, c0);
            dair_r8_t16(g4 + 16, rb, c1);
            dair_r8_dm(c0[0], &d, &m);
            acc = dair_r8_q4_fma(dair_r8_q4_s16(c0[1], c0[2], c0[3], c1[0], qb, xb), d, m, dx + b, sx + b, acc);
            dair_r8_t16(g4 + 32, rb, c2);
            dair_r8_dm(c1[1], &d, &m);
            acc = dair_r8_q4_fma(dair_r8_q4_s16(c1[2], c1[3], c2[0], c2[1], qb + 32, xb ? xb + 8 : NULL), d, m,
                                 dx + b + 1, sx + b + 1, acc);
            dair_r8_t16(g4 + 48, rb, c3);
            dair_r8_dm(c2[2], &d, &m);
            acc = dair_r8_q4_fma(dair_r8_q4_s16(c2[3], c3[0], c3[1], c3[2], qb + 64, xb ? xb + 16 : NULL), d, m,
                                 dx + b + 2, sx + b + 2, acc);
            dair_r8_t16(g4 + 64, rb, c4);
            dair_r8_dm(c3[3], &d, &m);
            acc = dair_r8_q4_fma(dair_r8_q4_s16(c4[0], c4[1], c4[2], c4[3], qb + 96, xb ? xb + 24 : NULL), d, m,
                                 dx + b + 3, sx + b + 3, acc);
        }
    /* Q4_0 with the activation laid out by dair_r8_expand_q40: four 18-byte blocks are 18 dwords,
     * five 4x4 transposes (the last overlapping the fourth by 2 dwords, so nothing past the group
     * is read); the d words come out of them as vectors too */
    if (!q41 && xe)
        for (; b + 4 <= nb; b += 4) {
            const uint8_t *g4 = w0 + (size_t)b * bs;
            for (int j = 0; j < 4; j++)
                dair_r8_pf_block(pf, pf_end, 8 * bs, b + j);
            __m256i c0[4], c1[4], c2[4], c3[4], c4[4];
            const __m256i *xb = xe + 10 * (size_t)b;
            const __m256 m8 = _mm256_set1_ps(-8.0f);
            __m256 d;
            dair_r8_t16(g4, rb, c0);
            dair_r8_t16(g4 + 16, rb, c1);
            {
                const __m256i t[5] = {c0[0], c0[1], c0[2], c0[3], c1[0]};
                d = dair_r8_f16_words(c0[0], 0);
                acc = dair_r8_q4_fma(dair_r8_q40_s16(t, 5, xb), d, _mm256_mul_ps(d, m8), dx + b, sx + b, acc);
            }
            dair_r8_t16(g4 + 32, rb, c2);
            {
                const __m256i t[4] = {c1[1], c1[2], c1[3], c2[0]};
                d = dair_r8_f16_words(c1[0], 1);
                acc = dair_r8_q4_fma(dair_r8_q40_s16(t, 4, xb + 10), d, _mm256_mul_ps(d, m8), dx + b + 1, sx + b + 1,
                                     acc);
            }
            dair_r8_t16(g4 + 48, rb, c3);
            {
                const __m256i t[5] = {c2[1], c2[2], c2[3], c3[0], c3[1]};
                d = dair_r8_f16_words(c2[1], 0);
                acc = dair_r8_q4_fma(dair_r8_q40_s16(t, 5, xb + 20), d, _mm256_mul_ps(d, m8), dx + b + 2, sx + b + 2,
                                     acc);
            }
            dair_r8_t16(g4 + 56, rb, c4);
            {
                const __m256i t[4] = {c3[2], c3[3], c4[2], c4[3]};
                d = dair_r8_f16_words(c3[1], 1);
                acc = dair_r8_q4_fma(dair_r8_q40_s16(t, 4, xb + 30), d, _mm256_mul_ps(d, m8), dx + b + 3, sx + b + 3,
                                     acc);
            }
        }
    if (!q41)
        xe = NULL; /* the tail broadcasts: xe is in Q4_0's layout */
    for (; b < nb; b++) {
        const uint8_t *blk = w0 + (size_t)b * bs;
        dair_r8_pf_block(pf, pf_end, 8 * bs, b);
        __m256i t[4];
        dair_r8_t16(blk + qoff, rb, t);
        const int8_t *qb = q + (size_t)b * DAIR_QK;
        __m256i s16 = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            const __m256i lo = _mm256_and_si256(t[k], m4), hi = _mm256_and_si256(_mm256_srli_epi16(t[k], 4), m4);
            const __m256i xl = xe ? _mm256_load_si256(xe + 8 * b + k) : _mm256_set1_epi32(dair_r8_ld32(qb + 4 * k));
            const __m256i xh =
                xe ? _mm256_load_si256(xe + 8 * b + 4 + k) : _mm256_set1_epi32(dair_r8_ld32(qb + 16 + 4 * k));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(lo, xl));
            s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(hi, xh));
        }
        __m256 d, m;
        dair_r8_q4_scales(blk, rb, q41, &d, &m);
        acc = dair_r8_q4_fma(s16, d, m, dx + b, sx + b, acc);
    }
    float res[8];
    _mm256_storeu_ps(res, acc);
    for (int j = 0; j < 8; j++)
        out[(size_t)i * ldo + r0 + j] = res[j];
}

static void dair_r8_q4_1col(const uint8_t *w, size_t rb, int q41, const dair_act *a, int i, float *out, size_t ldo,
                            int r0, const uint8_t *pf, const uint8_t *pf_end, const __m256i *xe) {
    if (q41 && xe)
        dair_r8_q4_1col_t(w, rb, 1, a, i, out, ldo, r0, pf, pf_end, xe);
    else if (q41)
        dair_r8_q4_1col_t(w, rb, 1, a, i, out, ldo, r0, pf, pf_end, NULL);
    else if (xe)
        dair_r8_q4_1col_t(w, rb, 0, a, i, out, ldo, r0, pf, pf_end, xe);
    else
        dair_r8_q4_1col_t(w, rb, 0, a, i, out, ldo, r0, pf, pf_end, NULL);
}

/* The panel of rows r0 .. r0+7: per block 8 ymm of nibbles (low k = 0..3, high k = 0..3, as
 * dair_r8_q4_1col splits them), then d and m as floats. */
#define DAIR_R8_Q4_PANEL 320

static void dair_r8_q4_panel(const uint8_t *w, size_t rb, int q41, int nb, int r0, __m256i *panel,
                             const uint8_t *pf, const uint8_t *pf_end) {
    const size_t bs = q41 ? sizeof(dair_block_q4_1) : sizeof(dair_block_q4_0), qoff = q41 ? 4 : 2;
    const uint8_t *w0 = w + (size_t)r0 * rb;
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w0 + (size_t)b * bs;
        dair_r8_pf_block(pf, pf_end, 8 * bs, b);
        __m256i t[4], *o = panel + (size_t)b * 10;
        dair_r8_t16(blk + qoff, rb, t);
        for (int k = 0; k < 4; k++) {
            _mm256_store_si256(o + k, _mm256_and_si256(t[k], m4));
            _mm256_store_si256(o + 4 + k, _mm256_and_si256(_mm256_srli_epi16(t[k], 4), m4));
        }
        __m256 d, m;
        dair_r8_q4_scales(blk, rb, q41, &d, &m);
        _mm256_store_ps((float *)(o + 8), d);
        _mm256_store_ps((float *)(o + 9), m);
    }
}

/* The panel against C activation rows i0 .. i0+C-1 (C a constant at each call site). */
DAIR_INLINE void dair_r8_q4_panel_dot(const __m256i *panel, const dair_act *a, int i0, int C, float *out, size_t ldo,
                                      int r0) {
    const int nb = a->nb;
    __m256 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m256i *o = panel + (size_t)b * 10;
        const __m256 d = _mm256_load_ps((const float *)(o + 8)), m = _mm256_load_ps((const float *)(o + 9));
        /* column by column: the panel's loads hit L1, and sharing them across columns made the
         * compiler keep 16 partial products live and spill them */
        for (int c = 0; c < C; c++) {
            const int8_t *qb = a->q + (size_t)(i0 + c) * a->cols + (size_t)b * DAIR_QK;
            __m256i s16 = _mm256_setzero_si256();
            for (int k = 0; k < 4; k++) {
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_load_si256(o + k),
                                                                 _mm256_set1_epi32(dair_r8_ld32(qb + 4 * k))));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_load_si256(o + 4 + k),
                                                                 _mm256_set1_epi32(dair_r8_ld32(qb + 16 + 4 * k))));
            }
            const size_t ai = (size_t)(i0 + c) * nb + b;
            acc[c] = dair_r8_q4_fma(s16, d, m, a->d + ai, a->s + ai, acc[c]);
        }
    }
    for (int c = 0; c < C; c++) {
        float res[8];
        _mm256_storeu_ps(res, acc[c]);
        for (int j = 0; j < 8; j++)
            out[(size_t)(i0 + c) * ldo + r0 + j] = res[j];
    }
}

static void dair_r8_q4_panel_dot4(const __m256i *panel, const dair_act *a, int i0, float *out, size_t ldo, int r0) {
    dair_r8_q4_panel_dot(panel, a, i0, 4, out, ldo, r0);
}
static void dair_r8_q4_panel_dot1(const __m256i *panel, const dair_act *a, int i0, float *out, size_t ldo, int r0) {
    dair_r8_q4_panel_dot(panel, a, i0, 1, out, ldo, r0);
}

/* Sums of each of 8 int32 vectors, in lanes 0..7. */
DAIR_INLINE __m256i dair_r8_reduce(const __m256i p[8]) {
    const __m256i a0 = _mm256_hadd_epi32(p[0], p[1]), a1 = _mm256_hadd_epi32(p[2], p[3]);
    const __m256i a2 = _mm256_hadd_epi32(p[4], p[5]), a3 = _mm256_hadd_epi32(p[6], p[7]);
    const __m256i b0 = _mm256_hadd_epi32(a0, a1), b1 = _mm256_hadd_epi32(a2, a3); /* rows 0-3 | 0-3, 4-7 | 4-7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(b0, b1, 0x20), _mm256_permute2x128_si256(b0, b1, 0x31));
}

/* The fp16 words at p + j * rb, j < 8, as floats. */
DAIR_INLINE __m256 dair_r8_f16x8(const uint8_t *p, size_t rb) {
    __m128i v = _mm_cvtsi32_si128(dair_load_u16(p));
    for (int j = 1; j < 8; j++)
        v = _mm_insert_epi16(v, dair_load_u16(p + j * rb), j);
    return _mm256_cvtph_ps(v);
}

/* Q8_0 rows r0 .. r0+7 against C activation rows i0 .. (C a constant at each call site). */
DAIR_INLINE void dair_r8_q8(const uint8_t *w, size_t rb, const dair_act *a, int i0, int C, float *out, size_t ldo,
                            int r0, const uint8_t *pf, const uint8_t *pf_end) {
    const int nb = a->nb;
    const uint8_t *w0 = w + (size_t)r0 * rb;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w0 + (size_t)b * sizeof(dair_block_q8_0);
        dair_r8_pf_block(pf, pf_end, 8 * sizeof(dair_block_q8_0), b);
        const __m256 d = dair_r8_f16x8(blk, rb);
        for (int c = 0; c < C; c++) {
            const size_t ai = (size_t)(i0 + c);
            const __m256i x = _mm256_loadu_si256((const __m256i *)(a->q + ai * a->cols + (size_t)b * DAIR_QK));
            __m256i p[8];
            for (int j = 0; j < 8; j++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(blk + (size_t)j * rb + 2));
                p[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(x, wv)), ones);
            }
            const __m256 s = _mm256_cvtepi32_ps(dair_r8_reduce(p));
            acc[c] = _mm256_fmadd_ps(s, _mm256_mul_ps(d, _mm256_broadcast_ss(a->d + ai * nb + b)), acc[c]);
        }
    }
    for (int c = 0; c < C; c++) {
        float res[8];
        _mm256_storeu_ps(res, acc[c]);
        for (int j = 0; j < 8; j++)
            out[(size_t)(i0 + c) * ldo + r0 + j] = res[j];
    }
}

static void dair_r8_q8_1(const uint8_t *w, size_t rb, const dair_act *a, int i0, float *out, size_t ldo, int r0,
                         const uint8_t *pf, const uint8_t *pf_end) {
    dair_r8_q8(w, rb, a, i0, 1, out, ldo, r0, pf, pf_end);
}
static void dair_r8_q8_4(const uint8_t *w, size_t rb, const dair_act *a, int i0, float *out, size_t ldo, int r0,
                         const uint8_t *pf, const uint8_t *pf_end) {
    dair_r8_q8(w, rb, a, i0, 4, out, ldo, r0, pf, pf_end);
}

/* Rows [r0, r0 + 8 * groups) of a Q4_0/Q4_1/Q8_0 weight x all n activation rows. panel: room for
 * nb * DAIR_R8_Q4_PANEL bytes (32-aligned) for a Q4 type and n >= 2, or NULL (then one activation row
 * at a time, the same results).
 * pf_end: prefetch (pf_dist bytes ahead of each group, see dair_r8_pf_block) stops there; NULL for
 * no prefetch. */
static void dair_r8_mm(const uint8_t *w, size_t rb, int qtype, int r0, int groups, const dair_act *a, float *out,
                       size_t ldo, __m256i *panel, const uint8_t *pf_end, size_t pf_dist) {
    const int n = a->n, q41 = qtype == DAIR_Q4_1;
    /* decode: the activation row expanded once (on the stack up to 48 blocks, 15 KB) */
    __m256i xs[48 * 10];
    __m256i *xe = NULL;
    if (qtype != DAIR_Q8_0 && n == 1) {
        if (a->nb <= 48)
            xe = xs;
        else if (posix_memalign((void **)&xe, 64, (size_t)a->nb * 320))
            xe = NULL; /* then broadcasts, the same results */
        if (xe != NULL && q41)
            dair_r8_expand(a, 0, xe);
        else if (xe != NULL)
            dair_r8_expand_q40(a, 0, xe);
    }
    for (int g = 0; g < groups; g++) {
        const int r = r0 + 8 * g;
        /* no prefetch: pf = pf_end = w, which no block reaches below */
        const uint8_t *pf = pf_end != NULL ? w + (size_t)r * rb + pf_dist : w;
        const uint8_t *pfe = pf_end != NULL ? pf_end : w;
        if (qtype == DAIR_Q8_0) {
            int i = 0;
            for (; i + 4 <= n; i += 4)
                dair_r8_q8_4(w, rb, a, i, out, ldo, r, i == 0 ? pf : w, i == 0 ? pfe : w);
            for (; i < n; i++)
                dair_r8_q8_1(w, rb, a, i, out, ldo, r, i == 0 ? pf : w, i == 0 ? pfe : w);
        } else if (n == 1 || panel == NULL) {
            for (int i = 0; i < n; i++)
                dair_r8_q4_1col(w, rb, q41, a, i, out, ldo, r, i == 0 ? pf : w, i == 0 ? pfe : w, n == 1 ? xe : NULL);
        } else {
            dair_r8_q4_panel(w, rb, q41, a->nb, r, panel, pf, pfe);
            int i = 0;
            for (; i + 4 <= n; i += 4)
                dair_r8_q4_panel_dot4(panel, a, i, out, ldo, r);
            for (; i < n; i++)
                dair_r8_q4_panel_dot1(panel, a, i, out, ldo, r);
        }
    }
    if (xe != NULL && xe != xs)
        free(xe);
}

#endif
#endif
