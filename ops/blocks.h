/* GGUF weight block layouts: the single place dair states them.
 *
 * Every quantized type packs 32 consecutive values of a row into one block;
 * a row of `cols` values is cols/32 blocks laid end to end, rows end to end.
 * dair.ops.matmul.BLOCK_LAYOUTS exposes (values per block, bytes per block)
 * from the sizeof() below so that dair.model.qtypes can check it agrees.
 *
 *   Q8_0  fp16 d, int8 qs[32]                value j = qs[j] * d
 *   Q4_0  fp16 d, uint8 qs[16]               value j = ((qs[j] & 15) - 8) * d,
 *                                            value j+16 = ((qs[j] >> 4) - 8) * d
 *   Q4_1  fp16 d, fp16 m, uint8 qs[16]       value j = (qs[j] & 15) * d + m,
 *                                            value j+16 = (qs[j] >> 4) * d + m
 *   F16   one IEEE half per value; F32 one float per value.
 *
 * K-quants (llama.cpp's) pack 256 values per super-block, a row is cols/256 of them:
 *
 *   Q4_K  fp16 d, fp16 dmin, uint8 scales[12], uint8 qs[128]            (144 bytes)
 *         eight sub-blocks of 32 with 6-bit scale sc[j] and min m[j]:
 *           j < 4:  sc[j] = scales[j] & 63,  m[j] = scales[j+4] & 63
 *           j >= 4: sc[j] = (scales[j+4] & 15) | ((scales[j-4] >> 6) << 4),
 *                   m[j]  = (scales[j+4] >> 4) | ((scales[j] >> 6) << 4)
 *         qs[32c + l] holds value 64c + l (low nibble, sub-block 2c) and
 *         64c + 32 + l (high nibble, sub-block 2c+1), c < 4, l < 32;
 *         value = d * sc[j] * nibble - dmin * m[j]
 *   Q6_K  uint8 ql[128], uint8 qh[64], int8 scales[16], fp16 d             (210 bytes)
 *         for half h < 2 (values 128h ..), l < 32, with L = ql + 64h, H = qh + 32h:
 *           q(128h + l)      = (L[l] & 15)      | ((H[l] >> 0) & 3) << 4
 *           q(128h + l + 32) = (L[l + 32] & 15) | ((H[l] >> 2) & 3) << 4
 *           q(128h + l + 64) = (L[l] >> 4)      | ((H[l] >> 4) & 3) << 4
 *           q(128h + l + 96) = (L[l + 32] >> 4) | ((H[l] >> 6) & 3) << 4
 *         value i = d * scales[i / 16] * (q(i) - 32)
 *   Q8_K  (activations only, never in files) float d, int8 qs[256], int16 bsums[16]
 *         value j = qs[j] * d; bsums[k] = sum of qs[16k .. 16k+15]
 *
 *   Q5_0  fp16 d, uint8 qh[4], uint8 qs[16]   (22 bytes)  h(j) = bit j of qh as uint32 LE
 *         value j = ((qs[j] & 15) | h(j) << 4) - 16) * d, value j+16 = ((qs[j] >> 4) | h(j+16) << 4) - 16) * d
 *   Q5_1  fp16 d, fp16 m, uint8 qh[4], uint8 qs[16]   (24 bytes)  as Q5_0 without - 16, times d plus m
 *   IQ4_NL fp16 d, uint8 qs[16]   (18 bytes)  value j = dair_iq4_values[qs[j] & 15] * d, j+16: qs[j] >> 4
 *   Q2_K  uint8 scales[16], uint8 qs[64], fp16 d, fp16 dmin   (84 bytes), sixteen sub-blocks of 16:
 *         value i = 128h + 32j + l (h < 2, j < 4, l < 32): code = (qs[32h + l] >> 2j) & 3,
 *         value = d * (scales[i/16] & 15) * code - dmin * (scales[i/16] >> 4)
 *   Q3_K  uint8 hmask[32], uint8 qs[64], uint8 scales[12], fp16 d   (110 bytes), sixteen of 16:
 *         value i = 128h + 32j + l: code = ((qs[32h + l] >> 2j) & 3) - (hmask[l] >> (4h + j) & 1 ? 0 : 4),
 *         value = d * (sc[i/16] - 32) * code, sc from dair_q3k_scales (6 bits each)
 *   Q5_K  fp16 d, fp16 dmin, uint8 scales[12], uint8 qh[32], uint8 qs[128]   (176 bytes)
 *         as Q4_K, code of value i = 32s + l plus 16 if bit s of qh[l]
 *   IQ4_XS fp16 d, uint16 scales_h, uint8 scales_l[4], uint8 qs[128]   (136 bytes), eight of 32:
 *         sc[s] = ((scales_l[s/2] >> 4 (s%2)) & 15 | ((scales_h >> 2s) & 3) << 4) - 32,
 *         qs[16s + j] low nibble: value 32s + j, high: 32s + 16 + j; value = d * sc[s] * dair_iq4_values[nib]
 *   BF16  the high 16 bits of a float32.
 */
#ifndef DAIR_BLOCKS_H
#define DAIR_BLOCKS_H

#include <stdint.h>
#include <string.h>

#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define DAIR_QK 32

typedef struct {
    uint16_t d;
    int8_t qs[DAIR_QK];
} dair_block_q8_0;

typedef struct {
    uint16_t d;
    uint8_t qs[DAIR_QK / 2];
} dair_block_q4_0;

typedef struct {
    uint16_t d;
    uint16_t m;
    uint8_t qs[DAIR_QK / 2];
} dair_block_q4_1;

/* The structs must have no padding: they are overlaid on mmap'ed file bytes. */
_Static_assert(sizeof(dair_block_q8_0) == 34, "Q8_0 block must be 34 bytes");
_Static_assert(sizeof(dair_block_q4_0) == 18, "Q4_0 block must be 18 bytes");
_Static_assert(sizeof(dair_block_q4_1) == 20, "Q4_1 block must be 20 bytes");

#define DAIR_QKK 256

typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qs[DAIR_QKK / 2];
} dair_block_q4_K;

typedef struct {
    uint8_t ql[DAIR_QKK / 2];
    uint8_t qh[DAIR_QKK / 4];
    int8_t scales[DAIR_QKK / 16];
    uint16_t d;
} dair_block_q6_K;

_Static_assert(sizeof(dair_block_q4_K) == 144, "Q4_K block must be 144 bytes");
_Static_assert(sizeof(dair_block_q6_K) == 210, "Q6_K block must be 210 bytes");

typedef struct {
    uint16_t d;
    uint8_t qh[4];
    uint8_t qs[DAIR_QK / 2];
} dair_block_q5_0;

typedef struct {
    uint16_t d;
    uint16_t m;
    uint8_t qh[4];
    uint8_t qs[DAIR_QK / 2];
} dair_block_q5_1;

typedef struct {
    uint16_t d;
    uint8_t qs[DAIR_QK / 2];
} dair_block_iq4_nl;

typedef struct {
    uint8_t scales[DAIR_QKK / 16];
    uint8_t qs[DAIR_QKK / 4];
    uint16_t d;
    uint16_t dmin;
} dair_block_q2_K;

typedef struct {
    uint8_t hmask[DAIR_QKK / 8];
    uint8_t qs[DAIR_QKK / 4];
    uint8_t scales[12];
    uint16_t d;
} dair_block_q3_K;

typedef struct {
    uint16_t d;
    uint16_t dmin;
    uint8_t scales[12];
    uint8_t qh[DAIR_QKK / 8];
    uint8_t qs[DAIR_QKK / 2];
} dair_block_q5_K;

typedef struct {
    uint16_t d;
    uint16_t scales_h;
    uint8_t scales_l[DAIR_QKK / 64];
    uint8_t qs[DAIR_QKK / 2];
} dair_block_iq4_xs;

_Static_assert(sizeof(dair_block_q5_0) == 22, "Q5_0 block must be 22 bytes");
_Static_assert(sizeof(dair_block_q5_1) == 24, "Q5_1 block must be 24 bytes");
_Static_assert(sizeof(dair_block_iq4_nl) == 18, "IQ4_NL block must be 18 bytes");
_Static_assert(sizeof(dair_block_q2_K) == 84, "Q2_K block must be 84 bytes");
_Static_assert(sizeof(dair_block_q3_K) == 110, "Q3_K block must be 110 bytes");
_Static_assert(sizeof(dair_block_q5_K) == 176, "Q5_K block must be 176 bytes");
_Static_assert(sizeof(dair_block_iq4_xs) == 136, "IQ4_XS block must be 136 bytes");

/* IQ4_NL / IQ4_XS code book (llama.cpp's kvalues_iq4nl). */
static const int8_t dair_iq4_values[16] __attribute__((unused)) = {-127, -104, -83, -65, -49, -35, -22, -10,
                                                                   1,    13,   25,  38,  53,  69,  89,  113};

enum {
    DAIR_F32 = 0, DAIR_F16 = 1, DAIR_Q8_0 = 2, DAIR_Q4_0 = 3, DAIR_Q4_1 = 4, DAIR_Q4_K = 5, DAIR_Q6_K = 6,
    DAIR_Q5_0 = 7, DAIR_Q5_1 = 8, DAIR_IQ4_NL = 9, DAIR_Q2_K = 10, DAIR_Q3_K = 11, DAIR_Q5_K = 12,
    DAIR_IQ4_XS = 13, DAIR_BF16 = 14, DAIR_NTYPES = 15
};

static const int dair_block_values[DAIR_NTYPES] = {1, 1, DAIR_QK, DAIR_QK, DAIR_QK, DAIR_QKK, DAIR_QKK, DAIR_QK,
                                                   DAIR_QK, DAIR_QK, DAIR_QKK, DAIR_QKK, DAIR_QKK, DAIR_QKK, 1};
static const int dair_block_bytes[DAIR_NTYPES] = {
    4, 2, (int)sizeof(dair_block_q8_0), (int)sizeof(dair_block_q4_0), (int)sizeof(dair_block_q4_1),
    (int)sizeof(dair_block_q4_K), (int)sizeof(dair_block_q6_K), (int)sizeof(dair_block_q5_0),
    (int)sizeof(dair_block_q5_1), (int)sizeof(dair_block_iq4_nl), (int)sizeof(dair_block_q2_K),
    (int)sizeof(dair_block_q3_K), (int)sizeof(dair_block_q5_K), (int)sizeof(dair_block_iq4_xs), 2};

/* Weights whose 8-bit products use Q8_K activations (blocks of 256) rather than blocks of 32. */
static inline int dair_uses_q8k(int qtype) {
    return qtype == DAIR_Q4_K || qtype == DAIR_Q6_K || qtype == DAIR_Q2_K || qtype == DAIR_Q3_K ||
           qtype == DAIR_Q5_K || qtype == DAIR_IQ4_XS;
}

/* Weights with an 8-bit activation product (the rest are float: F32, F16, BF16). */
static inline int dair_is_quantized(int qtype) {
    return qtype != DAIR_F32 && qtype != DAIR_F16 && qtype != DAIR_BF16;
}

/* Q4_K's eight 6-bit (scale, min) pairs. */
static inline void dair_q4k_scales(const uint8_t *s, uint8_t sc[8], uint8_t m[8]) {
    /* four bytes at a time, as llama.cpp's kernels do: a per-byte loop is a visible share of a product */
    uint32_t u[3], o[4];
    memcpy(u, s, 12);
    o[0] = u[0] & 0x3F3F3F3Fu;
    o[1] = (u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    o[2] = u[1] & 0x3F3F3F3Fu;
    o[3] = ((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    memcpy(sc, o, 8);
    memcpy(m, o + 2, 8);
}

/* Q3_K's sixteen 6-bit scales (unsigned; the scale is sc - 32), as llama.cpp unpacks them. */
static inline void dair_q3k_scales(const uint8_t *s, int8_t sc[16]) {
    uint32_t a[4];
    memcpy(a, s, 12);
    const uint32_t t = a[2];
    a[2] = ((a[0] >> 4) & 0x0F0F0F0Fu) | (((t >> 4) & 0x03030303u) << 4);
    a[3] = ((a[1] >> 4) & 0x0F0F0F0Fu) | (((t >> 6) & 0x03030303u) << 4);
    a[0] = (a[0] & 0x0F0F0F0Fu) | ((t & 0x03030303u) << 4);
    a[1] = (a[1] & 0x0F0F0F0Fu) | (((t >> 2) & 0x03030303u) << 4);
    memcpy(sc, a, 16);
}

/* ---- IEEE half <-> float ------------------------------------------------ */

/* Portable conversions (round to nearest even), used where F16C is absent and
 * by the scalar fallback so it does not depend on the instruction set. */
static inline float dair_fp16_to_fp32_soft(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal half: renormalise */
            exp = 127 - 15 + 1;
            while ((man & 0x400u) == 0) {
                man <<= 1;
                exp--;
            }
            man &= 0x3FFu;
            bits = sign | (exp << 23) | (man << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t dair_fp32_to_fp16_soft(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u;
    uint32_t ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7C00u | (ax > 0x7F800000u ? 0x200u : 0));
    if (ax >= 0x477FF000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7C00u);
    if (ax < 0x38800000u) { /* below the smallest normal half: subnormal or zero */
        if (ax < 0x33000000u)
            return (uint16_t)sign;
        uint32_t e = ax >> 23;
        uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
        uint32_t shift = 126 - e; /* 14..24 */
        uint32_t half = m >> shift;
        uint32_t rem = m & ((1u << shift) - 1);
        uint32_t mid = 1u << (shift - 1);
        if (rem > mid || (rem == mid && (half & 1)))
            half++;
        return (uint16_t)(sign | half);
    }
    uint32_t r = ax + 0xC8000FFFu + ((ax >> 13) & 1); /* rebias exponent, round to nearest even */
    return (uint16_t)(sign | (r >> 13));
}

#if defined(__F16C__)
static inline float dair_fp16_to_fp32(uint16_t h) { return _cvtsh_ss(h); }
static inline uint16_t dair_fp32_to_fp16(float f) { return (uint16_t)_cvtss_sh(f, 0); }
#else
static inline float dair_fp16_to_fp32(uint16_t h) { return dair_fp16_to_fp32_soft(h); }
static inline uint16_t dair_fp32_to_fp16(float f) { return dair_fp32_to_fp16_soft(f); }
#endif

static inline float dair_bf16_to_fp32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t dair_load_u16(const void *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

#endif
