/* K-quant (Q4_K, Q6_K) weights: dequantization and products with Q8_K activations.
 *
 * Layouts are in blocks.h. The 8-bit path is llama.cpp's: each activation row
 * is quantized per 256 values to Q8_K (float d = max / -127, int8 q, int16 sums
 * of 16) exactly as quantize_row_q8_K_ref does, then per super-block
 *   Q4_K: d_w d_x sum_j sc[j] (nib_j . q_j) - dmin_w d_x sum_j m[j] (bsums of j)
 *   Q6_K: d_w d_x sum_k scales[k] ((q6_k - 32) . q_k)
 * The integer sums are exact in every kernel family (scalar, AVX2, AVX-512),
 * so they differ only in float summation order. Included by qdot.h.
 */
#ifndef DAIR_KQUANTS_H
#define DAIR_KQUANTS_H

#include "qdot.h" /* the activations, prefetch and AVX2 helpers these kernels build on */

/* ---- Q8_K activations ---------------------------------------------------- */

#if defined(DAIR_BUILD_AVX512)
DAIR_AVX512_BEGIN
/* One super-block of quantize_row_q8_K_ref below, bit for bit: the first value of largest
 * magnitude sets the scale, the same float product rounded half to even. q4k_order stores
 * the 32-byte chunks in the order 0 2 1 3 4 6 5 7 (see dair_quantize_q8k_wide). Returns
 * the 16 sums of 16 in natural order. The scalar loop costs ~8 us per 4096 values, a few
 * percent of a 4096-row product. */
static __m512i dair_q8k_block512(const float *xb, int8_t *qb, float *d, int q4k_order) {
    __m512 v[16];
    __m512 am = _mm512_setzero_ps();
    for (int k = 0; k < 16; k++) {
        v[k] = _mm512_loadu_ps(xb + 16 * k);
        am = _mm512_max_ps(am, _mm512_abs_ps(v[k]));
    }
    const float amax = _mm512_reduce_max_ps(am);
    if (amax == 0.0f) {
        *d = 0.0f;
        memset(qb, 0, DAIR_QKK);
        return _mm512_setzero_si512();
    }
    float mx = 0.0f;
    for (int k = 0; k < 16; k++) {
        __mmask16 e = _mm512_cmp_ps_mask(_mm512_abs_ps(v[k]), _mm512_set1_ps(amax), _CMP_EQ_OQ);
        if (e) {
            mx = xb[16 * k + __builtin_ctz(e)];
            break;
        }
    }
    const float iscale = -127.0f / mx;
    const __m512 vs = _mm512_set1_ps(iscale);
    for (int k = 0; k < 16; k++) {
        __m512i i = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v[k], vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        i = _mm512_min_epi32(i, _mm512_set1_epi32(127));
        const int c = k / 2, pos = q4k_order && (c & 3) && (c & 3) < 3 ? (c ^ 3) : c;
        _mm_storeu_si128((__m128i *)(qb + 32 * pos + 16 * (k & 1)), _mm512_cvtepi32_epi8(i));
    }
    *d = 1.0f / iscale;
    /* sums of 16 via SAD of q + 128: qword j of zmm k is the sum of bytes 64k + 8j .. +7 */
    __m512i u[4];
    for (int k = 0; k < 4; k++)
        u[k] = _mm512_sad_epu8(_mm512_xor_si512(_mm512_loadu_si512((const void *)(qb + 64 * k)), _mm512_set1_epi8(-128)),
                               _mm512_setzero_si512());
    __m512i w01 = _mm512_or_si512(u[0], _mm512_slli_epi64(u[1], 32));
    __m512i w23 = _mm512_or_si512(u[2], _mm512_slli_epi64(u[3], 32));
    w01 = _mm512_add_epi32(w01, _mm512_shuffle_epi32(w01, _MM_PERM_BADC));
    w23 = _mm512_add_epi32(w23, _mm512_shuffle_epi32(w23, _MM_PERM_BADC));
    /* dword 4g + m now holds stored group 4m + g */
    __m512i r = _mm512_sub_epi32(_mm512_unpacklo_epi64(w01, w23), _mm512_set1_epi32(16 * 128));
    /* natural group G sits at stored group M(G), at dword 4 (M % 4) + M / 4 */
    static const int32_t nat[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
    static const int32_t q4k[16] = {0, 4, 1, 5, 8, 12, 9, 13, 2, 6, 3, 7, 10, 14, 11, 15};
    return _mm512_permutexvar_epi32(_mm512_loadu_si512((const void *)(q4k_order ? q4k : nat)), r);
}

static void dair_quantize_q8k_row512(const float *x, int nb, int8_t *q, float *d, int32_t *bsums) {
    for (int b = 0; b < nb; b++)
        _mm512_storeu_si512((void *)(bsums + (size_t)b * 16),
                            dair_q8k_block512(x + (size_t)b * DAIR_QKK, q + (size_t)b * DAIR_QKK, d + b, 0));
}
DAIR_AVX512_END
#endif

#if defined(DAIR_HAVE_AVX2)
/* One super-block of the scalar loop below, bit for bit (the first value of largest magnitude
 * sets the scale; the same float products, rounded half to even). */
static void dair_q8k_block_avx2(const float *xb, int8_t *qb, float *d, int32_t *bsums) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 am = _mm256_setzero_ps();
    for (int k = 0; k < 32; k++)
        am = _mm256_max_ps(am, _mm256_and_ps(_mm256_loadu_ps(xb + 8 * k), absmask));
    const float amax = dair_hmax8_avx2(am);
    if (amax == 0.0f) {
        *d = 0.0f;
        memset(qb, 0, DAIR_QKK);
        memset(bsums, 0, 16 * sizeof(int32_t));
        return;
    }
    float mx = 0.0f;
    const __m256 va = _mm256_set1_ps(amax);
    for (int k = 0; k < 32; k++) {
        const int e = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(xb + 8 * k), absmask), va, _CMP_EQ_OQ));
        if (e) {
            mx = xb[8 * k + __builtin_ctz((unsigned)e)];
            break;
        }
    }
    const float iscale = -127.0f / mx;
    const __m256 vs = _mm256_set1_ps(iscale);
    const __m256i top = _mm256_set1_epi32(127);
    for (int g = 0; g < 8; g++) { /* 32 values: bsums 2g, 2g + 1 */
        __m256i i[4];
        for (int k = 0; k < 4; k++)
            i[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xb + 32 * g + 8 * k), vs)), top);
        _mm256_storeu_si256((__m256i *)(qb + 32 * g), dair_pack32_avx2(i[0], i[1], i[2], i[3]));
        /* [s0 lanes 0-3 + 4-7 ...]: hadd of the two 16-value halves, then across lanes */
        const __m256i h = _mm256_hadd_epi32(_mm256_add_epi32(i[0], i[1]), _mm256_add_epi32(i[2], i[3]));
        const __m128i h2 = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        const __m128i h3 = _mm_hadd_epi32(h2, h2);
        bsums[2 * g] = _mm_cvtsi128_si32(h3);
        bsums[2 * g + 1] = _mm_extract_epi32(h3, 1);
    }
    *d = 1.0f / iscale;
}
#endif

/* quantize_row_q8_K_ref: the value of largest magnitude (first one, with its
 * sign) maps to -127 (+127 after the clamp below never triggers on it), rounding
 * half to even. bsums are kept as int32 for the kernels. */
static void dair_quantize_q8k_row(const float *x, int cols, int8_t *q, float *d, int32_t *bsums) {
    int nb = cols / DAIR_QKK;
#if defined(DAIR_BUILD_AVX512)
    if (dair_use_avx512) {
        dair_quantize_q8k_row512(x, nb, q, d, bsums);
        return;
    }
#endif
#if defined(DAIR_HAVE_AVX2)
    if (dair_simd_enabled) {
        for (int b = 0; b < nb; b++)
            dair_q8k_block_avx2(x + (size_t)b * DAIR_QKK, q + (size_t)b * DAIR_QKK, d + b, bsums + (size_t)b * 16);
        return;
    }
#endif
    for (int b = 0; b < nb; b++) {
        const float *xb = x + (size_t)b * DAIR_QKK;
        int8_t *qb = q + (size_t)b * DAIR_QKK;
        float amax = 0.0f, mx = 0.0f;
        for (int j = 0; j < DAIR_QKK; j++) {
            float ax = fabsf(xb[j]);
            if (ax > amax) {
                amax = ax;
                mx = xb[j];
            }
        }
        if (amax == 0.0f) {
            d[b] = 0.0f;
            memset(qb, 0, DAIR_QKK);
            for (int k = 0; k < 16; k++)
                bsums[(size_t)b * 16 + k] = 0;
            continue;
        }
        const float iscale = -127.0f / mx;
        for (int j = 0; j < DAIR_QKK; j++) {
            int v = (int)nearbyintf(iscale * xb[j]);
            qb[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int k = 0; k < 16; k++) {
            int s = 0;
            for (int j = 0; j < 16; j++)
                s += qb[16 * k + j];
            bsums[(size_t)b * 16 + k] = s;
        }
        d[b] = 1.0f / iscale;
    }
}

/* ---- dequantization ------------------------------------------------------ */

static void dair_dequant_q4k(const uint8_t *src, int cols, float *dst) {
    for (int b = 0; b < cols / DAIR_QKK; b++) {
        const dair_block_q4_K *blk = (const dair_block_q4_K *)(src + (size_t)b * sizeof(dair_block_q4_K));
        const float d = dair_fp16_to_fp32(dair_load_u16(&blk->d));
        const float dmin = dair_fp16_to_fp32(dair_load_u16(&blk->dmin));
        uint8_t sc[8], m[8];
        dair_q4k_scales(blk->scales, sc, m);
        float *o = dst + (size_t)b * DAIR_QKK;
        for (int c = 0; c < 4; c++) {
            const float d0 = d * sc[2 * c], m0 = dmin * m[2 * c];
            const float d1 = d * sc[2 * c + 1], m1 = dmin * m[2 * c + 1];
            const uint8_t *qs = blk->qs + 32 * c;
            for (int l = 0; l < 32; l++) {
                o[64 * c + l] = d0 * (float)(qs[l] & 15) - m0;
                o[64 * c + 32 + l] = d1 * (float)(qs[l] >> 4) - m1;
            }
        }
    }
}

#if defined(DAIR_HAVE_AVX2)
/* The 32 six-bit codes of quarter t (values 32t .. 32t+31 of a half), unsigned. */
DAIR_INLINE __m256i dair_q6k_quarter(__m256i l0, __m256i l1, __m256i qh, int t) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x30);
    switch (t) {
    case 0:
        return _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m2));
    case 1:
        return _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m2));
    case 2:
        return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(qh, m2));
    default:
        return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                               _mm256_and_si256(_mm256_srli_epi16(qh, 2), m2));
    }
}
#endif

static void dair_dequant_q6k(const uint8_t *src, int cols, float *dst) {
#if defined(DAIR_HAVE_AVX2)
    /* byte shuffling into 4 strided outputs defeats the auto-vectorizer (several times slower) */
    for (int b = 0; b < cols / DAIR_QKK; b++) {
        const dair_block_q6_K *blk = (const dair_block_q6_K *)(src + (size_t)b * sizeof(dair_block_q6_K));
        const float d = _cvtsh_ss(dair_load_u16(&blk->d));
        for (int h = 0; h < 2; h++) {
            const uint8_t *L = blk->ql + 64 * h;
            __m256i qh = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
            __m256i l0 = _mm256_loadu_si256((const __m256i *)L);
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(L + 32));
            for (int t = 0; t < 4; t++) {
                __m256i q = _mm256_sub_epi8(dair_q6k_quarter(l0, l1, qh, t), _mm256_set1_epi8(32));
                __m128i qlo = _mm256_castsi256_si128(q), qhi = _mm256_extracti128_si256(q, 1);
                float *y = dst + (size_t)b * DAIR_QKK + 128 * h + 32 * t;
                const __m256 s0 = _mm256_set1_ps(d * blk->scales[8 * h + 2 * t]);
                const __m256 s1 = _mm256_set1_ps(d * blk->scales[8 * h + 2 * t + 1]);
                _mm256_storeu_ps(y, _mm256_mul_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qlo))));
                _mm256_storeu_ps(y + 8,
                                 _mm256_mul_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qlo, 8)))));
                _mm256_storeu_ps(y + 16, _mm256_mul_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(qhi))));
                _mm256_storeu_ps(y + 24,
                                 _mm256_mul_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(qhi, 8)))));
            }
        }
    }
    return;
#endif
    for (int b = 0; b < cols / DAIR_QKK; b++) {
        const dair_block_q6_K *blk = (const dair_block_q6_K *)(src + (size_t)b * sizeof(dair_block_q6_K));
        const float d = dair_fp16_to_fp32(dair_load_u16(&blk->d));
        float *o = dst + (size_t)b * DAIR_QKK;
        for (int h = 0; h < 2; h++) {
            const uint8_t *L = blk->ql + 64 * h, *H = blk->qh + 32 * h;
            const int8_t *sc = blk->scales + 8 * h;
            float *y = o + 128 * h;
            /* scales hoisted per 16 values so that the compiler vectorizes the inner loop */
            for (int is = 0; is < 2; is++) {
                const float s0 = d * sc[is], s1 = d * sc[is + 2], s2 = d * sc[is + 4], s3 = d * sc[is + 6];
                for (int l = 16 * is; l < 16 * is + 16; l++) {
                    y[l] = s0 * (float)((int)((L[l] & 15) | ((H[l] & 3) << 4)) - 32);
                    y[l + 32] = s1 * (float)((int)((L[l + 32] & 15) | (((H[l] >> 2) & 3) << 4)) - 32);
                    y[l + 64] = s2 * (float)((int)((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32);
                    y[l + 96] = s3 * (float)((int)((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32);
                }
            }
        }
    }
}

/* ---- dot products with Q8_K: scalar -------------------------------------- */

static float dair_dot_q4k_scalar(const uint8_t *wrow, int nb, const int8_t *q, const float *dx, const int32_t *bs) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q4_K *blk = (const dair_block_q4_K *)(wrow + (size_t)b * sizeof(dair_block_q4_K));
        const int8_t *a = q + (size_t)b * DAIR_QKK;
        const int32_t *bsum = bs + (size_t)b * 16;
        uint8_t sc[8], m[8];
        dair_q4k_scales(blk->scales, sc, m);
        int sumi = 0, summ = 0;
        for (int c = 0; c < 4; c++) {
            int s0 = 0, s1 = 0;
            for (int l = 0; l < 32; l++) {
                s0 += (blk->qs[32 * c + l] & 15) * a[64 * c + l];
                s1 += (blk->qs[32 * c + l] >> 4) * a[64 * c + 32 + l];
            }
            sumi += sc[2 * c] * s0 + sc[2 * c + 1] * s1;
        }
        for (int j = 0; j < 8; j++)
            summ += m[j] * (bsum[2 * j] + bsum[2 * j + 1]);
        acc += dair_fp16_to_fp32_soft(dair_load_u16(&blk->d)) * dx[b] * (float)sumi -
               dair_fp16_to_fp32_soft(dair_load_u16(&blk->dmin)) * dx[b] * (float)summ;
    }
    return acc;
}

static float dair_dot_q6k_scalar(const uint8_t *wrow, int nb, const int8_t *q, const float *dx, const int32_t *bs) {
    float acc = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q6_K *blk = (const dair_block_q6_K *)(wrow + (size_t)b * sizeof(dair_block_q6_K));
        const int8_t *a = q + (size_t)b * DAIR_QKK;
        int sub[16] = {0};
        for (int h = 0; h < 2; h++) {
            const uint8_t *L = blk->ql + 64 * h, *H = blk->qh + 32 * h;
            const int8_t *y = a + 128 * h;
            int *s = sub + 8 * h;
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                s[is] += ((int)((L[l] & 15) | ((H[l] & 3) << 4)) - 32) * y[l];
                s[is + 2] += ((int)((L[l + 32] & 15) | (((H[l] >> 2) & 3) << 4)) - 32) * y[l + 32];
                s[is + 4] += ((int)((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32) * y[l + 64];
                s[is + 6] += ((int)((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32) * y[l + 96];
            }
        }
        int sumi = 0;
        for (int k = 0; k < 16; k++)
            sumi += blk->scales[k] * sub[k];
        (void)bs;
        acc += dair_fp16_to_fp32_soft(dair_load_u16(&blk->d)) * dx[b] * (float)sumi;
    }
    return acc;
}

/* ---- dot products with Q8_K: AVX2 ---------------------------------------- */

#if defined(DAIR_HAVE_AVX2)

/* Nibbles are unsigned and the activation signed, so u8 x s8 pairs (maddubs, at most
 * 2 * 15 * 128 or 2 * 63 * 128, no int16 saturation) then x scale into int32 (madd).
 * The scales of a block stay in vectors: one pshufb picks a sub-block's scale for every int16
 * of a product, Q4_K's min term is m[j] x (pair sums of the bsums) in int32 lanes, Q6_K's -32 is
 * 32 sc[k] bsums[k] taken off the lanes before they are summed. Each kernel takes a weight row
 * against C activation rows (C a constant at each call site): the weight side of a block is
 * unpacked once for the C rows (prefill), and C = 1 does the same float operations per row,
 * so a row's result does not depend on how many came with it. */

DAIR_INLINE void dair_q4k_avx2(const uint8_t *wrow, int nb, const int8_t *q, size_t qstride, const float *dx,
                               const int32_t *bs, size_t astride, int C, float *res) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc[4], accm[4];
    for (int c = 0; c < C; c++)
        acc[c] = accm[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q4_K *blk = (const dair_block_q4_K *)(wrow + (size_t)b * sizeof(dair_block_q4_K));
        const __m128i sm8 = dair_q4k_scales_x(blk->scales);
        const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm8)); /* sc[0..7] in both lanes */
        const __m256i m32 = dair_q4k_mins32(sm8);
        __m256i sumi[4];
        for (int c = 0; c < C; c++)
            sumi[c] = _mm256_setzero_si256();
        for (int k = 0; k < 4; k++) {
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * k));
            const __m256i lo = _mm256_and_si256(raw, m4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            const __m256i s0 = _mm256_shuffle_epi8(sc16, dair_kq_word(2 * k));
            const __m256i s1 = _mm256_shuffle_epi8(sc16, dair_kq_word(2 * k + 1));
            for (int c = 0; c < C; c++) {
                const int8_t *a = q + c * qstride + (size_t)b * DAIR_QKK + 64 * k;
                const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)a)), s0);
                const __m256i p1 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(a + 32))), s1);
                sumi[c] = _mm256_add_epi32(sumi[c], _mm256_add_epi32(p0, p1));
            }
        }
        uint32_t dm;
        memcpy(&dm, blk, 4);
        const __m128 wd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm)); /* d, dmin */
        for (int c = 0; c < C; c++) {
            const int32_t *bsum = bs + c * astride * 16 + (size_t)b * 16;
            const __m256i pairs = _mm256_hadd_epi32(_mm256_loadu_si256((const __m256i *)bsum),
                                                    _mm256_loadu_si256((const __m256i *)(bsum + 8)));
            const __m128 f = _mm_mul_ps(wd, _mm_set1_ps(dx[c * astride + b]));
            acc[c] = _mm256_fmadd_ps(_mm256_broadcastss_ps(f), _mm256_cvtepi32_ps(sumi[c]), acc[c]);
            accm[c] = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(f)),
                                      _mm256_cvtepi32_ps(_mm256_mullo_epi32(m32, pairs)), accm[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = dair_hsum_ps_avx2(acc[c]) - dair_hsum_ps_avx2(accm[c]);
}

DAIR_INLINE void dair_q6k_avx2(const uint8_t *wrow, int nb, const int8_t *q, size_t qstride, const float *dx,
                               const int32_t *bs, size_t astride, int C, float *res) {
    __m256 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q6_K *blk = (const dair_block_q6_K *)(wrow + (size_t)b * sizeof(dair_block_q6_K));
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)blk->scales);
        /* 32 sc[k] for the -32 term, k = 0..7 and 8..15 as int32 */
        const __m256i c0 = _mm256_slli_epi32(_mm256_cvtepi8_epi32(sc8), 5);
        const __m256i c1 = _mm256_slli_epi32(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)), 5);
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        __m256i sumi[4];
        for (int c = 0; c < C; c++) {
            const int32_t *bsum = bs + c * astride * 16 + (size_t)b * 16;
            sumi[c] = _mm256_sub_epi32(
                _mm256_setzero_si256(),
                _mm256_add_epi32(_mm256_mullo_epi32(c0, _mm256_loadu_si256((const __m256i *)bsum)),
                                 _mm256_mullo_epi32(c1, _mm256_loadu_si256((const __m256i *)(bsum + 8)))));
        }
        for (int h = 0; h < 2; h++) {
            const uint8_t *L = blk->ql + 64 * h;
            /* scales 8h .. 8h+7 as int16 in both lanes */
            const __m256i sch = _mm256_permute2x128_si256(sc16, sc16, h ? 0x11 : 0x00);
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)L);
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(L + 32));
            for (int t = 0; t < 4; t++) {
                const __m256i v = dair_q6k_quarter(l0, l1, qh, t);
                const __m256i s = _mm256_shuffle_epi8(sch, dair_kq_word2(2 * t));
                for (int c = 0; c < C; c++) {
                    const int8_t *y = q + c * qstride + (size_t)b * DAIR_QKK + 128 * h + 32 * t;
                    const __m256i p = _mm256_maddubs_epi16(v, _mm256_loadu_si256((const __m256i *)y));
                    sumi[c] = _mm256_add_epi32(sumi[c], _mm256_madd_epi16(p, s));
                }
            }
        }
        const float d = _cvtsh_ss(dair_load_u16(&blk->d));
        for (int c = 0; c < C; c++)
            acc[c] = _mm256_fmadd_ps(_mm256_set1_ps(d * dx[c * astride + b]), _mm256_cvtepi32_ps(sumi[c]), acc[c]);
    }
    for (int c = 0; c < C; c++)
        res[c] = dair_hsum_ps_avx2(acc[c]);
}

/* One weight row against activation rows i0 .. i0+C-1 of a. */
#define DAIR_KQ2_FN(C)                                                                                          \
    static void dair_kq2_##C(const uint8_t *wr, int qtype, const dair_act *a, int i0, float *res) {             \
        const size_t i = (size_t)i0;                                                                            \
        if (qtype == DAIR_Q4_K)                                                                                 \
            dair_q4k_avx2(wr, a->nb, a->q + i * a->cols, (size_t)a->cols, a->d + i * a->nb,                     \
                          a->isum + i * a->nb * 16, (size_t)a->nb, C, res);                                     \
        else                                                                                                    \
            dair_q6k_avx2(wr, a->nb, a->q + i * a->cols, (size_t)a->cols, a->d + i * a->nb,                     \
                          a->isum + i * a->nb * 16, (size_t)a->nb, C, res);                                     \
    }
DAIR_KQ2_FN(1)
DAIR_KQ2_FN(4)

#endif

/* ---- dot products with Q8_K: AVX-512 VNNI ("image" family) --------------- */

#if defined(DAIR_BUILD_AVX512)
DAIR_AVX512_BEGIN

/* The activation row is laid out once per call for these kernels (dair_quantize_q8k_wide):
 *  - Q4_K: in each super-block the 32-byte chunks go in the order 0 2 1 3 4 6 5 7, so that a
 *    zmm of 64 weight bytes meets its low nibbles (values 0-31, 64-95) in one zmm of
 *    activations and its high nibbles (32-63, 96-127) in the next;
 *  - the 16 int32 sums of a block become int16: Q4_K the 8 sums of 32 (its min term),
 *    Q6_K the 16 sums of 16 negated (its -32 term), both fit (|sum| <= 32 * 127).
 * Products are u8 x s8 pairs (maddubs, no saturation: 2 * 63 * 127 < 32767), then
 * VPDPWSSD with the sub-block scale as int16 adds them into int32 lanes: llama.cpp's
 * integer sum per super-block, exactly, with one float FMA per super-block. */
static void dair_quantize_q8k_wide(const float *x, int cols, int qtype, int8_t *q, float *d, int32_t *isum) {
    for (int b = 0; b < cols / DAIR_QKK; b++) {
        const __m512i s = dair_q8k_block512(x + (size_t)b * DAIR_QKK, q + (size_t)b * DAIR_QKK, d + b, qtype == DAIR_Q4_K);
        const __m256i s16 = _mm512_cvtepi32_epi16(s);
        int16_t *o = (int16_t *)(isum + (size_t)b * 16);
        if (qtype == DAIR_Q4_K)
            _mm_storeu_si128((__m128i *)o, _mm256_cvtepi32_epi16(_mm256_madd_epi16(s16, _mm256_set1_epi16(1))));
        else
            _mm256_storeu_si256((__m256i *)o, _mm256_sub_epi16(_mm256_setzero_si256(), s16));
    }
}

/* One weight row against C activation rows i0 .. i0+C-1; C is a constant at each call site. */
DAIR_INLINE void dair_q4k_row512(const uint8_t *wr, const dair_act *a, int i0, int C, float *res) {
    const int nb = a->nb;
    /* pshufb controls: int16 scale words (byte, zero) for each 128-bit lane of a maddubs result;
     * lanes 0-1 hold the first sub-block of the 64 bytes, lanes 2-3 the second */
#define DAIR_SCW(j, k)                                                                                  \
    _mm512_set_epi64(DAIR_W4(k), DAIR_W4(k), DAIR_W4(k), DAIR_W4(k), DAIR_W4(j), DAIR_W4(j), DAIR_W4(j), DAIR_W4(j))
#define DAIR_W4(j) ((long long)((0x8000ULL + (j)) * 0x0001000100010001ULL))
    const __m512i c0 = DAIR_SCW(0, 2), c1 = DAIR_SCW(1, 3), c2 = DAIR_SCW(4, 6), c3 = DAIR_SCW(5, 7);
#undef DAIR_SCW
#undef DAIR_W4
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc[4];
    __m128 accm[4];
    for (int c = 0; c < C; c++) {
        acc[c] = _mm512_setzero_ps();
        accm[c] = _mm_setzero_ps();
    }
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = wr + (size_t)b * sizeof(dair_block_q4_K);
        uint32_t u[3];
        memcpy(u, blk + 4, 12);
        /* dair_q4k_scales in two words; integer ALUs are otherwise idle here */
        const uint64_t scv = (uint64_t)(u[0] & 0x3F3F3F3Fu) |
                             (uint64_t)((u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4)) << 32;
        const uint64_t mv = (uint64_t)(u[1] & 0x3F3F3F3Fu) |
                            (uint64_t)(((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4)) << 32;
        const __m512i S = _mm512_set1_epi64((long long)scv);
        const __m512i s0 = _mm512_shuffle_epi8(S, c0), s1 = _mm512_shuffle_epi8(S, c1);
        const __m512i s2 = _mm512_shuffle_epi8(S, c2), s3 = _mm512_shuffle_epi8(S, c3);
        const __m128i m16 = _mm_cvtepu8_epi16(_mm_cvtsi64_si128((long long)mv));
        const __m512i z0 = _mm512_loadu_si512((const void *)(blk + 16));
        const __m512i z1 = _mm512_loadu_si512((const void *)(blk + 80));
        const __m512i lo0 = _mm512_and_si512(z0, m4), lo1 = _mm512_and_si512(z1, m4);
#if defined(__GFNI__)
        const __m512i hi0 = _mm512_gf2p8affine_epi64_epi8(z0, _mm512_set1_epi64(0x1020408000000000LL), 0);
        const __m512i hi1 = _mm512_gf2p8affine_epi64_epi8(z1, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
        const __m512i hi0 = _mm512_and_si512(_mm512_srli_epi16(z0, 4), m4);
        const __m512i hi1 = _mm512_and_si512(_mm512_srli_epi16(z1, 4), m4);
#endif
        uint32_t dm;
        memcpy(&dm, blk, 4);
        const __m128 wd = _mm_cvtph_ps(_mm_cvtsi32_si128((int)dm)); /* d, dmin */
        for (int c = 0; c < C; c++) {
            const size_t i = (size_t)(i0 + c);
            const int8_t *q = a->q + i * a->cols + (size_t)b * DAIR_QKK;
            __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                            _mm512_maddubs_epi16(lo0, _mm512_loadu_si512((const void *)q)), s0);
            p = _mm512_dpwssd_epi32(p, _mm512_maddubs_epi16(hi0, _mm512_loadu_si512((const void *)(q + 64))), s1);
            p = _mm512_dpwssd_epi32(p, _mm512_maddubs_epi16(lo1, _mm512_loadu_si512((const void *)(q + 128))), s2);
            p = _mm512_dpwssd_epi32(p, _mm512_maddubs_epi16(hi1, _mm512_loadu_si512((const void *)(q + 192))), s3);
            const __m128 f = _mm_mul_ps(wd, _mm_set1_ps(a->d[i * nb + b]));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_broadcastss_ps(f), acc[c]);
            const __m128i bs = _mm_loadu_si128((const __m128i *)(a->isum + (i * nb + b) * 16));
            accm[c] = _mm_fmadd_ps(_mm_cvtepi32_ps(_mm_madd_epi16(m16, bs)), _mm_permute_ps(f, 0x55), accm[c]);
        }
    }
    for (int c = 0; c < C; c++) {
        __m128 h = _mm_add_ps(accm[c], _mm_movehl_ps(accm[c], accm[c]));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        res[c] = _mm512_reduce_add_ps(acc[c]) - _mm_cvtss_f32(h);
    }
}

DAIR_INLINE void dair_q6k_row512(const uint8_t *wr, const dair_act *a, int i0, int C, float *res) {
    const int nb = a->nb;
    const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    /* per 256-bit half of a 64-byte ql load (low-nibble quarter t, t+1): where qh's bit pair
     * t sits relative to bits 4-5, for the low nibbles (t = 0, 1) and the high ones (t = 2, 3) */
    const __m512i shl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i shr = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    /* VPERMW sources: word w of zmm j (values 64j + 2w, +1) takes scale 4j + w / 8 */
    __m512i pidx[4];
    for (int j = 0; j < 4; j++)
        pidx[j] = _mm512_inserti64x4(
            _mm512_castsi256_si512(_mm256_set_m128i(_mm_set1_epi16((short)(4 * j + 1)), _mm_set1_epi16((short)(4 * j)))),
            _mm256_set_m128i(_mm_set1_epi16((short)(4 * j + 3)), _mm_set1_epi16((short)(4 * j + 2))), 1);
    __m512 acc[4];
    for (int c = 0; c < C; c++)
        acc[c] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q6_K *blk = (const dair_block_q6_K *)(wr + (size_t)b * sizeof(dair_block_q6_K));
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)blk->scales));
        const __m512i S = _mm512_castsi256_si512(sc16);
        const __m512i sc32 = _mm512_zextsi256_si512(_mm256_slli_epi16(sc16, 5));
        __m512i v[4], s[4];
        for (int h = 0; h < 2; h++) {
            const __m512i L = _mm512_loadu_si512((const void *)(blk->ql + 64 * h));
            const __m512i Q = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h)));
#if defined(__GFNI__)
            const __m512i Lh = _mm512_gf2p8affine_epi64_epi8(L, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
            const __m512i Lh = _mm512_and_si512(_mm512_srli_epi16(L, 4), m4);
#endif
            /* a | (b & c) */
            v[2 * h] = _mm512_ternarylogic_epi32(_mm512_and_si512(L, m4), _mm512_sllv_epi16(Q, shl), m30, 0xF8);
            v[2 * h + 1] = _mm512_ternarylogic_epi32(Lh, _mm512_srlv_epi16(Q, shr), m30, 0xF8);
        }
        for (int j = 0; j < 4; j++)
            s[j] = _mm512_permutexvar_epi16(pidx[j], S);
        const float d = _cvtsh_ss(dair_load_u16(&blk->d));
        for (int c = 0; c < C; c++) {
            const size_t i = (size_t)(i0 + c);
            const int8_t *q = a->q + i * a->cols + (size_t)b * DAIR_QKK;
            __m512i p = _mm512_dpwssd_epi32(_mm512_setzero_si512(),
                                            _mm512_maddubs_epi16(v[0], _mm512_loadu_si512((const void *)q)), s[0]);
            p = _mm512_dpwssd_epi32(p, _mm512_maddubs_epi16(v[1], _mm512_loadu_si512((const void *)(q + 64))), s[1]);
            p = _mm512_dpwssd_epi32(p, _mm512_maddubs_epi16(v[2], _mm512_loadu_si512((const void *)(q + 128))), s[2]);
            p = _mm512_dpwssd_epi32(p, _mm512_maddubs_epi16(v[3], _mm512_loadu_si512((const void *)(q + 192))), s[3]);
            /* - 32 sum_k sc[k] bsums[k] */
            p = _mm512_dpwssd_epi32(
                p, sc32, _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(a->isum + (i * nb + b) * 16))));
            acc[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(d * a->d[i * nb + b]), acc[c]);
        }
    }
    for (int c = 0; c < C; c++)
        res[c] = _mm512_reduce_add_ps(acc[c]);
}

#define DAIR_KQ512_FN(C)                                                                                  \
    static void dair_kq512_##C(const uint8_t *wr, int qtype, const dair_act *a, int i0, float *res) {     \
        if (qtype == DAIR_Q4_K)                                                                           \
            dair_q4k_row512(wr, a, i0, C, res);                                                           \
        else                                                                                              \
            dair_q6k_row512(wr, a, i0, C, res);                                                           \
    }
DAIR_KQ512_FN(1)
DAIR_KQ512_FN(4)

/* rows [r0, r1) x all n activation rows laid out by dair_quantize_q8k_wide. */
static void dair_mm_qk_wide(const uint8_t *w, size_t rb, int qtype, int r0, int r1, const dair_act *a, float *out,
                            size_t ldo) {
    const int n = a->n;
    const uint8_t *end = w + (size_t)r1 * rb;
    if (n < DAIR_STREAM_ROWS) {
        size_t left = (size_t)(r1 - r0) * rb;
        dair_prefetch_bytes(w + (size_t)r0 * rb, left < DAIR_PF_DIST ? left : DAIR_PF_DIST);
    }
    float res[4];
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * rb;
        if (n < DAIR_STREAM_ROWS) { /* see DAIR_PF_DIST */
            const uint8_t *pf = wr + DAIR_PF_DIST;
            for (size_t o = 0; o < rb && pf + o < end; o += 64)
                _mm_prefetch((const char *)(pf + o), _MM_HINT_T0);
        }
        int i = 0;
        for (; i + 4 <= n; i += 4) {
            dair_kq512_4(wr, qtype, a, i, res);
            for (int c = 0; c < 4; c++)
                out[(size_t)(i + c) * ldo + r] = res[c];
        }
        for (; i < n; i++) {
            dair_kq512_1(wr, qtype, a, i, res);
            out[(size_t)i * ldo + r] = res[0];
        }
    }
}

DAIR_AVX512_END
#else /* stubs so callers compile; matmul selects them only with the avx512 family */

static void dair_quantize_q8k_wide(const float *x, int cols, int qtype, int8_t *q, float *d, int32_t *isum) {
    (void)qtype;
    dair_quantize_q8k_row(x, cols, q, d, isum);
}
static void dair_mm_qk_wide(const uint8_t *w, size_t rb, int qtype, int r0, int r1, const dair_act *a, float *out,
                            size_t ldo) {
    (void)w, (void)rb, (void)qtype, (void)r0, (void)r1, (void)a, (void)out, (void)ldo;
}

#endif

/* rows [r0, r1) x all n Q8_K activation rows (act.nb = cols / 256 blocks, act.isum
 * holds 16 bsums per block). A row (at most a few KB) stays in L1 across the n
 * activation rows, so no tiling. */
static void dair_mm_qk(const uint8_t *w, size_t rb, int qtype, int r0, int r1, const dair_act *a, float *out,
                       size_t ldo) {
    typedef float (*dotfn)(const uint8_t *, int, const int8_t *, const float *, const int32_t *);
    dotfn dot = qtype == DAIR_Q4_K ? dair_dot_q4k_scalar : dair_dot_q6k_scalar;
    const int n = a->n, nb = a->nb;
    const uint8_t *end = w + (size_t)r1 * rb;
    if (n < DAIR_STREAM_ROWS) {
        size_t left = (size_t)(r1 - r0) * rb;
        dair_prefetch_bytes(w + (size_t)r0 * rb, left < DAIR_PF_DIST ? left : DAIR_PF_DIST);
    }
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * rb;
        if (n < DAIR_STREAM_ROWS) /* see DAIR_PF_DIST */
            dair_prefetch_clip(wr + DAIR_PF_DIST, rb, end);
#if defined(DAIR_HAVE_AVX2)
        if (dair_simd_enabled) {
            float res[4];
            int i = 0;
            for (; i + 4 <= n; i += 4) {
                dair_kq2_4(wr, qtype, a, i, res);
                for (int c = 0; c < 4; c++)
                    out[(size_t)(i + c) * ldo + r] = res[c];
            }
            for (; i < n; i++) {
                dair_kq2_1(wr, qtype, a, i, res);
                out[(size_t)i * ldo + r] = res[0];
            }
            continue;
        }
#endif
        for (int i = 0; i < n; i++)
            out[(size_t)i * ldo + r] = dot(wr, nb, a->q + (size_t)i * a->cols, a->d + (size_t)i * nb,
                                           a->isum + (size_t)i * nb * 16);
    }
}

#endif
