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

static float dair_vec_dot_q5_0_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *isum) {
    (void)s;
    __m512 acc = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const dair_block_q5_0 *x0 = (const dair_block_q5_0 *)(w + (size_t)b * sizeof(dair_block_q5_0));
        const dair_block_q5_0 *x1 = x0 + 1;
        const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(dair_q5_codes_avx512(x0->qh, x0->qs)),
                                             dair_q5_codes_avx512(x1->qh, x1->qs), 1);
        /* lane 0 of each half starts at the block's -16 sum(q) */
        const __m512i corr = _mm512_setr_epi32(-16 * isum[b], 0, 0, 0, 0, 0, 0, 0, -16 * isum[b + 1], 0, 0, 0, 0, 0,
                                               0, 0);
        const __m512i p = _mm512_dpbusd_epi32(corr, c, _mm512_loadu_si512((const void *)(q + (size_t)b * 32)));
        const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(dair_load_u16(&x0->d)) * d[b]),
                                             _mm256_set1_ps(_cvtsh_ss(dair_load_u16(&x1->d)) * d[b + 1]), 1);
        acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc);
    }
    float r = _mm512_reduce_add_ps(acc);
    for (; b < nb; b++) {
        const dair_block_q5_0 *x = (const dair_block_q5_0 *)(w + (size_t)b * sizeof(dair_block_q5_0));
        __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), dair_q5_codes_avx512(x->qh, x->qs),
                                        _mm256_loadu_si256((const __m256i *)(q + (size_t)b * 32)));
        const int sumi = _mm512_reduce_add_epi32(_mm512_zextsi256_si512(p)) - 16 * isum[b];
        r += _cvtsh_ss(dair_load_u16(&x->d)) * d[b] * (float)sumi;
    }
    return r;
}

static float dair_vec_dot_q5_1_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *isum) {
    (void)isum;
    __m512 acc = _mm512_setzero_ps();
    float summ = 0.0f;
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const dair_block_q5_1 *x0 = (const dair_block_q5_1 *)(w + (size_t)b * sizeof(dair_block_q5_1));
        const dair_block_q5_1 *x1 = x0 + 1;
        const __m512i c = _mm512_inserti64x4(_mm512_castsi256_si512(dair_q5_codes_avx512(x0->qh, x0->qs)),
                                             dair_q5_codes_avx512(x1->qh, x1->qs), 1);
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c,
                                              _mm512_loadu_si512((const void *)(q + (size_t)b * 32)));
        const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(dair_load_u16(&x0->d)) * d[b]),
                                             _mm256_set1_ps(_cvtsh_ss(dair_load_u16(&x1->d)) * d[b + 1]), 1);
        acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc);
        summ += _cvtsh_ss(dair_load_u16(&x0->m)) * s[b] + _cvtsh_ss(dair_load_u16(&x1->m)) * s[b + 1];
    }
    float r = _mm512_reduce_add_ps(acc) + summ;
    for (; b < nb; b++) {
        const dair_block_q5_1 *x = (const dair_block_q5_1 *)(w + (size_t)b * sizeof(dair_block_q5_1));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), dair_q5_codes_avx512(x->qh, x->qs),
                                              _mm256_loadu_si256((const __m256i *)(q + (size_t)b * 32)));
        r += _cvtsh_ss(dair_load_u16(&x->d)) * d[b] * (float)_mm512_reduce_add_epi32(_mm512_zextsi256_si512(p)) +
             _cvtsh_ss(dair_load_u16(&x->m)) * s[b];
    }
    return r;
}

/* Signed codes against signed activations with VPDPBUSD: (c + 128) . q - 128 sum(q), exactly. */
DAIR_INLINE __m512i dair_dot_s8s8_avx512(__m512i c, __m512i y) {
    const __m512i k128 = _mm512_set1_epi8((char)0x80);
    return _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_xor_si512(c, k128), y),
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

static float dair_vec_dot_iq4_nl_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                        const int32_t *isum) {
    (void)s, (void)isum;
    const __m512i table = dair_iq4_table_avx512();
    __m512 acc = _mm512_setzero_ps();
    int b = 0;
    for (; b + 2 <= nb; b += 2) {
        const dair_block_iq4_nl *x0 = (const dair_block_iq4_nl *)(w + (size_t)b * sizeof(dair_block_iq4_nl));
        const dair_block_iq4_nl *x1 = x0 + 1;
        const __m512i nib = _mm512_inserti64x4(_mm512_castsi256_si512(dair_nibbles32_avx512(x0->qs)),
                                               dair_nibbles32_avx512(x1->qs), 1);
        const __m512i p = dair_dot_s8s8_avx512(_mm512_shuffle_epi8(table, nib),
                                               _mm512_loadu_si512((const void *)(q + (size_t)b * 32)));
        const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(_cvtsh_ss(dair_load_u16(&x0->d)) * d[b]),
                                             _mm256_set1_ps(_cvtsh_ss(dair_load_u16(&x1->d)) * d[b + 1]), 1);
        acc = _mm512_fmadd_ps(sc, _mm512_cvtepi32_ps(p), acc);
    }
    float r = _mm512_reduce_add_ps(acc);
    for (; b < nb; b++) { /* the last odd block: the upper half of the zmm is zero */
        const dair_block_iq4_nl *x = (const dair_block_iq4_nl *)(w + (size_t)b * sizeof(dair_block_iq4_nl));
        const __m512i c = _mm512_shuffle_epi8(table, _mm512_zextsi256_si512(dair_nibbles32_avx512(x->qs)));
        const __m512i y = _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)(q + (size_t)b * 32)));
        r += _cvtsh_ss(dair_load_u16(&x->d)) * d[b] * (float)_mm512_reduce_add_epi32(dair_dot_s8s8_avx512(c, y));
    }
    return r;
}

/* K-quants, 64 values per zmm: VPDPBUSD of the unsigned codes with the activation gives 16
 * int32 lanes of 4 values each; lane l of zmm z lies in sub-block (64 z + 4 l) / L, whose scale
 * VPERMD picks from the block's scales (as int32). Exact integer sums, as llama.cpp's. */
DAIR_INLINE __m512i dair_kq_scale_idx(int z, int L) {
    const __m512i l = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return _mm512_srli_epi32(_mm512_add_epi32(_mm512_set1_epi32(64 * z), _mm512_slli_epi32(l, 2)), L == 16 ? 4 : 5);
}

DAIR_INLINE __m512i dair_kq64_avx512(__m512i acc, __m512i u, const int8_t *y, __m512i sc, __m512i idx) {
    const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_loadu_si512((const void *)y));
    return _mm512_add_epi32(acc, _mm512_mullo_epi32(p, _mm512_permutexvar_epi32(idx, sc)));
}

/* The 2-bit fields (qs[32h + l] >> 2j) & 3 for j = j0 (low 256 bits) and j0 + 1 (high). */
DAIR_INLINE __m512i dair_crumbs64_avx512(const uint8_t *qs32, int j0) {
    const __m512i r = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)qs32));
    const __m512i sh = _mm512_inserti64x4(_mm512_set1_epi16((short)(2 * j0)), _mm256_set1_epi16((short)(2 * j0 + 2)), 1);
    return _mm512_and_si512(_mm512_srlv_epi16(r, sh), _mm512_set1_epi8(3));
}

/* byte mask of bit b0 (low 256 bits) and b0 + 1 (high) of 32 bytes repeated */
DAIR_INLINE __mmask64 dair_bits64_avx512(__m512i bytes2, int b0) {
    const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8((char)(1 << b0)), _mm256_set1_epi8((char)(2 << b0)), 1);
    return _mm512_test_epi8_mask(bytes2, bit);
}

static float dair_vec_dot_q2_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums) {
    (void)s;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q2_K *x = (const dair_block_q2_K *)(w + (size_t)b * sizeof(dair_block_q2_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        const __m128i raw = _mm_loadu_si128((const __m128i *)x->scales);
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_and_si128(raw, _mm_set1_epi8(0x0F)));
        const __m512i mn = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F)));
        __m512i sumi = _mm512_setzero_si512();
        for (int z = 0; z < 4; z++)
            sumi = dair_kq64_avx512(sumi, dair_crumbs64_avx512(x->qs + 32 * (z / 2), 2 * (z % 2)), y + 64 * z, sc,
                                    dair_kq_scale_idx(z, 16));
        const int summs = _mm512_reduce_add_epi32(
            _mm512_mullo_epi32(mn, _mm512_loadu_si512((const void *)(bsums + (size_t)b * 16))));
        const float dall = d[b] * _cvtsh_ss(dair_load_u16(&x->d)), dmin = d[b] * _cvtsh_ss(dair_load_u16(&x->dmin));
        acc += dall * (float)_mm512_reduce_add_epi32(sumi) - dmin * (float)summs;
    }
    return acc;
}

static float dair_vec_dot_q3_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums) {
    (void)s;
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q3_K *x = (const dair_block_q3_K *)(w + (size_t)b * sizeof(dair_block_q3_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        int8_t sc8[16];
        dair_q3k_scales(x->scales, sc8);
        const __m512i sc = _mm512_sub_epi32(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)sc8)),
                                            _mm512_set1_epi32(32));
        const __m512i hm = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x->hmask));
        __m512i sumi = _mm512_setzero_si512();
        for (int z = 0; z < 4; z++) {
            const int h = z / 2, j0 = 2 * (z % 2);
            __m512i u = dair_crumbs64_avx512(x->qs + 32 * h, j0);
            u = _mm512_mask_add_epi8(u, dair_bits64_avx512(hm, 4 * h + j0), u, _mm512_set1_epi8(4));
            sumi = dair_kq64_avx512(sumi, u, y + 64 * z, sc, dair_kq_scale_idx(z, 16));
        }
        /* codes are u - 4 */
        const int corr = _mm512_reduce_add_epi32(
            _mm512_mullo_epi32(sc, _mm512_loadu_si512((const void *)(bsums + (size_t)b * 16))));
        acc += (_cvtsh_ss(dair_load_u16(&x->d)) * d[b]) * (float)(_mm512_reduce_add_epi32(sumi) - 4 * corr);
    }
    return acc;
}

static float dair_vec_dot_q5_k_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                      const int32_t *bsums) {
    (void)s;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    const __m512i sh = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_K *x = (const dair_block_q5_K *)(w + (size_t)b * sizeof(dair_block_q5_K));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        const int32_t *bs = bsums + (size_t)b * 16;
        uint8_t sc8[16], m8[8];
        dair_q4k_scales(x->scales, sc8, m8);
        const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)sc8));
        const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x->qh));
        __m512i sumi = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            const __m512i r = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(x->qs + 32 * c)));
            __m512i u = _mm512_and_si512(_mm512_srlv_epi16(r, sh), m4);
            u = _mm512_mask_add_epi8(u, dair_bits64_avx512(qh, 2 * c), u, _mm512_set1_epi8(16));
            sumi = dair_kq64_avx512(sumi, u, y + 64 * c, sc, dair_kq_scale_idx(c, 32));
        }
        int summ = 0;
        for (int j = 0; j < 8; j++)
            summ += m8[j] * (bs[2 * j] + bs[2 * j + 1]);
        acc += _cvtsh_ss(dair_load_u16(&x->d)) * d[b] * (float)_mm512_reduce_add_epi32(sumi) -
               _cvtsh_ss(dair_load_u16(&x->dmin)) * d[b] * (float)summ;
    }
    return acc;
}

static float dair_vec_dot_iq4_xs_avx512(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                        const int32_t *bsums) {
    (void)s, (void)bsums;
    const __m512i table = dair_iq4_table_avx512();
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_iq4_xs *x = (const dair_block_iq4_xs *)(w + (size_t)b * sizeof(dair_block_iq4_xs));
        const int8_t *y = q + (size_t)b * DAIR_QKK;
        int32_t sc32[16];
        for (int sb = 0; sb < 8; sb++)
            sc32[sb] = dair_iq4xs_scale(x, sb);
        const __m512i sc = _mm512_loadu_si512((const void *)sc32); /* lanes 8-15 unused */
        __m512i sumi = _mm512_setzero_si512();
        for (int z = 0; z < 4; z++) {
            /* sub-blocks 2z, 2z+1: bytes 0-15 and 16-31 of qs + 32z, low nibbles before high */
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(x->qs + 32 * z));
            const __m512i lh = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(raw, m4)),
                                                  _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4), 1);
            const __m512i nib = _mm512_shuffle_i64x2(lh, lh, _MM_SHUFFLE(3, 1, 2, 0));
            const __m512i p = dair_dot_s8s8_avx512(_mm512_shuffle_epi8(table, nib),
                                                   _mm512_loadu_si512((const void *)(y + 64 * z)));
            sumi = _mm512_add_epi32(sumi, _mm512_mullo_epi32(p, _mm512_permutexvar_epi32(dair_kq_scale_idx(z, 32), sc)));
        }
        acc += (_cvtsh_ss(dair_load_u16(&x->d)) * d[b]) * (float)_mm512_reduce_add_epi32(sumi);
    }
    return acc;
}

DAIR_AVX512_END
#endif
#endif
