/* AVX-512 (F, BW, VL, VNNI) kernels of the types in quants_ref.h: VPDPBUSD on the codes as
 * unsigned bytes against the signed activation, two 32-value blocks per zmm where the layout
 * allows. Built on any x86-64 compiler, run only where dair_cpu_family() says AVX512. */
#ifndef DAIR_QUANTS_AVX512_H
#define DAIR_QUANTS_AVX512_H

#include "quants_ref.h"
#include "cpu.h"

#if defined(DAIR_BUILD_AVX512)
DAIR_AVX512_BEGIN

/* Q5_0 codes (unsigned 0..31) of one block in value order. */
DAIR_INLINE __m256i dair_q5_codes_avx512(const uint8_t *qh4, const uint8_t *qs) {
    uint32_t qh;
    memcpy(&qh, qh4, 4);
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    const __m256i nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
    return _mm256_or_si256(nib, _mm256_maskz_mov_epi8((__mmask32)qh, _mm256_set1_epi8(0x10)));
}

/* Nibbles of two 32-value blocks (16 bytes each) in value order: low, high of block 0, then of 1. */
DAIR_INLINE __m512i dair_nibbles64_avx512(const uint8_t *qs0, const uint8_t *qs1) {
    const __m256i v = _mm256_loadu2_m128i((const __m128i *)qs1, (const __m128i *)qs0);
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m512i lh = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(v, m4)),
                                          _mm256_and_si256(_mm256_srli_epi16(v, 4), m4), 1);
    return _mm512_shuffle_i64x2(lh, lh, _MM_SHUFFLE(3, 1, 2, 0));
}

/* Q5 codes of two blocks: the nibbles plus 16 where the block's qh bit is set. */
DAIR_INLINE __m512i dair_q5_codes64_avx512(const uint8_t *qs0, const uint8_t *qh0, const uint8_t *qs1,
                                           const uint8_t *qh1) {
    uint32_t h0, h1;
    memcpy(&h0, qh0, 4);
    memcpy(&h1, qh1, 4);
    const __m512i nib = dair_nibbles64_avx512(qs0, qs1);
    return _mm512_mask_add_epi8(nib, (__mmask64)h0 | (__mmask64)h1 << 32, nib, _mm512_set1_epi8(0x10));
}

/* [a0 x 8, a1 x 8] * [b0 x 8, b1 x 8] from two weight scales as floats (lanes 0, 1 of a) and two
 * consecutive activation scales (b). */
DAIR_INLINE __m512 dair_two_scales_avx512(__m128 a, const float *b) {
    const __m128 f = _mm_mul_ps(a, _mm_castpd_ps(_mm_load_sd((const double *)b)));
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(f));
}

/* Two fp16 fields as floats in lanes 0 and 1. */
DAIR_INLINE __m128 dair_two_f16_avx512(uint16_t a0, uint16_t a1) {
    return _mm_cvtph_ps(_mm_cvtsi32_si128((int)((uint32_t)a0 | (uint32_t)a1 << 16)));
}

/* The 32-value types against C activation rows (C constant at each call site: 1 for decode, 4
 * for prefill; row c at q + 32 c nb, d + c nb, s + c nb, isum + c nb). Two blocks are unpacked
 * per zmm once for all C rows; each row's arithmetic is the same whatever C, so a prefill row
 * gets the decode result bit for bit. */
DAIR_INLINE void dair_q5_0_rows_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const int32_t *isum,
                                       int C, float *res) {
    const size_t cols = (size_t)nb * 32;
    const __m512i k16 = _mm512_set1_epi8(16);
    __m512 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const dair_block_q5_0 *x0 = (const dair_block_q5_0 *)(w + (size_t)b * sizeof(dair_block_q5_0));
        const dair_block_q5_0 *x1 = x0 + 1;
        const __m512i u = dair_q5_codes64_avx512(x0->qs, x0->qh, x1->qs, x1->qh);
        const __m128 wd = dair_two_f16_avx512(dair_load_u16(&x0->d), dair_load_u16(&x1->d));
        for (int c = 0; c < C; c++) {
            const __m512i y = _mm512_loadu_si512((const void *)(q + c * cols + (size_t)b * 32));
            /* codes - 16: sum(c q) - 16 sum(q), both by VPDPBUSD in the same lanes */
            const __m512i p = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, y),
                                               _mm512_dpbusd_epi32(_mm512_setzero_si512(), k16, y));
            acc[c] = _mm512_fmadd_ps(dair_two_scales_avx512(wd, d + (size_t)c * nb + b), _mm512_cvtepi32_ps(p), acc[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = _mm512_reduce_add_ps(acc[c]);
    for (; b < nb; b++) {
        const dair_block_q5_0 *x = (const dair_block_q5_0 *)(w + (size_t)b * sizeof(dair_block_q5_0));
        const __m256i u = dair_q5_codes_avx512(x->qh, x->qs);
        const float wd = _cvtsh_ss(dair_load_u16(&x->d));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u,
                                                  _mm256_loadu_si256((const __m256i *)(q + rb * 32)));
            const int sumi = _mm512_reduce_add_epi32(_mm512_zextsi256_si512(p)) - 16 * isum[rb];
            res[c] += wd * d[rb] * (float)sumi;
        }
    }
}

static float dair_vec_dot_q5_0_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *isum) {
    (void)s;
    float r;
    dair_q5_0_rows_avx512(w, nb, q, d, isum, 1, &r);
    return r;
}

static void dair_vec_dot4_q5_0_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *isum, float res[4]) {
    (void)s;
    dair_q5_0_rows_avx512(w, nb, q, d, isum, 4, res);
}

DAIR_INLINE void dair_q5_1_rows_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                       int C, float *res) {
    const size_t cols = (size_t)nb * 32;
    __m512 acc[4];
    __m128 summ[4];
    for (int c = 0; c < C; c++) {
        acc[c] = _mm512_setzero_ps();
        summ[c] = _mm_setzero_ps();
    }
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const dair_block_q5_1 *x0 = (const dair_block_q5_1 *)(w + (size_t)b * sizeof(dair_block_q5_1));
        const dair_block_q5_1 *x1 = x0 + 1;
        const __m512i u = dair_q5_codes64_avx512(x0->qs, x0->qh, x1->qs, x1->qh);
        const __m128 wd = dair_two_f16_avx512(dair_load_u16(&x0->d), dair_load_u16(&x1->d));
        const __m128 m = dair_two_f16_avx512(dair_load_u16(&x0->m), dair_load_u16(&x1->m));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u,
                                                  _mm512_loadu_si512((const void *)(q + c * cols + (size_t)b * 32)));
            acc[c] = _mm512_fmadd_ps(dair_two_scales_avx512(wd, d + rb), _mm512_cvtepi32_ps(p), acc[c]);
            summ[c] = _mm_fmadd_ps(m, _mm_castpd_ps(_mm_load_sd((const double *)(s + rb))), summ[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = _mm512_reduce_add_ps(acc[c]) + _mm_cvtss_f32(summ[c]) + _mm_cvtss_f32(_mm_movehdup_ps(summ[c]));
    for (; b < nb; b++) {
        const dair_block_q5_1 *x = (const dair_block_q5_1 *)(w + (size_t)b * sizeof(dair_block_q5_1));
        const __m256i u = dair_q5_codes_avx512(x->qh, x->qs);
        const float wd = _cvtsh_ss(dair_load_u16(&x->d)), m = _cvtsh_ss(dair_load_u16(&x->m));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), u,
                                                  _mm256_loadu_si256((const __m256i *)(q + rb * 32)));
            res[c] += wd * d[rb] * (float)_mm512_reduce_add_epi32(_mm512_zextsi256_si512(p)) + m * s[rb];
        }
    }
}

static float dair_vec_dot_q5_1_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *isum) {
    (void)isum;
    float r;
    dair_q5_1_rows_avx512(w, nb, q, d, s, 1, &r);
    return r;
}

static void dair_vec_dot4_q5_1_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *isum, float res[4]) {
    (void)isum;
    dair_q5_1_rows_avx512(w, nb, q, d, s, 4, res);
}

/* Signed codes against signed activations with VPDPBUSD: (c + 128) . q - 128 sum(q), exactly.
 * `cu` is c + 128 (c ^ 0x80), formed once per weight block. */
DAIR_INLINE __m512i dair_dot_s8s8_avx512(__m512i cu, __m512i y) {
    const __m512i k128 = _mm512_set1_epi8((char)0x80);
    return _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), cu, y),
                            _mm512_dpbusd_epi32(_mm512_setzero_si512(), k128, y));
}

DAIR_INLINE __m512i dair_iq4_table_avx512(void) {
    return _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)dair_iq4_values));
}

/* 32 nibbles of 16 bytes in value order (low nibbles, then high), as a ymm */
DAIR_INLINE __m256i dair_nibbles32_avx512(const uint8_t *qs) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}

DAIR_INLINE void dair_iq4_nl_rows_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, int C,
                                         float *res) {
    const size_t cols = (size_t)nb * 32;
    /* the code table + 128: unsigned codes for VPDPBUSD straight out of the shuffle */
    const __m512i table_u = _mm512_xor_si512(dair_iq4_table_avx512(), _mm512_set1_epi8((char)0x80));
    __m512 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const dair_block_iq4_nl *x0 = (const dair_block_iq4_nl *)(w + (size_t)b * sizeof(dair_block_iq4_nl));
        const dair_block_iq4_nl *x1 = x0 + 1;
        const __m512i u = _mm512_shuffle_epi8(table_u, dair_nibbles64_avx512(x0->qs, x1->qs));
        const __m128 wd = dair_two_f16_avx512(dair_load_u16(&x0->d), dair_load_u16(&x1->d));
        for (int c = 0; c < C; c++) {
            const __m512i p = dair_dot_s8s8_avx512(u, _mm512_loadu_si512((const void *)(q + c * cols + (size_t)b * 32)));
            acc[c] = _mm512_fmadd_ps(dair_two_scales_avx512(wd, d + (size_t)c * nb + b), _mm512_cvtepi32_ps(p), acc[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = _mm512_reduce_add_ps(acc[c]);
    for (; b < nb; b++) { /* the last odd block: the upper half of the zmm is zero */
        const dair_block_iq4_nl *x = (const dair_block_iq4_nl *)(w + (size_t)b * sizeof(dair_block_iq4_nl));
        const __m512i u = _mm512_shuffle_epi8(table_u, _mm512_zextsi256_si512(dair_nibbles32_avx512(x->qs)));
        const float wd = _cvtsh_ss(dair_load_u16(&x->d));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const __m512i y = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(q + rb * 32)));
            /* zero activations in the upper half: their (code + 128) terms vanish too */
            res[c] += wd * d[rb] * (float)_mm512_reduce_add_epi32(dair_dot_s8s8_avx512(u, y));
        }
    }
}

static float dair_vec_dot_iq4_nl_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                        const int32_t *isum) {
    (void)s, (void)isum;
    float r;
    dair_iq4_nl_rows_avx512(w, nb, q, d, 1, &r);
    return r;
}

static void dair_vec_dot4_iq4_nl_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                        const int32_t *isum, float res[4]) {
    (void)s, (void)isum;
    dair_iq4_nl_rows_avx512(w, nb, q, d, 4, res);
}

/* K-quants, 64 values per zmm: u8 x s8 pair products of the unsigned codes with the activation
 * (VPMADDUBSW; codes <= 31 cannot saturate int16), then VPDPWSSD with each pair's sub-block scale
 * as int16 adds them into int32 lanes: the integer sum per super-block exactly as llama.cpp's,
 * then one float FMA per super-block. Pair lane i of zmm z holds values 64 z + 2 i, + 1, in
 * sub-block (64 z + 2 i) / L, whose scale VPERMW picks out of the block's sixteen. */
DAIR_INLINE __m512i dair_kq_idx16(int z, int L) {
    const __m512i i = _mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19, 18, 17, 16, 15, 14, 13, 12,
                                       11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    return _mm512_srli_epi16(_mm512_add_epi16(_mm512_set1_epi16((short)(64 * z)), _mm512_slli_epi16(i, 1)),
                             L == 16 ? 4 : 5);
}

DAIR_INLINE __m512i dair_kq64_avx512(__m512i acc, __m512i u, const int8_t *y, __m512i sc16, int z, int L) {
    const __m512i p = _mm512_maddubs_epi16(u, _mm512_loadu_si512((const void *)y));
    return _mm512_dpwssd_epi32(acc, p, _mm512_permutexvar_epi16(dair_kq_idx16(z, L), sc16));
}

/* The 2-bit fields (qs[32h + l] >> 2j) & 3 for j = j0 (low 256 bits) and j0 + 1 (high): shifts of
 * the ymm and one insert (VPSRLVW would cost more shuffle-port work). */
DAIR_INLINE __m512i dair_crumbs64_avx512(const uint8_t *qs32, int j0) {
    const __m256i r = _mm256_loadu_si256((const __m256i *)qs32), m3 = _mm256_set1_epi8(3);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(_mm256_srli_epi16(r, 2 * j0), m3)),
                              _mm256_and_si256(_mm256_srli_epi16(r, 2 * j0 + 2), m3), 1);
}

/* byte mask of bit b0 (low 256 bits) and b0 + 1 (high) of 32 bytes repeated */
DAIR_INLINE __mmask64 dair_bits64_avx512(__m512i bytes2, int b0) {
    const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << b0)), _mm256_set1_epi8((char)(2 << b0)), 1);
    return _mm512_test_epi8_mask(bytes2, bit);
}

DAIR_INLINE __m512i dair_bsums_avx512(const int32_t *bsums) { return _mm512_loadu_si512((const void *)bsums); }

/* Q2_K against C activation rows (as dair_q5k_rows_avx512 below). */
DAIR_INLINE void dair_q2k_rows_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const int32_t *bsums,
                                      int C, float *res) {
    __m512 acc[4], accm[4];
    for (int c = 0; c < C; c++)
        acc[c] = accm[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q2_K *x = (const dair_block_q2_K *)(w + (size_t)b * sizeof(dair_block_q2_K));
        const __m128i raw = _mm_loadu_si128((const __m128i *)x->scales);
        const __m512i sc16 = _mm512_zextsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(raw, _mm_set1_epi8(0x0F))));
        const __m512i mn = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F)));
        __m512i u[4], sc[4];
        for (int z = 0; z < 4; z++) {
            u[z] = dair_crumbs64_avx512(x->qs + 32 * (z / 2), 2 * (z % 2));
            sc[z] = _mm512_permutexvar_epi16(dair_kq_idx16(z, 16), sc16);
        }
        const float dw = _cvtsh_ss(dair_load_u16(&x->d)), dm = _cvtsh_ss(dair_load_u16(&x->dmin));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const int8_t *y = q + rb * DAIR_QKK;
            __m512i sumi = _mm512_setzero_si512();
            for (int z = 0; z < 4; z++)
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(u[z], _mm512_loadu_si512((const void *)(y + 64 * z))),
                                           sc[z]);
            const __m512i summs = _mm512_mullo_epi32(mn, dair_bsums_avx512(bsums + rb * 16));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(d[rb] * dw), acc[c]);
            accm[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(summs), _mm512_set1_ps(d[rb] * dm), accm[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[c], accm[c]));
}

static float dair_vec_dot_q2_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums) {
    (void)s;
    float r;
    dair_q2k_rows_avx512(w, nb, q, d, bsums, 1, &r);
    return r;
}

static void dair_vec_dot4_q2_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums, float res[4]) {
    (void)s;
    dair_q2k_rows_avx512(w, nb, q, d, bsums, 4, res);
}

/* dair_q3k_scales in registers (a store and a wider reload would stall store forwarding). */
DAIR_INLINE __m128i dair_q3k_scales_avx512(const uint8_t *s) {
    uint32_t a0, a1, t;
    memcpy(&a0, s, 4);
    memcpy(&a1, s + 4, 4);
    memcpy(&t, s + 8, 4);
    return _mm_setr_epi32((int)((a0 & 0x0F0F0F0Fu) | ((t & 0x03030303u) << 4)),
                          (int)((a1 & 0x0F0F0F0Fu) | (((t >> 2) & 0x03030303u) << 4)),
                          (int)(((a0 >> 4) & 0x0F0F0F0Fu) | (((t >> 4) & 0x03030303u) << 4)),
                          (int)(((a1 >> 4) & 0x0F0F0F0Fu) | (((t >> 6) & 0x03030303u) << 4)));
}

/* Q4_K/Q5_K's eight 6-bit scales and mins as two 64-bit words of bytes (see dair_q4k_scales). */
DAIR_INLINE void dair_q4k_scales_avx512(const uint8_t *s, uint64_t *sc, uint64_t *m) {
    uint32_t u[3];
    memcpy(u, s, 12);
    *sc = (uint64_t)(u[0] & 0x3F3F3F3Fu) | (uint64_t)((u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4)) << 32;
    *m = (uint64_t)(u[1] & 0x3F3F3F3Fu) | (uint64_t)(((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4))
                                              << 32;
}

/* Q3_K against C activation rows (as dair_q5k_rows_avx512 below). */
DAIR_INLINE void dair_q3k_rows_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const int32_t *bsums,
                                      int C, float *res) {
    __m512 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q3_K *x = (const dair_block_q3_K *)(w + (size_t)b * sizeof(dair_block_q3_K));
        const __m256i s16 = _mm256_sub_epi16(_mm256_cvtepi8_epi16(dair_q3k_scales_avx512(x->scales)),
                                             _mm256_set1_epi16(32));
        const __m512i m4s = _mm512_cvtepi16_epi32(_mm256_slli_epi16(s16, 2)); /* 4 sc[k] */
        const __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x->hmask));
        __m512i u[4], sc[4];
        for (int z = 0; z < 4; z++) {
            const int h = z / 2, j0 = 2 * (z % 2);
            u[z] = dair_crumbs64_avx512(x->qs + 32 * h, j0);
            u[z] = _mm512_mask_add_epi8(u[z], dair_bits64_avx512(hm, 4 * h + j0), u[z], _mm512_set1_epi8(4));
            sc[z] = _mm512_permutexvar_epi16(dair_kq_idx16(z, 16), _mm512_zextsi256_si512(s16));
        }
        const float dw = _cvtsh_ss(dair_load_u16(&x->d));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const int8_t *y = q + rb * DAIR_QKK;
            /* codes are u - 4: start from - 4 sum_k sc[k] bsums[k] */
            __m512i sumi = _mm512_mullo_epi32(m4s, _mm512_sub_epi32(_mm512_setzero_si512(), dair_bsums_avx512(bsums + rb * 16)));
            for (int z = 0; z < 4; z++)
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(u[z], _mm512_loadu_si512((const void *)(y + 64 * z))),
                                           sc[z]);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(dw * d[rb]), acc[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = _mm512_reduce_add_ps(acc[c]);
}

static float dair_vec_dot_q3_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums) {
    (void)s;
    float r;
    dair_q3k_rows_avx512(w, nb, q, d, bsums, 1, &r);
    return r;
}

static void dair_vec_dot4_q3_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums, float res[4]) {
    (void)s;
    dair_q3k_rows_avx512(w, nb, q, d, bsums, 4, res);
}

/* Q5_K against C activation rows (C constant at each call site; row c at q + c * 256 nb, d + c nb,
 * bsums + 16 c nb): the codes and scales of a super-block are unpacked once for all of them. */
DAIR_INLINE void dair_q5k_rows_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const int32_t *bsums,
                                      int C, float *res) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    /* bsums k and k+1 summed per sub-block of 32: lanes 2j, 2j+1 -> j */
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 0, 0, 0, 0, 0, 0, 0, 0);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 0, 0, 0, 0, 0, 0, 0, 0);
    __m512 acc[4], accm[4];
    for (int c = 0; c < C; c++)
        acc[c] = accm[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_K *x = (const dair_block_q5_K *)(w + (size_t)b * sizeof(dair_block_q5_K));
        uint64_t scw, mw;
        dair_q4k_scales_avx512(x->scales, &scw, &mw);
        const __m512i sc16 = _mm512_zextsi256_si512(_mm256_cvtepu8_epi16(_mm_cvtsi64_si128((long long)scw)));
        const __m512i mn = _mm512_cvtepu8_epi32(_mm_cvtsi64_si128((long long)mw));
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x->qh));
        __m512i u[4], sc[4];
        for (int z = 0; z < 4; z++) {
            const __m256i r = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * z));
            u[z] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(r, m4)),
                                      _mm256_and_si256(_mm256_srli_epi16(r, 4), m4), 1);
            u[z] = _mm512_mask_add_epi8(u[z], dair_bits64_avx512(qh, 2 * z), u[z], _mm512_set1_epi8(16));
            sc[z] = _mm512_permutexvar_epi16(dair_kq_idx16(z, 32), sc16);
        }
        const float dw = _cvtsh_ss(dair_load_u16(&x->d)), dm = _cvtsh_ss(dair_load_u16(&x->dmin));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const int8_t *y = q + rb * DAIR_QKK;
            __m512i sumi = _mm512_setzero_si512();
            for (int z = 0; z < 4; z++)
                sumi = _mm512_dpwssd_epi32(sumi, _mm512_maddubs_epi16(u[z], _mm512_loadu_si512((const void *)(y + 64 * z))),
                                           sc[z]);
            const __m512i bs = dair_bsums_avx512(bsums + rb * 16);
            const __m512i b32 = _mm512_add_epi32(_mm512_permutexvar_epi32(even, bs), _mm512_permutexvar_epi32(odd, bs));
            const __m512i summ = _mm512_maskz_mullo_epi32(0x00FF, mn, b32);
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi), _mm512_set1_ps(dw * d[rb]), acc[c]);
            accm[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(summ), _mm512_set1_ps(dm * d[rb]), accm[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = _mm512_reduce_add_ps(_mm512_sub_ps(acc[c], accm[c]));
}

static float dair_vec_dot_q5_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums) {
    (void)s;
    float r;
    dair_q5k_rows_avx512(w, nb, q, d, bsums, 1, &r);
    return r;
}

static void dair_vec_dot4_q5_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums, float res[4]) {
    (void)s;
    dair_q5k_rows_avx512(w, nb, q, d, bsums, 4, res);
}

/* IQ4_XS codes are signed up to 127: products as |c| x (q with c's sign), which fit int16
 * pairs (2 * 127 * 127), then VPDPWSSD with the sub-block scale. Against C activation rows (row c
 * at q + 256 c nb, d + c nb), as the 32-value types above. */
DAIR_INLINE void dair_iq4_xs_rows_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, int C,
                                         float *res) {
    const __m512i table = dair_iq4_table_avx512();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i sh_l = _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28), sh_h = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
    __m512 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_iq4_xs *x = (const dair_block_iq4_xs *)(w + (size_t)b * sizeof(dair_block_iq4_xs));
        uint32_t sl;
        memcpy(&sl, x->scales_l, 4);
        /* sc[s] = (nibble s of scales_l | 2-bit field s of scales_h << 4) - 32 */
        const __m256i lo = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)sl), sh_l), _mm256_set1_epi32(15));
        const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(dair_load_u16(&x->scales_h)), sh_h),
                                            _mm256_set1_epi32(3));
        const __m256i sc32 = _mm256_sub_epi32(_mm256_or_si256(lo, _mm256_slli_epi32(hi, 4)), _mm256_set1_epi32(32));
        const __m512i sc16 = _mm512_zextsi128_si512(_mm256_cvtepi32_epi16(sc32));
        __m512i sumi[4];
        for (int c = 0; c < C; c++)
            sumi[c] = _mm512_setzero_si512();
        for (int z = 0; z < 4; z++) {
            /* sub-blocks 2z, 2z+1: bytes 0-15 and 16-31 of qs + 32z, low nibbles before high */
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * z));
            const __m512i lh = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, m4)),
                                                  _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), 1);
            const __m512i cv = _mm512_shuffle_epi8(table, _mm512_shuffle_i64x2(lh, lh, _MM_SHUFFLE(3, 1, 2, 0)));
            const __mmask64 neg = _mm512_movepi8_mask(cv);
            const __m512i ac = _mm512_abs_epi8(cv);
            const __m512i sc = _mm512_permutexvar_epi16(dair_kq_idx16(z, 32), sc16);
            for (int c = 0; c < C; c++) {
                const __m512i yv = _mm512_loadu_si512((const void *)(q + ((size_t)c * nb + b) * DAIR_QKK + 64 * z));
                const __m512i ys = _mm512_mask_sub_epi8(yv, neg, _mm512_setzero_si512(), yv);
                sumi[c] = _mm512_dpwssd_epi32(sumi[c], _mm512_maddubs_epi16(ac, ys), sc);
            }
        }
        const float wd = _cvtsh_ss(dair_load_u16(&x->d));
        for (int c = 0; c < C; c++)
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sumi[c]), _mm512_set1_ps(wd * d[(size_t)c * nb + b]), acc[c]);
    }
    for (int c = 0; c < C; c++)
        res[c] = _mm512_reduce_add_ps(acc[c]);
}

static float dair_vec_dot_iq4_xs_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                        const int32_t *bsums) {
    (void)s, (void)bsums;
    float r;
    dair_iq4_xs_rows_avx512(w, nb, q, d, 1, &r);
    return r;
}

static void dair_vec_dot4_iq4_xs_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                        const int32_t *bsums, float res[4]) {
    (void)s, (void)bsums;
    dair_iq4_xs_rows_avx512(w, nb, q, d, 4, res);
}

DAIR_AVX512_END
#endif
#endif
