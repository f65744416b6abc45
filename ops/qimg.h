/* AVX-512 VNNI quantized matrix products on the raw GGUF row bytes, "image" style.
 *
 * Why: unpacking blocks one at a time (load 16 bytes, split nibbles, convert
 * each fp16 scale, broadcast it) costs ~10 vector instructions per 20-byte
 * Q4_1 block, which caps a core at ~20 GB/s. Here a weight row is read as-is,
 * 64 bytes per zmm, block headers included. The quantized activation is laid
 * out once per call as an "image" of the weight row: at every byte that holds
 * a weight value the matching activation value, at header bytes zero. Then one
 * VPDPBUSD per zmm (two for Q4: low and high nibbles) gives int32 lanes that
 * each belong to one block, and one VPERMT2W picks, for every lane, the fp16
 * scale word of its block out of this zmm and the previous one. No per-block
 * scalar work remains.
 *
 * Lane bookkeeping (all block sizes are even, so every fp16 sits on a word):
 *  - a lane "belongs" to the block of the first weight value it holds;
 *  - Q4_1 blocks are 20 bytes, so each d/m header is a lane of its own; that
 *    lane takes m as its weight scale, s_x (llama.cpp's Q8_1 sum term) as its
 *    activation scale and the integer 1 as its dot product, which adds exactly
 *    llama.cpp's m * s term;
 *  - Q4_0 weights are nibble - 8: the activation image adds -8 * sum(q) to the
 *    first lane of each block, so the integer sums are llama.cpp's exactly;
 *  - Q8_0 weights are signed, VPDPBUSD wants one unsigned operand: the image
 *    holds q + 128, and 128 * sum(w) (one more VPDPBUSD per weight zmm, shared
 *    by all activation rows) is subtracted.
 * A row's last zmm is loaded with a byte mask, so nothing past the row is read;
 * lanes past the row end get a zero scale.
 */
#ifndef DAIR_QIMG_H
#define DAIR_QIMG_H

#include "qdot.h" /* the activations, prefetch and AVX2 helpers these kernels build on */

static void *dair_alloc64(size_t n) {
    void *p = NULL;
    if (posix_memalign(&p, 64, n ? (n + 63) / 64 * 64 : 64))
        return NULL;
    return p;
}

#if defined(DAIR_BUILD_AVX512)

/* Per-(qtype, cols) tables, built once per Weight. */
typedef struct {
    int qtype, cols, nb, K; /* K zmm per row */
    size_t rb;              /* row bytes */
    size_t img_bytes;       /* one activation row's image */
    uint64_t tail;          /* byte mask of the row's last zmm */
    int16_t *widx;          /* K x 32 VPERMT2W indices: lane l of zmm k -> its scale word */
    int32_t *owner;         /* K x 16: block of each lane; -2 - b for Q4_1's header lane of b; -1 none */
    uint8_t *c128;          /* Q8_0 only: K x 64, 128 at weight bytes, 0 at headers */
} dair_img;

static void dair_img_free(dair_img *L) {
    free(L->widx);
    free(L->owner);
    free(L->c128);
    L->widx = NULL;
    L->owner = NULL;
    L->c128 = NULL;
}

DAIR_AVX512_BEGIN
static size_t dair_img_qoff(int qtype) { return qtype == DAIR_Q4_1 ? 4 : 2; }
static size_t dair_img_bs(int qtype) {
    return qtype == DAIR_Q4_1 ? sizeof(dair_block_q4_1)
                              : (qtype == DAIR_Q4_0 ? sizeof(dair_block_q4_0) : sizeof(dair_block_q8_0));
}

/* Returns 0 on success. */
static int dair_img_init(dair_img *L, int qtype, int cols) {
    memset(L, 0, sizeof(*L));
    L->qtype = qtype;
    L->cols = cols;
    L->nb = cols / DAIR_QK;
    size_t bs = dair_img_bs(qtype), qoff = dair_img_qoff(qtype);
    size_t qlen = qtype == DAIR_Q8_0 ? DAIR_QK : DAIR_QK / 2; /* weight bytes per block */
    L->rb = (size_t)L->nb * bs;
    L->K = (int)((L->rb + 63) / 64);
    size_t K = (size_t)L->K;
    size_t rem = L->rb - (K - 1) * 64;
    L->tail = rem == 64 ? ~0ULL : ((1ULL << rem) - 1);
    int planes = qtype == DAIR_Q8_0 ? 1 : 2;
    L->img_bytes = K * 64 * planes + K * 16 * 4 * 2; /* value planes, lane scales, lane int offsets */
    L->widx = (int16_t *)dair_alloc64(K * 32 * sizeof(int16_t));
    L->owner = (int32_t *)dair_alloc64(K * 16 * sizeof(int32_t));
    if (qtype == DAIR_Q8_0)
        L->c128 = (uint8_t *)dair_alloc64(K * 64);
    if (!L->widx || !L->owner || (qtype == DAIR_Q8_0 && !L->c128)) {
        dair_img_free(L);
        return 1;
    }
    memset(L->widx, 0, K * 32 * sizeof(int16_t));
    for (size_t lane = 0; lane < K * 16; lane++)
        L->owner[lane] = -1;
    if (L->c128)
        memset(L->c128, 0, K * 64);
    /* owners: first weight byte of each lane */
    for (int b = 0; b < L->nb; b++) {
        size_t first = (size_t)b * bs + qoff;
        for (size_t j = 0; j < qlen; j++) {
            size_t lane = (first + j) / 4;
            if (L->owner[lane] == -1)
                L->owner[lane] = b;
            if (L->c128)
                L->c128[first + j] = 128;
        }
        if (qtype == DAIR_Q4_1)
            L->owner[(size_t)b * bs / 4] = -2 - b; /* the d/m header lane */
    }
    for (size_t lane = 0; lane < K * 16; lane++) {
        size_t k = lane / 16;
        int o = L->owner[lane];
        size_t byte; /* byte (row-relative) of the fp16 scale this lane uses */
        if (o >= 0)
            byte = (size_t)o * bs;
        else if (o <= -2)
            byte = (size_t)(-2 - o) * bs + 2; /* m */
        else
            byte = lane * 4; /* past the row: a masked-off, zero word of this zmm */
        size_t word = byte / 2;
        int16_t idx;
        if (word >= k * 32)
            idx = (int16_t)((word - k * 32) | 32);
        else
            idx = (int16_t)(word - (k - 1) * 32); /* headers are < 64 bytes before their values */
        L->widx[k * 32 + lane % 16] = idx;
    }
    return 0;
}

/* Lay out one quantized activation row (natural order q, per block d, s,
 * isum) as the image of a weight row. */
static void dair_img_build(const dair_img *L, const int8_t *q, const float *d, const float *s, const int32_t *isum,
                           uint8_t *img) {
    size_t K = (size_t)L->K;
    size_t bs = dair_img_bs(L->qtype), qoff = dair_img_qoff(L->qtype);
    int planes = L->qtype == DAIR_Q8_0 ? 1 : 2;
    uint8_t *x0 = img, *x1 = img + K * 64;
    float *dx = (float *)(img + K * 64 * planes);
    int32_t *src = (int32_t *)(dx + K * 16);
    memset(img, 0, K * 64 * planes);
    memset(src, 0, K * 16 * 4);
    for (int b = 0; b < L->nb; b++) {
        const int8_t *qb = q + (size_t)b * DAIR_QK;
        size_t first = (size_t)b * bs + qoff;
        if (L->qtype == DAIR_Q8_0) {
            for (int j = 0; j < DAIR_QK; j++)
                x0[first + j] = (uint8_t)(qb[j] ^ 0x80);
        } else {
            memcpy(x0 + first, qb, 16);
            memcpy(x1 + first, qb + 16, 16);
            if (L->qtype == DAIR_Q4_0)
                src[first / 4] = -8 * isum[b];
            else
                src[(size_t)b * bs / 4] = 1;
        }
    }
    for (size_t lane = 0; lane < K * 16; lane++) {
        int o = L->owner[lane];
        dx[lane] = o >= 0 ? d[o] : (o <= -2 ? s[-2 - o] : 0.0f);
    }
}

DAIR_INLINE __m512 dair_img_wscale(__m512i prev, __m512i idx, __m512i z) {
    return _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(prev, idx, z)));
}

/* One zmm column k of an R-row x C-input tile. Q4 and Q8_0 share the frame. */
DAIR_INLINE void dair_img_step(const uint8_t *w, size_t rb, const dair_img *L, int R, int C, const uint8_t *img0,
                               size_t istride, size_t k, __mmask64 m, int masked, __m512i *prev, __m512 acc[4][4]) {
    const size_t K = (size_t)L->K;
    const int q8 = L->qtype == DAIR_Q8_0;
    const size_t planes = q8 ? 1 : 2;
    const __m512i idx = _mm512_load_si512((const void *)(L->widx + k * 32));
    __m512i lo[4], hi[4];
    __m512 ws[4];
    for (int r = 0; r < R; r++) {
        const uint8_t *p = w + (size_t)r * rb + k * 64;
        __m512i z = masked ? _mm512_maskz_loadu_epi8(m, p) : _mm512_loadu_si512((const void *)p);
        ws[r] = dair_img_wscale(prev[r], idx, z);
        prev[r] = z;
        if (q8) {
            /* lo = the weights, hi = -128 * sum(w) per lane as the dot's starting value */
            lo[r] = z;
            hi[r] = _mm512_sub_epi32(_mm512_setzero_si512(),
                                     _mm512_dpbusd_epi32(_mm512_setzero_si512(),
                                                         _mm512_load_si512((const void *)(L->c128 + k * 64)), z));
        } else {
            const __m512i m4 = _mm512_set1_epi8(0x0F);
            lo[r] = _mm512_and_si512(z, m4);
#if defined(__GFNI__)
            /* x >> 4 per byte as one GF(2) affine map instead of a shift and a mask */
            hi[r] = _mm512_gf2p8affine_epi64_epi8(z, _mm512_set1_epi64(0x1020408000000000LL), 0);
#else
            hi[r] = _mm512_and_si512(_mm512_srli_epi16(z, 4), m4);
#endif
        }
    }
    for (int c = 0; c < C; c++) {
        const uint8_t *img = img0 + (size_t)c * istride;
        const __m512i x0 = _mm512_load_si512((const void *)(img + k * 64));
        const __m512 dx = _mm512_load_ps((const float *)(img + K * 64 * planes) + k * 16);
        if (q8) {
            for (int r = 0; r < R; r++) {
                __m512i p = _mm512_dpbusd_epi32(hi[r], x0, lo[r]);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(ws[r], dx), acc[r][c]);
            }
        } else {
            const __m512i x1 = _mm512_load_si512((const void *)(img + K * 64 + k * 64));
            const __m512i src = _mm512_load_si512((const void *)((const int32_t *)(img + K * 64 * planes) + K * 16 + k * 16));
            for (int r = 0; r < R; r++) {
                __m512i p = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(src, lo[r], x0), hi[r], x1);
                acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_mul_ps(ws[r], dx), acc[r][c]);
            }
        }
    }
}

/* pfd > 0 (decode): line k of each of the R rows is prefetched pfd bytes ahead as column k is read, so
 * the requests for a later tile go out a few at a time with the work (see dair_r8_pf_block); a burst
 * of a whole tile's lines at its start (4 rows of 4096 Q4_1 values are 160 lines) filled the miss
 * buffers and cost a quarter of a decode product's time. */
DAIR_INLINE void dair_img_tile(const uint8_t *w, size_t rb, const dair_img *L, int R, int C, const uint8_t *img0,
                               size_t istride, float *out, size_t ldo, size_t pfd, const uint8_t *pf_end) {
    __m512 acc[4][4];
    __m512i prev[4];
    for (int r = 0; r < R; r++) {
        prev[r] = _mm512_setzero_si512();
        for (int c = 0; c < C; c++)
            acc[r][c] = _mm512_setzero_ps();
    }
    const size_t K = (size_t)L->K;
    for (size_t k = 0; k + 1 < K; k++) {
        if (pfd)
            for (int r = 0; r < R; r++) {
                const uint8_t *pf = w + (size_t)r * rb + k * 64 + pfd;
                if (pf < pf_end)
                    _mm_prefetch((const char *)pf, _MM_HINT_T0);
            }
        dair_img_step(w, rb, L, R, C, img0, istride, k, ~0ULL, 0, prev, acc);
    }
    dair_img_step(w, rb, L, R, C, img0, istride, K - 1, L->tail, 1, prev, acc);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++)
            out[(size_t)c * ldo + r] = _mm512_reduce_add_ps(acc[r][c]);
}

#define DAIR_IMG_TILE_FN(R, C)                                                                                   \
    static void dair_img_tile_##R##x##C(const uint8_t *w, size_t rb, const dair_img *L, const uint8_t *img0,     \
                                        size_t istride, float *out, size_t ldo) {                                \
        dair_img_tile(w, rb, L, R, C, img0, istride, out, ldo, 0, w);                                            \
    }
DAIR_IMG_TILE_FN(4, 1)
DAIR_IMG_TILE_FN(2, 1)
DAIR_IMG_TILE_FN(1, 1)
DAIR_IMG_TILE_FN(2, 4)
DAIR_IMG_TILE_FN(1, 4)

static void dair_img_tile_4x1_pf(const uint8_t *w, size_t rb, const dair_img *L, const uint8_t *img0, float *out,
                                 size_t ldo, size_t pfd, const uint8_t *pf_end) {
    dair_img_tile(w, rb, L, 4, 1, img0, 0, out, ldo, pfd, pf_end);
}

/* rows [r0, r1) x all n image rows (istride bytes apart) into out[i*ldo + r]. */
static void dair_img_mm(const uint8_t *w, const dair_img *L, int r0, int r1, const uint8_t *img, size_t istride,
                        int n, float *out, size_t ldo) {
    const size_t rb = L->rb;
    int r = r0;
    if (n == 1) {
        const uint8_t *end = w + (size_t)r1 * rb;
        size_t left = (size_t)(r1 - r) * rb;
        dair_prefetch_bytes(w + (size_t)r * rb, left < DAIR_PF_DIST ? left : DAIR_PF_DIST);
        /* two tiles ahead (one when a tile alone is 16 KB or more), as dair_r8_mm */
        const size_t pfd = 4 * rb < 16384 ? 8 * rb : 4 * rb;
        for (; r + 4 <= r1; r += 4)
            dair_img_tile_4x1_pf(w + (size_t)r * rb, rb, L, img, out + r, ldo, pfd, end);
        for (; r < r1; r++)
            dair_img_tile_1x1(w + (size_t)r * rb, rb, L, img, istride, out + r, ldo);
        return;
    }
    for (; r + 2 <= r1; r += 2) {
        int i = 0;
        for (; i + 4 <= n; i += 4)
            dair_img_tile_2x4(w + (size_t)r * rb, rb, L, img + (size_t)i * istride, istride, out + (size_t)i * ldo + r,
                              ldo);
        for (; i < n; i++)
            dair_img_tile_2x1(w + (size_t)r * rb, rb, L, img + (size_t)i * istride, istride, out + (size_t)i * ldo + r,
                              ldo);
    }
    for (; r < r1; r++) {
        int i = 0;
        for (; i + 4 <= n; i += 4)
            dair_img_tile_1x4(w + (size_t)r * rb, rb, L, img + (size_t)i * istride, istride, out + (size_t)i * ldo + r,
                              ldo);
        for (; i < n; i++)
            dair_img_tile_1x1(w + (size_t)r * rb, rb, L, img + (size_t)i * istride, istride, out + (size_t)i * ldo + r,
                              ldo);
    }
}

DAIR_AVX512_END

static int dair_img_available(void) { return dair_cpu_family() == DAIR_FAM_AVX512; }

#else /* no AVX-512 VNNI: stubs so callers compile; dair_img_available() says not to use them */

typedef struct {
    int qtype, cols, nb, K;
    size_t rb, img_bytes;
} dair_img;
static int dair_img_available(void) { return 0; }
static int dair_img_init(dair_img *L, int qtype, int cols) {
    (void)qtype;
    (void)cols;
    memset(L, 0, sizeof(*L));
    return 1;
}
static void dair_img_free(dair_img *L) { (void)L; }
static void dair_img_build(const dair_img *L, const int8_t *q, const float *d, const float *s, const int32_t *isum,
                           uint8_t *img) {
    (void)L, (void)q, (void)d, (void)s, (void)isum, (void)img;
}
static void dair_img_mm(const uint8_t *w, const dair_img *L, int r0, int r1, const uint8_t *img, size_t istride,
                        int n, float *out, size_t ldo) {
    (void)w, (void)L, (void)r0, (void)r1, (void)img, (void)istride, (void)n, (void)out, (void)ldo;
}
#endif /* DAIR_BUILD_AVX512 */
#endif
