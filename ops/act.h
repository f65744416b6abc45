/* Quantized activations: what every 8-bit dot-product kernel reads. */
#ifndef DAIR_ACT_H
#define DAIR_ACT_H

#include <stdint.h>

/* n rows of cols int8 values, and per block the scale d and s, whose meaning depends on the
 * weight type they are made for:
 *  - 32-value types: blocks of 32, d rounded through fp16 (llama.cpp's Q8_0/Q8_1 d),
 *    isum = sum(q) per block; s = fp16(d_unrounded * sum(q)) for Q4_1/Q5_1 (Q8_1's "s"),
 *    d * sum(q) for Q4_0, else unused;
 *  - K-quants and IQ4_XS: blocks of 256 (Q8_K), float d, isum = 16 sums of 16 per block. */
/* Up to this many activation rows a product still streams its weights from memory (a decode
 * step, or a few sessions decoding together), so every family's products prefetch them. */
#define DAIR_STREAM_ROWS 8

typedef struct {
    int n, cols, nb;
    int8_t *q;
    float *d;
    float *s;
    int32_t *isum;
} dair_act;

/* One weight row (nb blocks) against one activation row: the product of a (type, family). */
typedef float (*dair_vdot_fn)(const uint8_t *wrow, int nb, const int8_t *q, const float *d, const float *s,
                              const int32_t *isum);

/* The same against four consecutive activation rows (row i at q + i * cols, d + i * nb,
 * s + i * nb, isum + i * nb * per-block sums), results in res[0..3]: a weight block is unpacked
 * once for the four (prefill). */
typedef void (*dair_vdot4_fn)(const uint8_t *wrow, int nb, const int8_t *q, const float *d, const float *s,
                              const int32_t *isum, float res[4]);

#endif
