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

/* Q5_0 = unsigned 5-bit codes - 16: sum(code * q) - 16 * sum(q), sum(q) from the activation. */
static float dair_vec_dot_q5_0_avx2(const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                                    const int32_t *isum) {
    (void)s;
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q5_0 *x = (const dair_block_q5_0 *)(w + (size_t)b * sizeof(dair_block_q5_0));
        __m256i p = dair_mul_u8s8_avx2(dair_q5_codes_avx2(x->qh, x->qs),
                                       _mm256_loadu_si256((const __m256i *)(q + (size_t)b * 32)));
        /* the -16 term on one lane keeps the block's integer sum exact */
        p = _mm256_sub_epi32(p, _mm256_setr_epi32(16 * isum[b], 0, 0, 0, 0, 0, 0, 0));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(_cvtsh_ss(dair_load_u16(&x->d)) * d[b]), _mm256_cvtepi32_ps(p), acc);
    }
    return dair_hsum8_avx2(acc);
}

#endif
#endif
