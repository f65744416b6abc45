/* AVX2 kernels (no AVX-512 instruction) of the types in quants_ref.h, the way llama.cpp's
 * ggml-cpu/arch/x86/quants.c computes them: codes unpacked to bytes, u8 x s8 pair products
 * (maddubs; no int16 saturation for these ranges), then per-block scales. Integer sums are the
 * reference's exactly; only the float summation order differs. */
#ifndef DAIR_QUANTS_AVX2_H
#define DAIR_QUANTS_AVX2_H

#include "quants_ref.h"
#include "cpu.h"

#if defined(DAIR_HAVE_AVX2)

DAIR_INLINE float dair_hsum8_avx2(__m256 s) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

/* sum of u8 x s8 over groups of 4 bytes, as int32 lanes */
DAIR_INLINE __m256i dair_mul_u8s8_avx2(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}

/* 0xFF in byte j where bit j of the 32-bit word is set (llama.cpp's bytes_from_bits_32). */
DAIR_INLINE __m256i dair_bytes_from_bits_avx2(uint32_t bits) {
    const __m256i shuf = _mm256_setr_epi64x(0x0000000000000000LL, 0x0101010101010101LL, 0x0202020202020202LL,
                                            0x0303030303030303LL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), shuf);
    const __m256i bit = _mm256_set1_epi64x(0x8040201008040201LL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit);
}

/* 32 nibbles in value order: low nibbles (values 0-15), high nibbles (16-31). */
DAIR_INLINE __m256i dair_nibbles32_avx2(const uint8_t *qs) {
    const __m128i raw = _mm_loadu_si128((const __m128i *)qs);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0F));
}

DAIR_INLINE __m256i dair_q5_codes_avx2(const uint8_t *qh4, const uint8_t *qs) {
    uint32_t qh;
    memcpy(&qh, qh4, 4);
    return _mm256_or_si256(dair_nibbles32_avx2(qs),
                           _mm256_and_si256(dair_bytes_from_bits_avx2(qh), _mm256_set1_epi8(0x10)));
}

/* The 32-value types against C activation rows (C constant at each call site: 1 for decode, 4
 * for prefill; row c at q + 32 c nb, d + c nb, s + c nb, isum + c nb): a block's codes are
 * unpacked once for all C rows, and each row's arithmetic is the same whatever C. */

/* Q5_0 = 5-bit codes - 16, signed: each block's values once as |v| (unsigned) and their signs, which
 * every activation row takes onto its own bytes (maddubs wants one side unsigned): no
 * - 16 * sum(q) correction per block and row (a float one was a third of a prefill's time). */
DAIR_INLINE void dair_q5_0_rows_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, int C, float *res) {
    const size_t cols = (size_t)nb * 32;
    __m256 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_0 *x = (const dair_block_q5_0 *)(w + (size_t)b * sizeof(dair_block_q5_0));
        const __m256i v = _mm256_sub_epi8(dair_q5_codes_avx2(x->qh, x->qs), _mm256_set1_epi8(16));
        const __m256i av = _mm256_sign_epi8(v, v);
        const float wd = _cvtsh_ss(dair_load_u16(&x->d));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const __m256i a = _mm256_loadu_si256((const __m256i *)(q + c * cols + (size_t)b * 32));
            const __m256i p = dair_mul_u8s8_avx2(av, _mm256_sign_epi8(a, v));
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(wd * d[rb]), _mm256_cvtepi32_ps(p), acc[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = dair_hsum8_avx2(acc[c]);
}

static float dair_vec_dot_q5_0_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *isum) {
    (void)s, (void)isum;
    float r;
    dair_q5_0_rows_avx2(w, nb, q, d, 1, &r);
    return r;
}

static void dair_vec_dot4_q5_0_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *isum, float res[4]) {
    (void)s, (void)isum;
    dair_q5_0_rows_avx2(w, nb, q, d, 4, res);
}

DAIR_INLINE void dair_q5_1_rows_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                     int C, float *res) {
    const size_t cols = (size_t)nb * 32;
    __m256 acc[4];
    float summ[4];
    for (int c = 0; c < C; c++) {
        acc[c] = _mm256_setzero_ps();
        summ[c] = 0.0f;
    }
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_1 *x = (const dair_block_q5_1 *)(w + (size_t)b * sizeof(dair_block_q5_1));
        const __m256i u = dair_q5_codes_avx2(x->qh, x->qs);
        const float wd = _cvtsh_ss(dair_load_u16(&x->d)), m = _cvtsh_ss(dair_load_u16(&x->m));
        for (int c = 0; c < C; c++) {
            const size_t rb = (size_t)c * nb + b;
            const __m256i p = dair_mul_u8s8_avx2(u, _mm256_loadu_si256((const __m256i *)(q + c * cols + (size_t)b * 32)));
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(wd * d[rb]), _mm256_cvtepi32_ps(p), acc[c]);
            summ[c] += m * s[rb];
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = dair_hsum8_avx2(acc[c]) + summ[c];
}

static float dair_vec_dot_q5_1_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *isum) {
    (void)isum;
    float r;
    dair_q5_1_rows_avx2(w, nb, q, d, s, 1, &r);
    return r;
}

static void dair_vec_dot4_q5_1_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *isum, float res[4]) {
    (void)isum;
    dair_q5_1_rows_avx2(w, nb, q, d, s, 4, res);
}

DAIR_INLINE __m256i dair_iq4_table_avx2(void) {
    return _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)dair_iq4_values));
}

DAIR_INLINE void dair_iq4_nl_rows_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, int C, float *res) {
    const size_t cols = (size_t)nb * 32;
    const __m256i table = dair_iq4_table_avx2();
    __m256 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_iq4_nl *x = (const dair_block_iq4_nl *)(w + (size_t)b * sizeof(dair_block_iq4_nl));
        /* signed codes x signed activations: |c| (u8) against q with c's sign (s8), as llama.cpp does */
        const __m256i cv = _mm256_shuffle_epi8(table, dair_nibbles32_avx2(x->qs));
        const __m256i ac = _mm256_sign_epi8(cv, cv);
        const float wd = _cvtsh_ss(dair_load_u16(&x->d));
        for (int c = 0; c < C; c++) {
            const __m256i y = _mm256_loadu_si256((const __m256i *)(q + c * cols + (size_t)b * 32));
            const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(ac, _mm256_sign_epi8(y, cv)), _mm256_set1_epi16(1));
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(wd * d[(size_t)c * nb + b]), _mm256_cvtepi32_ps(p), acc[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = dair_hsum8_avx2(acc[c]);
}

static float dair_vec_dot_iq4_nl_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *isum) {
    (void)s, (void)isum;
    float r;
    dair_iq4_nl_rows_avx2(w, nb, q, d, 1, &r);
    return r;
}

static void dair_vec_dot4_iq4_nl_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *isum, float res[4]) {
    (void)s, (void)isum;
    dair_iq4_nl_rows_avx2(w, nb, q, d, 4, res);
}

DAIR_INLINE int dair_hsum_i32_avx2(__m256i v) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    return _mm_cvtsi128_si32(h);
}

/* 32 unsigned codes (u8, small enough for maddubs) against 32 activations; values 0-15 take
 * scale lo, 16-31 scale hi (the same for 32-value sub-blocks): int32 lanes */
DAIR_INLINE __m256i dair_kq32_avx2(__m256i u, const int8_t *q, int lo, int hi) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)q)),
                             _mm256_set_m128i(_mm_set1_epi16((short)hi), _mm_set1_epi16((short)lo)));
}

static float dair_vec_dot_q2_k_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *bsums) {
    (void)s;
    const __m256i m3 = _mm256_set1_epi8(3);
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q2_K *x = (const dair_block_q2_K *)(w + (size_t)b * sizeof(dair_block_q2_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        const int32_t *bs = bsums + (size_t)b * 16;
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * h));
            for (int j = 0; j < 4; j++) {
                const int k = 8 * h + 2 * j;
                const __m256i u = _mm256_and_si256(_mm256_srli_epi16(raw, 2 * j), m3);
                sumi = _mm256_add_epi32(sumi, dair_kq32_avx2(u, y + 128 * h + 32 * j, x->scales[k] & 15,
                                                             x->scales[k + 1] & 15));
            }
        }
        int summs = 0;
        for (int k = 0; k < 16; k++)
            summs += (x->scales[k] >> 4) * bs[k];
        const float dall = d[b] * _cvtsh_ss(dair_load_u16(&x->d)), dmin = d[b] * _cvtsh_ss(dair_load_u16(&x->dmin));
        acc += dall * (float)dair_hsum_i32_avx2(sumi) - dmin * (float)summs;
    }
    return acc;
}

/* Q3_K codes - 4 .. 3 as unsigned 0 .. 7 (low two bits | high bit << 2); the - 4 comes back as
 * - 4 sum_k sc[k] bsums[k]. */
static float dair_vec_dot_q3_k_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *bsums) {
    (void)s;
    const __m256i m3 = _mm256_set1_epi8(3), four = _mm256_set1_epi8(4);
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q3_K *x = (const dair_block_q3_K *)(w + (size_t)b * sizeof(dair_block_q3_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        const int32_t *bs = bsums + (size_t)b * 16;
        int8_t sc[16];
        dair_q3k_scales(x->scales, sc);
        const __m256i hm = _mm256_loadu_si256((const __m256i *)x->hmask);
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * h));
            for (int j = 0; j < 4; j++) {
                const int k = 8 * h + 2 * j;
                const __m256i bit = _mm256_set1_epi8((char)(1 << (4 * h + j)));
                const __m256i hb = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), four);
                const __m256i u = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 2 * j), m3), hb);
                sumi = _mm256_add_epi32(sumi, dair_kq32_avx2(u, y + 128 * h + 32 * j, sc[k] - 32, sc[k + 1] - 32));
            }
        }
        int corr = 0;
        for (int k = 0; k < 16; k++)
            corr += (sc[k] - 32) * bs[k];
        acc += (_cvtsh_ss(dair_load_u16(&x->d)) * d[b]) * (float)(dair_hsum_i32_avx2(sumi) - 4 * corr);
    }
    return acc;
}

/* pshufb controls for int16 scale vectors: word j of each 128-bit lane in every word; and
 * word j in the low lane, j + 1 in the high one */
DAIR_INLINE __m256i dair_kq_word(int j) { return _mm256_set1_epi16((short)(0x0100 * (2 * j + 1) + 2 * j)); }
DAIR_INLINE __m256i dair_kq_word2(int j) {
    return _mm256_set_m128i(_mm_set1_epi16((short)(0x0100 * (2 * j + 3) + 2 * j + 2)),
                            _mm_set1_epi16((short)(0x0100 * (2 * j + 1) + 2 * j)));
}

DAIR_INLINE float dair_hsum_ps_avx2(__m256 v) { return dair_hsum8_avx2(v); }

/* Q4_K/Q5_K's dair_q4k_scales as bytes: sc[0..7] then m[0..7] (three word loads; a 12-byte
 * memcpy went through the stack) */
DAIR_INLINE __m128i dair_q4k_scales_x(const uint8_t *s12) {
    uint32_t u0, u1, u2;
    memcpy(&u0, s12, 4);
    memcpy(&u1, s12 + 4, 4);
    memcpy(&u2, s12 + 8, 4);
    return _mm_setr_epi32((int)(u0 & 0x3F3F3F3Fu), (int)((u2 & 0x0F0F0F0Fu) | ((u0 >> 6) & 0x03030303u) << 4),
                          (int)(u1 & 0x3F3F3F3Fu), (int)(((u2 >> 4) & 0x0F0F0F0Fu) | ((u1 >> 6) & 0x03030303u) << 4));
}

/* m[j] as int32 in the order _mm256_hadd_epi32(bsums[0..7], bsums[8..15]) leaves the pair sums
 * of the bsums (0 1 4 5 | 2 3 6 7): the min term is one mullo against them. */
DAIR_INLINE __m256i dair_q4k_mins32(__m128i sm8) {
    return _mm256_cvtepu8_epi32(
        _mm_shuffle_epi8(sm8, _mm_setr_epi8(8, 9, 12, 13, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1)));
}

/* One Q5_K weight row against C activation rows (row c at q + c * nb * 256, d + c * nb, bsums +
 * c * nb * 16); the block's scales are unpacked once for the C rows, and C = 1 does the same
 * float operations per row (so dot and dot4 agree bit for bit). */
DAIR_INLINE void dair_q5k_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const int32_t *bsums, int C,
                               float *res) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), b16 = _mm256_set1_epi8(0x10);
    const size_t qstride = (size_t)nb * DAIR_QKK;
    __m256 acc[4], accm[4];
    for (int c = 0; c < C; c++)
        acc[c] = accm[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_K *x = (const dair_block_q5_K *)(w + (size_t)b * sizeof(dair_block_q5_K));
        const __m128i sm8 = dair_q4k_scales_x(x->scales);
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm8));
        const __m256i m32 = dair_q4k_mins32(sm8);
        const __m256i qh = _mm256_loadu_si256((const __m256i *)x->qh);
        __m256i sumi[4];
        for (int c = 0; c < C; c++)
            sumi[c] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * k));
            /* bit 2k (2k + 1) of each qh byte moved to bit 4 by one 16-bit shift: at most 4 places,
             * so every bit stays within its byte */
            const __m256i h0 = 2 * k <= 4 ? _mm256_slli_epi16(qh, 4 - 2 * k) : _mm256_srli_epi16(qh, 2 * k - 4);
            const __m256i h1 = 2 * k + 1 <= 4 ? _mm256_slli_epi16(qh, 3 - 2 * k) : _mm256_srli_epi16(qh, 2 * k - 3);
            const __m256i u0 = _mm256_or_si256(_mm256_and_si256(raw, m4), _mm256_and_si256(h0, b16));
            const __m256i u1 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), _mm256_and_si256(h1, b16));
            const __m256i s0 = _mm256_shuffle_epi8(sc16, dair_kq_word(2 * k));
            const __m256i s1 = _mm256_shuffle_epi8(sc16, dair_kq_word(2 * k + 1));
            for (int c = 0; c < C; c++) {
                const int8_t *y = q + c * qstride + (size_t)b * DAIR_QKK + 64 * k;
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(u0, _mm256_loadu_si256((const __m256i *)y)), s0);
                const __m256i p1 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(u1, _mm256_loadu_si256((const __m256i *)(y + 32))), s1);
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p0, p1));
            }
        }
        uint32_t dm;
        memcpy(&dm, x, 4);
        const __m128 wd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm)); /* d, dmin */
        for (int c = 0; c < C; c++) {
            const int32_t *bs = bsums + (size_t)c * nb * 16 + (size_t)b * 16;
            const __m256i pairs = _mm256_hadd_epi32(_mm256_loadu_si256((const __m256i *)bs),
                                                    _mm256_loadu_si256((const __m256i *)(bs + 8)));
            const __m128 f = _mm_mul_ps(wd, _mm_set1_ps(d[(size_t)c * nb + b]));
            acc[c] = _mm256_fmadd_ps(_mm256_broadcastss_ps(f), _mm256_cvtepi32_ps(sumi[c]), acc[c]);
            accm[c] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(f)),
                                      _mm256_cvtepi32_ps(_mm256_mullo_epi32(m32, pairs)), accm[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = dair_hsum8_avx2(acc[c]) - dair_hsum8_avx2(accm[c]);
}

static float dair_vec_dot_q5_k_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *bsums) {
    (void)s;
    float r;
    dair_q5k_avx2(w, nb, q, d, bsums, 1, &r);
    return r;
}

static void dair_vec_dot4_q5_k_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *bsums, float res[4]) {
    (void)s;
    dair_q5k_avx2(w, nb, q, d, bsums, 4, res);
}

/* IQ4_XS against C activation rows (row c at q + 256 c nb, d + c nb), as the 32-value types. */
DAIR_INLINE void dair_iq4_xs_rows_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, int C, float *res) {
    const __m256i table = dair_iq4_table_avx2();
    __m256 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_iq4_xs *x = (const dair_block_iq4_xs *)(w + (size_t)b * sizeof(dair_block_iq4_xs));
        __m256i sumi[4];
        for (int c = 0; c < C; c++)
            sumi[c] = _mm256_setzero_si256();
        for (int sb = 0; sb < 8; sb++) {
            const __m256i cv = _mm256_shuffle_epi8(table, dair_nibbles32_avx2(x->qs + 16 * sb));
            const __m256i ac = _mm256_sign_epi8(cv, cv);
            const __m256i sc = _mm256_set1_epi16((short)dair_iq4xs_scale(x, sb));
            for (int c = 0; c < C; c++) {
                const __m256i y = _mm256_loadu_si256((const __m256i *)(q + ((size_t)c * nb + b) * DAIR_QKK + 32 * sb));
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_madd_epi16(_mm256_maddubs_epi16(ac, _mm256_sign_epi8(y, cv)), sc));
            }
        }
        const float wd = _cvtsh_ss(dair_load_u16(&x->d));
        for (int c = 0; c < C; c++)
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(wd * d[(size_t)c * nb + b]), _mm256_cvtepi32_ps(sumi[c]), acc[c]);
    }
    for (int c = 0; c < C; c++)
        res[c] = dair_hsum8_avx2(acc[c]);
}

static float dair_vec_dot_iq4_xs_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums) {
    (void)s, (void)bsums;
    float r;
    dair_iq4_xs_rows_avx2(w, nb, q, d, 1, &r);
    return r;
}

static void dair_vec_dot4_iq4_xs_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums, float res[4]) {
    (void)s, (void)bsums;
    dair_iq4_xs_rows_avx2(w, nb, q, d, 4, res);
}

#endif
#endif
