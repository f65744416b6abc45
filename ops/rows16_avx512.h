/* AVX-512 VNNI products of 16 weight rows at a time (Q4_0, Q4_1) with the quantized activations,
 * read from the GGUF row bytes as they are (no repacked copy), built like rows8_avx2.h with
 * 512-bit lanes: dword lane j of a zmm belongs to row j of the group.
 *
 * Why: the AVX-512 kernels these replace (an "image" of the activation laid out like the weight
 * row, one VPDPBUSD per 64 weight bytes) kept one float lane per 4 weight bytes: a convert, a
 * product and an FMA per lane and activation row, cheap for one activation row but it made
 * prefill slower than rows8_avx2.h's on AMD Zen 5 (Q4_1 at 4096 x 576: 29.6 against 23.7 us per
 * activation row; Q8_0 decode 53 against 54, 404 against 383 us at 4096 x 4096). Here the float
 * work is once per block and 16 rows, and one VPDPBUSD per 4 code bytes of 16 rows (its
 * activation dword broadcast from memory) replaces rows8's two maddubs, int16 adds and madd.
 *
 * The integer sums are exact, and the float step per (row, block) is rows8's dair_r8_q4_fma
 * (p = float(sum), dd = d * dx, blk = fma(m, sx, p * dd), acc += blk), so a row gets the same bits
 * here as from the AVX2 kernels, whatever the batch (decode or prefill) and the family.
 *
 * Decode (n = 1): each 16-byte piece of 16 rows is transposed (a 4x4 dword transpose per 128-bit
 * lane, rows j, j + 4, j + 8, j + 12 in the four lanes); four blocks are taken at once so the
 * block headers come out of the transposes as vectors too, as rows8 does. Prefill (n >= 2): the
 * group's transposed nibbles and float scales are laid out once per group in a panel (640 bytes
 * a block), and the activation rows, four at a time, are multiplied against it.
 */
#ifndef DAIR_ROWS16_AVX512_H
#define DAIR_ROWS16_AVX512_H

#include "act.h"
#include "blocks.h"
#include "cpu.h"
#include "rows8_avx2.h"

/* The avx512 family's kernel for each (type, operation): 1 = the 16-row kernels below, 0 =
 * rows8_avx2.h's 8-row AVX2 kernels. Both do the same float steps per (row, block), so the choice
 * changes the speed only, never a result. Measured on AMD EPYC Zen 5 (2 vCPUs, shared):
 *  - Q8_0 decode: rows8. The weights of a decode step stream from memory, and there rows8 read the
 *    output head of the default model (49152 x 576, 28 MB) in 0.75-0.80 ms against 0.84-0.95 ms
 *    here (the decode sweep of benchmarks/bench_ops.py, interleaved runs); cache-resident, the
 *    kernel here is faster (48 against 54 us at 4096 x 576), but decode weights seldom are. With
 *    2 or 3 activation rows the panel below costs more than it saves at wide rows (Q8_0 at 4096 x
 *    4096, 2 rows: 380-438 against 347-359 us a row), hence "decode" is up to 3 rows, as the
 *    kernels' prefetch has it (weights streaming).
 *  - Q4_1 decode: rows8 too. One thread's decode sweep favours the kernel here (the 30 Q4_1 layers
 *    2.4-2.6 against 2.8 ms), but a whole decode step of the default model on two threads, the two
 *    kernels alternating in one process, ran 7-13% faster with rows8 (median tok/s over 6 rounds,
 *    three series: 269 against 238, 234 against 218, 251 against 226), and level on one thread
 *    (217 against 221): with both cores streaming, rows8's lighter loop keeps pace with memory.
 *  - Q8_0 prefill, Q4_0 decode and prefill, Q4_1 prefill: here. Prefill at 4096 x 576 and 64 rows:
 *    Q8_0 11 against 39 us a row, Q4_0/Q4_1 11 against 21; decode Q4_0 29 against 43 us. */
enum { DAIR_OP_DECODE = 0, DAIR_OP_PREFILL = 1 };
static unsigned char dair_r512_table[DAIR_NTYPES][2] = { /* written only by tests (dair_r512_set) */
    [DAIR_Q8_0] = {0, 1},
    [DAIR_Q4_0] = {1, 1},
    [DAIR_Q4_1] = {0, 1},
};

/* Set one entry (tests run both kernels of every entry, benchmarks compare them); returns the old. */
static int dair_r512_set(int qtype, int op, int use16) {
    const int old = dair_r512_table[qtype][op];
    dair_r512_table[qtype][op] = (unsigned char)(use16 != 0);
    return old;
}

/* The family whose kernel runs a product of n activation rows of a Q8_0/Q4_0/Q4_1 weight when
 * `family` is selected (kernel_ops reports it): "decode" up to 3 rows, "prefill" 4 or more. */
static int dair_q32_family(int qtype, int family, int n) {
    if (family == DAIR_FAM_AVX512 && !dair_r512_table[qtype][n >= 4 ? DAIR_OP_PREFILL : DAIR_OP_DECODE])
        return DAIR_FAM_AVX2;
    return family;
}

#if defined(DAIR_BUILD_AVX512)
DAIR_AVX512_BEGIN

#define DAIR_R512_PANEL 640 /* bytes a block: 8 zmm of nibbles, then d and m as 16 floats each */

/* The 16 bytes at p + j * rb of 16 rows, transposed: lane j of t[k] = bytes 4k..4k+3 of row j. */
DAIR_INLINE void dair_r512_t16(const uint8_t *p, size_t rb, __m512i t[4]) {
    __m512i y[4];
    for (int k = 0; k < 4; k++) {
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(p + (size_t)k * rb)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (size_t)(k + 4) * rb)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (size_t)(k + 8) * rb)), 2);
        y[k] = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + (size_t)(k + 12) * rb)), 3);
    }
    const __m512i t0 = _mm512_unpacklo_epi32(y[0], y[1]), t1 = _mm512_unpackhi_epi32(y[0], y[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(y[2], y[3]), t3 = _mm512_unpackhi_epi32(y[2], y[3]);
    t[0] = _mm512_unpacklo_epi64(t0, t2);
    t[1] = _mm512_unpackhi_epi64(t0, t2);
    t[2] = _mm512_unpacklo_epi64(t1, t3);
    t[3] = _mm512_unpackhi_epi64(t1, t3);
}

/* The fp16 in the low (hi = 0) or high (hi = 1) word of each row's dword lane, as floats. */
DAIR_INLINE __m512 dair_r512_f16_words(__m512i v, int hi) {
    return _mm512_cvtph_ps(_mm512_cvtepi32_epi16(hi ? _mm512_srli_epi32(v, 16) : v));
}

/* dair_r8_q4_fma for 16 rows: the same float operations in the same order. */
DAIR_INLINE __m512 dair_r512_q4_fma(__m512i isum, __m512 d, __m512 m, const float *dx, const float *sx, __m512 acc) {
    const __m512 p = _mm512_cvtepi32_ps(isum);
    __m512 dd = _mm512_mul_ps(d, _mm512_set1_ps(*dx));
    __asm__("" : "+v"(dd)); /* no reassociation under -ffast-math, as in dair_r8_q4_fma */
    const __m512 blk = _mm512_fmadd_ps(m, _mm512_set1_ps(*sx), _mm512_mul_ps(p, dd));
    acc = _mm512_add_ps(acc, blk);
    __asm__("" : "+v"(acc));
    return acc;
}

DAIR_INLINE __m512i dair_r512_lo(__m512i t) { return _mm512_and_si512(t, _mm512_set1_epi8(0x0F)); }
DAIR_INLINE __m512i dair_r512_hi(__m512i t) {
    return _mm512_and_si512(_mm512_srli_epi16(t, 4), _mm512_set1_epi8(0x0F));
}

/* Sum over k < nt of (low nibbles of t[k]) . xl[k] + (high nibbles) . xh[k], the activation dwords
 * broadcast to every row's lane; two chains (low, high) so that the VPDPBUSDs overlap. */
DAIR_INLINE __m512i dair_r512_isum(const __m512i *t, int nt, const int32_t *xl, const int32_t *xh) {
    __m512i sl = _mm512_setzero_si512(), sh = _mm512_setzero_si512();
    for (int k = 0; k < nt; k++) {
        sl = _mm512_dpbusd_epi32(sl, dair_r512_lo(t[k]), _mm512_set1_epi32(xl[k]));
        sh = _mm512_dpbusd_epi32(sh, dair_r512_hi(t[k]), _mm512_set1_epi32(xh[k]));
    }
    return _mm512_add_epi32(sl, sh);
}

/* Rows r0 .. r0+15 against activation row i (decode). q41 is a constant at each call site; xz:
 * Q4_0's activation in dair_r512_expand_q40's layout. */
DAIR_INLINE void dair_r512_q4_1col_t(const uint8_t *w, size_t rb, const int q41, const dair_act *a, int i, float *out,
                                    size_t ldo, int r0, const uint8_t *pf, const uint8_t *pf_end, const int32_t *xz) {
    const size_t bs = q41 ? sizeof(dair_block_q4_1) : sizeof(dair_block_q4_0), qoff = q41 ? 4 : 2;
    const int nb = a->nb;
    const uint8_t *w0 = w + (size_t)r0 * rb;
    const int8_t *q = a->q + (size_t)i * a->cols;
    const float *dx = a->d + (size_t)i * nb, *sx = a->s + (size_t)i * nb;
    __m512 acc = _mm512_setzero_ps();
    int b = 0;
    /* Q4_1: four 20-byte blocks are 20 dwords, five transposes; block j's d | m dword is dword 5j */
    if (q41)
        for (; b + 4 <= nb; b += 4) {
            const uint8_t *g4 = w0 + (size_t)b * bs;
            for (int j = 0; j < 4; j++)
                dair_r8_pf_block(pf, pf_end, 16 * bs, b + j);
            __m512i c[5][4];
            for (int h = 0; h < 5; h++)
                dair_r512_t16(g4 + 16 * h, rb, c[h]);
            for (int j = 0; j < 4; j++) {
                const __m512i *v = &c[0][0] + 5 * j; /* dwords 5j .. 5j+4 */
                const int32_t *qb = (const int32_t *)(q + (size_t)(b + j) * DAIR_QK);
                const __m512 d = dair_r512_f16_words(v[0], 0), m = dair_r512_f16_words(v[0], 1);
                acc = dair_r512_q4_fma(dair_r512_isum(v + 1, 4, qb, qb + 4), d, m, dx + b + j, sx + b + j, acc);
            }
        }
    /* Q4_0: four 18-byte blocks are 18 dwords, transposes at bytes 0, 16, 32, 48 and 56 (the last
     * overlapping, so nothing past the group is read); even blocks' codes straddle dwords, which
     * xz's layout (zeros under the d bytes) matches, as rows8's dair_r8_expand_q40 */
    if (!q41)
        for (; b + 4 <= nb; b += 4) {
            const uint8_t *g4 = w0 + (size_t)b * bs;
            for (int j = 0; j < 4; j++)
                dair_r8_pf_block(pf, pf_end, 16 * bs, b + j);
            __m512i c[5][4];
            for (int h = 0; h < 4; h++)
                dair_r512_t16(g4 + 16 * h, rb, c[h]);
            dair_r512_t16(g4 + 56, rb, c[4]);
            const __m512i v[18] = {c[0][0], c[0][1], c[0][2], c[0][3], c[1][0], c[1][1], c[1][2], c[1][3], c[2][0],
                                   c[2][1], c[2][2], c[2][3], c[3][0], c[3][1], c[3][2], c[3][3], c[4][2], c[4][3]};
            const int32_t *x = xz + 10 * (size_t)b;
            const __m512 m8 = _mm512_set1_ps(-8.0f);
            __m512 d = dair_r512_f16_words(v[0], 0);
            acc = dair_r512_q4_fma(dair_r512_isum(v, 5, x, x + 5), d, _mm512_mul_ps(d, m8), dx + b, sx + b, acc);
            d = dair_r512_f16_words(v[4], 1);
            acc = dair_r512_q4_fma(dair_r512_isum(v + 5, 4, x + 10, x + 15), d, _mm512_mul_ps(d, m8), dx + b + 1,
                                  sx + b + 1, acc);
            d = dair_r512_f16_words(v[9], 0);
            acc = dair_r512_q4_fma(dair_r512_isum(v + 9, 5, x + 20, x + 25), d, _mm512_mul_ps(d, m8), dx + b + 2,
                                  sx + b + 2, acc);
            d = dair_r512_f16_words(v[13], 1);
            acc = dair_r512_q4_fma(dair_r512_isum(v + 14, 4, x + 30, x + 35), d, _mm512_mul_ps(d, m8), dx + b + 3,
                                  sx + b + 3, acc);
        }
    for (; b < nb; b++) { /* the last nb % 4 blocks: codes and header by separate transposes */
        const uint8_t *blk = w0 + (size_t)b * bs;
        dair_r8_pf_block(pf, pf_end, 16 * bs, b);
        __m512i t[4], h[4];
        dair_r512_t16(blk + qoff, rb, t);
        dair_r512_t16(blk, rb, h);
        const int32_t *qb = (const int32_t *)(q + (size_t)b * DAIR_QK);
        const __m512 d = dair_r512_f16_words(h[0], 0);
        const __m512 m = q41 ? dair_r512_f16_words(h[0], 1) : _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
        acc = dair_r512_q4_fma(dair_r512_isum(t, 4, qb, qb + 4), d, m, dx + b, sx + b, acc);
    }
    _mm512_storeu_ps(out + (size_t)i * ldo + r0, acc);
}

/* Q4_0's activation row for the 4-block loop above: per block 10 dwords under each of the
 * block's weight dwords (low nibbles, then high ones); see dair_r8_expand_q40. */
static void dair_r512_expand_q40(const dair_act *a, int i, int32_t *xz) {
    const uint8_t *q = (const uint8_t *)(a->q + (size_t)i * a->cols);
    for (int b = 0; b < a->nb; b++) {
        const uint8_t *qb = q + (size_t)b * DAIR_QK;
        uint32_t *o = (uint32_t *)xz + 10 * (size_t)b;
        for (int h = 0; h < 2; h++) {
            const uint8_t *v = qb + 16 * h;
            uint32_t *dw = o + 5 * h;
            if (b % 2 == 0) {
                dw[0] = (uint32_t)v[0] << 16 | (uint32_t)v[1] << 24;
                for (int k = 1; k < 4; k++)
                    memcpy(&dw[k], v + 4 * k - 2, 4);
                dw[4] = (uint32_t)v[14] | (uint32_t)v[15] << 8;
            } else {
                memcpy(dw, v, 16);
                dw[4] = 0;
            }
        }
    }
}

static void dair_r512_q4_1col(const uint8_t *w, size_t rb, int q41, const dair_act *a, int i, float *out, size_t ldo,
                             int r0, const uint8_t *pf, const uint8_t *pf_end, const int32_t *xz) {
    if (q41)
        dair_r512_q4_1col_t(w, rb, 1, a, i, out, ldo, r0, pf, pf_end, NULL);
    else
        dair_r512_q4_1col_t(w, rb, 0, a, i, out, ldo, r0, pf, pf_end, xz);
}

/* The panel of rows r0 .. r0+15 (DAIR_R512_PANEL bytes a block, 64-aligned). */
static void dair_r512_q4_panel(const uint8_t *w, size_t rb, int q41, int nb, int r0, __m512i *panel) {
    const size_t bs = q41 ? sizeof(dair_block_q4_1) : sizeof(dair_block_q4_0), qoff = q41 ? 4 : 2;
    const uint8_t *w0 = w + (size_t)r0 * rb;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w0 + (size_t)b * bs;
        __m512i t[4], h[4], *o = panel + (size_t)b * 10;
        dair_r512_t16(blk + qoff, rb, t);
        dair_r512_t16(blk, rb, h);
        for (int k = 0; k < 4; k++) {
            _mm512_store_si512((void *)(o + k), dair_r512_lo(t[k]));
            _mm512_store_si512((void *)(o + 4 + k), dair_r512_hi(t[k]));
        }
        const __m512 d = dair_r512_f16_words(h[0], 0);
        const __m512 m = q41 ? dair_r512_f16_words(h[0], 1) : _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
        _mm512_store_ps((float *)(o + 8), d);
        _mm512_store_ps((float *)(o + 9), m);
    }
}

/* The panel against C activation rows i0 .. i0+C-1 (C a constant at each call site). */
DAIR_INLINE void dair_r512_q4_panel_dot(const __m512i *panel, const dair_act *a, int i0, int C, float *out, size_t ldo,
                                       int r0) {
    const int nb = a->nb;
    __m512 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m512i *o = panel + (size_t)b * 10;
        const __m512 d = _mm512_load_ps((const float *)(o + 8)), m = _mm512_load_ps((const float *)(o + 9));
        for (int c = 0; c < C; c++) {
            const int32_t *qb = (const int32_t *)(a->q + (size_t)(i0 + c) * a->cols + (size_t)b * DAIR_QK);
            __m512i sl = _mm512_setzero_si512(), sh = _mm512_setzero_si512();
            for (int k = 0; k < 4; k++) {
                sl = _mm512_dpbusd_epi32(sl, _mm512_load_si512((const void *)(o + k)), _mm512_set1_epi32(qb[k]));
                sh = _mm512_dpbusd_epi32(sh, _mm512_load_si512((const void *)(o + 4 + k)), _mm512_set1_epi32(qb[4 + k]));
            }
            const size_t ai = (size_t)(i0 + c) * nb + b;
            acc[c] = dair_r512_q4_fma(_mm512_add_epi32(sl, sh), d, m, a->d + ai, a->s + ai, acc[c]);
        }
    }
    for (int c = 0; c < C; c++)
        _mm512_storeu_ps(out + (size_t)(i0 + c) * ldo + r0, acc[c]);
}

static void dair_r512_q4_panel_dot4(const __m512i *panel, const dair_act *a, int i0, float *out, size_t ldo, int r0) {
    dair_r512_q4_panel_dot(panel, a, i0, 4, out, ldo, r0);
}
static void dair_r512_q4_panel_dot1(const __m512i *panel, const dair_act *a, int i0, float *out, size_t ldo, int r0) {
    dair_r512_q4_panel_dot(panel, a, i0, 1, out, ldo, r0);
}

/* ---- Q8_0 -------------------------------------------------------------------------------- */

/* Q8_0 codes are signed and VPDPBUSD wants one unsigned operand: the code bytes are flipped to
 * w + 128 (one XOR; header bytes meet zero activation bytes) and 128 * sum(q) (the activation's
 * isum) is taken off, which gives dair_r8_q8's exact sums. The float step is dair_r8_q8's:
 * acc = fma(float(sum), d * dx, acc). */
#define DAIR_R512_Q8_PANEL 576 /* bytes a block: 8 zmm of w + 128, then d as 16 floats */

DAIR_INLINE __m512i dair_r512_u8(__m512i t) { return _mm512_xor_si512(t, _mm512_set1_epi8((char)0x80)); }

/* sum over k < nt of (w + 128 of t[k]) . x[k], two chains, starting from -128 * isum */
DAIR_INLINE __m512i dair_r512_q8_isum(const __m512i *t, int nt, const int32_t *x, int32_t isum) {
    __m512i s0 = _mm512_set1_epi32(-128 * isum), s1 = _mm512_setzero_si512();
    int k = 0;
    for (; k + 2 <= nt; k += 2) {
        s0 = _mm512_dpbusd_epi32(s0, dair_r512_u8(t[k]), _mm512_set1_epi32(x[k]));
        s1 = _mm512_dpbusd_epi32(s1, dair_r512_u8(t[k + 1]), _mm512_set1_epi32(x[k + 1]));
    }
    if (k < nt)
        s0 = _mm512_dpbusd_epi32(s0, dair_r512_u8(t[k]), _mm512_set1_epi32(x[k]));
    return _mm512_add_epi32(s0, s1);
}

DAIR_INLINE __m512 dair_r512_q8_fma(__m512i isum, __m512 d, const float *dx, __m512 acc) {
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, _mm512_set1_ps(*dx)), acc);
}

/* The activation row for the 2-block loop below: per block 9 dwords under the block's code dwords.
 * Two 34-byte blocks are 17 dwords; the even block's codes start 2 bytes into dword 0 and end 2
 * bytes into dword 8 (zeros under the d bytes), the odd block's are dwords 9 .. 16. */
static void dair_r512_expand_q8(const dair_act *a, int i, int32_t *xz) {
    const uint8_t *q = (const uint8_t *)(a->q + (size_t)i * a->cols);
    for (int b = 0; b < a->nb; b++) {
        const uint8_t *v = q + (size_t)b * DAIR_QK;
        uint32_t *dw = (uint32_t *)xz + 9 * (size_t)b;
        if (b % 2 == 0) {
            dw[0] = (uint32_t)v[0] << 16 | (uint32_t)v[1] << 24;
            for (int k = 1; k < 8; k++)
                memcpy(&dw[k], v + 4 * k - 2, 4);
            dw[8] = (uint32_t)v[30] | (uint32_t)v[31] << 8;
        } else {
            memcpy(dw, v, 32);
            dw[8] = 0;
        }
    }
}

/* Rows r0 .. r0+15 against activation row i (decode), xz: dair_r512_expand_q8's layout. */
static void dair_r512_q8_1col(const uint8_t *w, size_t rb, const dair_act *a, int i, float *out, size_t ldo, int r0,
                              const uint8_t *pf, const uint8_t *pf_end, const int32_t *xz) {
    const size_t bs = sizeof(dair_block_q8_0);
    const int nb = a->nb;
    const uint8_t *w0 = w + (size_t)r0 * rb;
    const float *dx = a->d + (size_t)i * nb;
    const int32_t *isum = a->isum + (size_t)i * nb;
    __m512 acc = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const uint8_t *g2 = w0 + (size_t)b * bs;
        dair_r8_pf_block(pf, pf_end, 16 * bs, b);
        dair_r8_pf_block(pf, pf_end, 16 * bs, b + 1);
        __m512i c[5][4];
        for (int h = 0; h < 4; h++)
            dair_r512_t16(g2 + 16 * h, rb, c[h]);
        dair_r512_t16(g2 + 52, rb, c[4]); /* dwords 13 .. 16 */
        const __m512i v[17] = {c[0][0], c[0][1], c[0][2], c[0][3], c[1][0], c[1][1], c[1][2], c[1][3], c[2][0],
                               c[2][1], c[2][2], c[2][3], c[3][0], c[3][1], c[3][2], c[3][3], c[4][3]};
        const int32_t *x = xz + 9 * (size_t)b;
        acc = dair_r512_q8_fma(dair_r512_q8_isum(v, 9, x, isum[b]), dair_r512_f16_words(v[0], 0), dx + b, acc);
        acc = dair_r512_q8_fma(dair_r512_q8_isum(v + 9, 8, x + 9, isum[b + 1]), dair_r512_f16_words(v[8], 1),
                               dx + b + 1, acc);
    }
    for (; b < nb; b++) { /* an odd last block */
        const uint8_t *blk = w0 + (size_t)b * bs;
        dair_r8_pf_block(pf, pf_end, 16 * bs, b);
        __m512i t[8], h[4];
        dair_r512_t16(blk + 2, rb, t);
        dair_r512_t16(blk + 18, rb, t + 4);
        dair_r512_t16(blk, rb, h);
        const int32_t *qb = (const int32_t *)(a->q + (size_t)i * a->cols + (size_t)b * DAIR_QK);
        acc = dair_r512_q8_fma(dair_r512_q8_isum(t, 8, qb, isum[b]), dair_r512_f16_words(h[0], 0), dx + b, acc);
    }
    _mm512_storeu_ps(out + (size_t)i * ldo + r0, acc);
}

static void dair_r512_q8_panel(const uint8_t *w, size_t rb, int nb, int r0, __m512i *panel) {
    const uint8_t *w0 = w + (size_t)r0 * rb;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w0 + (size_t)b * sizeof(dair_block_q8_0);
        __m512i t[8], h[4], *o = panel + (size_t)b * 9;
        dair_r512_t16(blk + 2, rb, t);
        dair_r512_t16(blk + 18, rb, t + 4);
        dair_r512_t16(blk, rb, h);
        for (int k = 0; k < 8; k++)
            _mm512_store_si512((void *)(o + k), dair_r512_u8(t[k]));
        _mm512_store_ps((float *)(o + 8), dair_r512_f16_words(h[0], 0));
    }
}

DAIR_INLINE void dair_r512_q8_panel_dot(const __m512i *panel, const dair_act *a, int i0, int C, float *out,
                                        size_t ldo, int r0) {
    const int nb = a->nb;
    __m512 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m512i *o = panel + (size_t)b * 9;
        const __m512 d = _mm512_load_ps((const float *)(o + 8));
        for (int c = 0; c < C; c++) {
            const size_t ai = (size_t)(i0 + c) * nb + b;
            const int32_t *x = (const int32_t *)(a->q + ai * DAIR_QK);
            __m512i s0 = _mm512_set1_epi32(-128 * a->isum[ai]), s1 = _mm512_setzero_si512();
            for (int k = 0; k < 8; k += 2) {
                s0 = _mm512_dpbusd_epi32(s0, _mm512_load_si512((const void *)(o + k)), _mm512_set1_epi32(x[k]));
                s1 = _mm512_dpbusd_epi32(s1, _mm512_load_si512((const void *)(o + k + 1)), _mm512_set1_epi32(x[k + 1]));
            }
            acc[c] = dair_r512_q8_fma(_mm512_add_epi32(s0, s1), d, a->d + ai, acc[c]);
        }
    }
    for (int c = 0; c < C; c++)
        _mm512_storeu_ps(out + (size_t)(i0 + c) * ldo + r0, acc[c]);
}

static void dair_r512_q8_panel_dot4(const __m512i *panel, const dair_act *a, int i0, float *out, size_t ldo, int r0) {
    dair_r512_q8_panel_dot(panel, a, i0, 4, out, ldo, r0);
}
static void dair_r512_q8_panel_dot1(const __m512i *panel, const dair_act *a, int i0, float *out, size_t ldo, int r0) {
    dair_r512_q8_panel_dot(panel, a, i0, 1, out, ldo, r0);
}

/* Rows [r0, r0 + 16 * groups) of a Q4_0/Q4_1/Q8_0 weight x all n activation rows. Returns 0, or 1 when
 * out of memory for the panel or Q4_0's expanded activation (then nothing was written and the
 * caller runs the AVX2 kernels, which give the same results). pf_end: prefetch stops there; NULL
 * for none. */
static int dair_r512_mm(const uint8_t *w, size_t rb, int qtype, int r0, int groups, const dair_act *a, float *out,
                       size_t ldo, const uint8_t *pf_end) {
    const int n = a->n, q41 = qtype == DAIR_Q4_1, q8 = qtype == DAIR_Q8_0;
    int32_t xs[48 * 10];
    int32_t *xz = NULL;
    __m512i *panel = NULL;
    if (n == 1 && !q41) { /* Q4_0's and Q8_0's activation in their 4- and 2-block layouts */
        xz = a->nb <= 48 ? xs : (int32_t *)malloc((size_t)a->nb * 40);
        if (xz == NULL)
            return 1;
        if (q8)
            dair_r512_expand_q8(a, 0, xz);
        else
            dair_r512_expand_q40(a, 0, xz);
    }
    if (n >= 2 && posix_memalign((void **)&panel, 64, (size_t)a->nb * (q8 ? DAIR_R512_Q8_PANEL : DAIR_R512_PANEL)))
        return 1;
    /* prefetch two groups ahead (one when a group alone is 16 KB or more) */
    const size_t pf_dist = 16 * rb < 16384 ? 32 * rb : 16 * rb;
    for (int g = 0; g < groups; g++) {
        const int r = r0 + 16 * g;
        const uint8_t *pf = pf_end != NULL ? w + (size_t)r * rb + pf_dist : w; /* none: pf = pf_end = w */
        const uint8_t *pfe = pf_end != NULL ? pf_end : w;
        if (q8 && n == 1) {
            dair_r512_q8_1col(w, rb, a, 0, out, ldo, r, pf, pfe, xz);
        } else if (q8) {
            dair_r512_q8_panel(w, rb, a->nb, r, panel);
            int i = 0;
            for (; i + 4 <= n; i += 4)
                dair_r512_q8_panel_dot4(panel, a, i, out, ldo, r);
            for (; i < n; i++)
                dair_r512_q8_panel_dot1(panel, a, i, out, ldo, r);
        } else if (n == 1) {
            dair_r512_q4_1col(w, rb, q41, a, 0, out, ldo, r, pf, pfe, xz);
        } else {
            dair_r512_q4_panel(w, rb, q41, a->nb, r, panel);
            int i = 0;
            for (; i + 4 <= n; i += 4)
                dair_r512_q4_panel_dot4(panel, a, i, out, ldo, r);
            for (; i < n; i++)
                dair_r512_q4_panel_dot1(panel, a, i, out, ldo, r);
        }
    }
    if (xz != NULL && xz != xs)
        free(xz);
    free(panel);
    return 0;
}

DAIR_AVX512_END
#endif
#endif
