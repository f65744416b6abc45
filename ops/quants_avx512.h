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

DAIR_AVX512_END
#endif
#endif
