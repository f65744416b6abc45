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

/* ---- Q8_K activations ---------------------------------------------------- */

/* quantize_row_q8_K_ref: the value of largest magnitude (first one, with its
 * sign) maps to -127 (+127 after the clamp below never triggers on it), rounding
 * half to even. bsums are kept as int32 for the kernels. */
static void dair_quantize_q8k_row(const float *x, int cols, int8_t *q, float *d, int32_t *bsums) {
    int nb = cols / DAIR_QKK;
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

/* Nibbles are unsigned and the activation signed, so u8 x s8 pairs (maddubs, at
 * most 2 * 15 * 128 or 2 * 63 * 128, no int16 saturation) then x scale into
 * int32 (madd). Q6_K's -32 is taken out afterwards as 32 * sum_k sc[k] bsums[k]. */
static float dair_dot_q4k_avx2(const uint8_t *wrow, int nb, const int8_t *q, const float *dx, const int32_t *bs) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    __m256 acc = _mm256_setzero_ps();
    float accm = 0.0f;
    for (int b = 0; b < nb; b++) {
        const dair_block_q4_K *blk = (const dair_block_q4_K *)(wrow + (size_t)b * sizeof(dair_block_q4_K));
        const int8_t *a = q + (size_t)b * DAIR_QKK;
        const int32_t *bsum = bs + (size_t)b * 16;
        uint8_t sc[8], m[8];
        dair_q4k_scales(blk->scales, sc, m);
        __m256i sumi = _mm256_setzero_si256();
        for (int c = 0; c < 4; c++) {
            __m256i raw = _mm256_loadu_si256((const __m256i *)(blk->qs + 32 * c));
            __m256i lo = _mm256_and_si256(raw, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4);
            __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(a + 64 * c)));
            __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(a + 64 * c + 32)));
            p0 = _mm256_madd_epi16(p0, _mm256_set1_epi16(sc[2 * c]));
            p1 = _mm256_madd_epi16(p1, _mm256_set1_epi16(sc[2 * c + 1]));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
        }
        int summ = 0;
        for (int j = 0; j < 8; j++)
            summ += m[j] * (bsum[2 * j] + bsum[2 * j + 1]);
        const float d = _cvtsh_ss(dair_load_u16(&blk->d)) * dx[b];
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        accm += _cvtsh_ss(dair_load_u16(&blk->dmin)) * dx[b] * (float)summ;
    }
    return dair_hsum256(acc) - accm;
}

static float dair_dot_q6k_avx2(const uint8_t *wrow, int nb, const int8_t *q, const float *dx, const int32_t *bs) {
    __m256 acc = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const dair_block_q6_K *blk = (const dair_block_q6_K *)(wrow + (size_t)b * sizeof(dair_block_q6_K));
        const int8_t *a = q + (size_t)b * DAIR_QKK;
        const int32_t *bsum = bs + (size_t)b * 16;
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            const uint8_t *L = blk->ql + 64 * h;
            const int8_t *sc = blk->scales + 8 * h;
            const int8_t *y = a + 128 * h;
            __m256i qh = _mm256_loadu_si256((const __m256i *)(blk->qh + 32 * h));
            __m256i l0 = _mm256_loadu_si256((const __m256i *)L);
            __m256i l1 = _mm256_loadu_si256((const __m256i *)(L + 32));
            for (int t = 0; t < 4; t++) {
                __m256i p = _mm256_maddubs_epi16(dair_q6k_quarter(l0, l1, qh, t), _mm256_loadu_si256((const __m256i *)(y + 32 * t)));
                __m256i s = _mm256_set_m128i(_mm_set1_epi16(sc[2 * t + 1]), _mm_set1_epi16(sc[2 * t]));
                sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, s));
            }
        }
        int corr = 0;
        for (int k = 0; k < 16; k++)
            corr += blk->scales[k] * bsum[k];
        const float d = _cvtsh_ss(dair_load_u16(&blk->d)) * dx[b];
        sumi = _mm256_sub_epi32(sumi, _mm256_setr_epi32(32 * corr, 0, 0, 0, 0, 0, 0, 0));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
    }
    return dair_hsum256(acc);
}

#endif

/* rows [r0, r1) x all n Q8_K activation rows (act.nb = cols / 256 blocks, act.isum
 * holds 16 bsums per block). A row (at most a few KB) stays in L1 across the n
 * activation rows, so no tiling. */
static void dair_mm_qk(const uint8_t *w, size_t rb, int qtype, int r0, int r1, const dair_act *a, float *out,
                       size_t ldo) {
    typedef float (*dotfn)(const uint8_t *, int, const int8_t *, const float *, const int32_t *);
    dotfn dot = qtype == DAIR_Q4_K ? dair_dot_q4k_scalar : dair_dot_q6k_scalar;
#if defined(DAIR_HAVE_AVX2)
    if (dair_simd_enabled)
        dot = qtype == DAIR_Q4_K ? dair_dot_q4k_avx2 : dair_dot_q6k_avx2;
#endif
    const int n = a->n, nb = a->nb;
    const uint8_t *end = w + (size_t)r1 * rb;
    if (n < 4) {
        size_t left = (size_t)(r1 - r0) * rb;
        dair_prefetch_bytes(w + (size_t)r0 * rb, left < DAIR_PF_DIST ? left : DAIR_PF_DIST);
    }
    for (int r = r0; r < r1; r++) {
        const uint8_t *wr = w + (size_t)r * rb;
        if (n < 4) { /* see DAIR_PF_DIST */
            const uint8_t *pf = wr + DAIR_PF_DIST;
            for (size_t o = 0; o < rb && pf + o < end; o += 64)
                __builtin_prefetch(pf + o, 0, 3);
        }
        for (int i = 0; i < n; i++)
            out[(size_t)i * ldo + r] = dot(wr, nb, a->q + (size_t)i * a->cols, a->d + (size_t)i * nb,
                                           a->isum + (size_t)i * nb * 16);
    }
}

#endif
