/* NEON kernels (ops/neon_quants.h) against the plain-C kernels of the same headers (qdot.h,
 * kquants.h), for an aarch64 build run under qemu-aarch64: tests/unit/test_neon.py builds it with and
 * without the dot-product extension.
 *
 * For Q8_0, Q4_0, Q4_1, Q4_K and Q6_K:
 *  - exact: unit scales and small codes make every sum exact in float, so the two must agree bit
 *    for bit (any wrong integer shows);
 *  - random: random blocks, fp16 scales from subnormal to 65504 and zero, activations of every
 *    magnitude including -128/127, 1..9 blocks; agreement within 2e-5 of the magnitude of the
 *    terms (float summation order is all that may differ);
 *  - matmul: dair_mm_q on odd row counts and 1..5 activation rows quantized by the real
 *    quantizers, once with the family "scalar" and once with "neon": each must equal its kernel
 *    called directly bit for bit (the dispatch picks it) and the two must agree as above.
 * Then the float kernels of neon_float.h: every F16 half to float bit for bit as the portable
 * conversion and dot products against double sums (attn.h's plain-C attention, which aarch64
 * runs, is tested against numpy by tests/unit/test_attention.py).
 * `harness perturb` feeds the NEON side one activation value off by one per block and must find
 * a mismatch for every type (the comparison is able to fail). Exit status 0 = all agree. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qdot.h"

#if !defined(DAIR_HAVE_NEON)
#error "build for aarch64: this harness tests the NEON kernels"
#endif

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint32_t rnd(void) {
    rng ^= rng << 13, rng ^= rng >> 7, rng ^= rng << 17;
    return (uint32_t)(rng >> 16);
}
static float rndf(void) { return (float)(rnd() & 0xFFFFFF) / 16777216.0f; } /* [0, 1) */

static const int TYPES[] = {DAIR_Q8_0, DAIR_Q4_0, DAIR_Q4_1, DAIR_Q4_K, DAIR_Q6_K};
static const char *const TNAMES[] = {"Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"};
#define NT 5
#define MAXNB 9

/* The plain-C kernel of a type, in dair_vdot_fn's form. */
static float ref_dot(int qt, const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                     const int32_t *isum) {
    switch (qt) {
    case DAIR_Q4_K: return dair_dot_q4k_scalar(w, nb, q, d, isum);
    case DAIR_Q6_K: return dair_dot_q6k_scalar(w, nb, q, d, isum);
    default: return dair_vec_dot_q_scalar(w, qt, nb, q, d, s);
    }
}

/* An fp16 scale: mostly ordinary, sometimes zero, subnormal, 65504 or negative. */
static uint16_t rnd_scale(void) {
    static const uint16_t edge[] = {0x0000, 0x0001, 0x03FF, 0x0400, 0x7BFF, 0xFBFF, 0x3C00, 0xBC00};
    if (rnd() % 4 == 0)
        return edge[rnd() % 8];
    return dair_fp32_to_fp16_soft((rnd() & 1 ? 1.0f : -1.0f) * ldexpf(0.5f + rndf(), (int)(rnd() % 14) - 12));
}

/* Random weight bytes of nb blocks with fp16 scales; `exact`: unit scales, all codes allowed.
 * extreme: every byte 0xFF or 0x00 / 0x80 (largest codes, Q8_0's -128). */
static size_t make_weights(int qt, int nb, uint8_t *w, int exact, int extreme) {
    const size_t bs = (size_t)dair_block_bytes[qt];
    for (size_t i = 0; i < bs * nb; i++)
        w[i] = extreme == 1 ? 0xFF : extreme == 2 ? (qt == DAIR_Q8_0 ? 0x80 : 0x00) : (uint8_t)rnd();
    for (int b = 0; b < nb; b++) {
        uint8_t *blk = w + (size_t)b * bs;
        uint16_t h[2] = {exact ? 0x3C00 : rnd_scale(), exact ? 0x3C00 : rnd_scale()};
        switch (qt) {
        case DAIR_Q8_0:
        case DAIR_Q4_0: memcpy(blk, h, 2); break;
        case DAIR_Q4_1:
        case DAIR_Q4_K: memcpy(blk, h, 4); break; /* d and m / d and dmin */
        case DAIR_Q6_K: memcpy(blk + 208, h, 2); /* int8 scales at 192.. stay random */
            if (exact)
                for (int k = 0; k < 16; k++)
                    blk[192 + k] = (uint8_t)(int8_t)((int)(rnd() % 31) - 15);
            break;
        }
    }
    return bs * nb;
}

/* Activations for nb blocks of a type's block size: q, d, s and isum as act.h says.
 * small: |q| <= 15 and d = 1 (exact mode); extreme: q alternating -128 / 127. */
static void make_act(int qt, int nb, int8_t *q, float *d, float *s, int32_t *isum, int small, int extreme) {
    const int kq = dair_uses_q8k(qt), bv = kq ? DAIR_QKK : DAIR_QK;
    for (int i = 0; i < nb * bv; i++)
        q[i] = small ? (int8_t)((int)(rnd() % 31) - 15) : extreme ? (int8_t)(i & 1 ? 127 : -128) : (int8_t)rnd();
    for (int b = 0; b < nb; b++) {
        d[b] = small ? 1.0f : rnd() % 8 == 0 ? 0.0f : ldexpf(0.5f + rndf(), -(int)(rnd() % 12));
        int sum = 0;
        for (int j = 0; j < bv; j++)
            sum += q[b * bv + j];
        s[b] = small ? (float)sum : d[b] * (float)sum;
        if (kq)
            for (int k = 0; k < 16; k++) {
                int t = 0;
                for (int j = 0; j < 16; j++)
                    t += q[b * bv + 16 * k + j];
                isum[b * 16 + k] = t;
            }
        else
            isum[b] = sum;
    }
}

/* The magnitude of the terms of a product, from single-block reference products and the
 * per-block terms they can cancel against (Q4_1's m s, Q4_K's dmin sum m bsums). */
static double magnitude(int qt, const uint8_t *w, int nb, const int8_t *q, const float *d, const float *s,
                        const int32_t *isum) {
    const size_t bs = (size_t)dair_block_bytes[qt];
    const int kq = dair_uses_q8k(qt), bv = kq ? DAIR_QKK : DAIR_QK;
    double mag = 0.0;
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = w + (size_t)b * bs;
        const int32_t *ib = isum + (size_t)b * (kq ? 16 : 1);
        double other = 0.0;
        if (qt == DAIR_Q4_1)
            other = fabs((double)dair_fp16_to_fp32_soft(dair_load_u16(blk + 2)) * s[b]);
        if (qt == DAIR_Q4_K) {
            uint8_t sc[8], m[8];
            dair_q4k_scales(blk + 4, sc, m);
            long summ = 0;
            for (int j = 0; j < 8; j++)
                summ += (long)m[j] * (ib[2 * j] + ib[2 * j + 1]);
            other = fabs((double)dair_fp16_to_fp32_soft(dair_load_u16(blk + 2)) * d[b] * (double)summ);
        }
        mag += fabs(ref_dot(qt, blk, 1, q + (size_t)b * bv, d + b, s + b, ib)) + 2.0 * other;
    }
    return mag;
}

static int failures, checks;

static void report(const char *what, const char *tname, int nb, double ref, double got, double tol) {
    checks++;
    if (!(fabs(ref - got) <= tol)) { /* NaN fails too */
        failures++;
        if (failures <= 20)
            printf("FAIL %s %s nb=%d: plain-C %.9g neon %.9g (tolerance %.3g)\n", what, tname, nb, ref, got, tol);
    }
}

static int8_t q[MAXNB * DAIR_QKK * 5], qp[MAXNB * DAIR_QKK];
static float dd[MAXNB * 5], ss[MAXNB * 5];
static int32_t is[MAXNB * 16 * 5];
static uint8_t w[MAXNB * 210 * 9];

static void kernel_tests(void) {
    for (int t = 0; t < NT; t++) {
        const int qt = TYPES[t];
        const dair_vdot_fn neon = dair_neon_kernel(qt);
        if (!neon) {
            printf("FAIL %s has no NEON kernel\n", TNAMES[t]);
            failures++;
            continue;
        }
        for (int trial = 0; trial < 300; trial++) {
            const int nb = 1 + (int)(rnd() % MAXNB);
            const int exact = trial % 3 == 0, extreme = trial % 10 == 1 ? 1 : trial % 10 == 2 ? 2 : 0;
            make_weights(qt, nb, w, exact, extreme);
            make_act(qt, nb, q, dd, ss, is, exact, !exact && trial % 10 >= 7);
            const float r = ref_dot(qt, w, nb, q, dd, ss, is), g = neon(w, nb, q, dd, ss, is);
            if (exact)
                report("exact", TNAMES[t], nb, r, g, 0.0);
            else
                report("random", TNAMES[t], nb, r, g, 2e-5 * magnitude(qt, w, nb, q, dd, ss, is) + 1e-30);
        }
    }
}

/* dair_mm_q (the dispatch matmul.pyx calls) with each family, on real quantized activations. */
static void matmul_tests(void) {
    static float x[5 * MAXNB * DAIR_QKK], out_s[5 * 9], out_n[5 * 9];
    for (int t = 0; t < NT; t++) {
        const int qt = TYPES[t], kq = dair_uses_q8k(qt), bv = kq ? DAIR_QKK : DAIR_QK;
        for (int trial = 0; trial < 24; trial++) {
            const int rows = 1 + 2 * (int)(rnd() % 5), n = 1 + (int)(rnd() % 5), nb = 1 + (int)(rnd() % MAXNB);
            const int cols = nb * bv;
            const size_t rb = (size_t)dair_block_bytes[qt] * nb;
            for (int r = 0; r < rows; r++)
                make_weights(qt, nb, w + r * rb, 0, 0);
            for (int i = 0; i < n * cols; i++)
                x[i] = (rndf() - 0.5f) * ldexpf(1.0f, (int)(rnd() % 20) - 10);
            dair_act a = {n, cols, nb, q, dd, ss, is};
            for (int i = 0; i < n; i++) {
                if (kq)
                    dair_quantize_q8k_row(x + (size_t)i * cols, cols, q + (size_t)i * cols, dd + i * nb,
                                          is + (size_t)i * nb * 16);
                else
                    dair_quantize_act_row(x + (size_t)i * cols, cols, qt, q + (size_t)i * cols, dd + i * nb,
                                          ss + i * nb, is + i * nb);
            }
            dair_set_family(DAIR_FAM_SCALAR);
            dair_mm_q(w, rb, qt, 0, rows, &a, out_s, (size_t)rows);
            dair_set_family(DAIR_FAM_NEON);
            dair_mm_q(w, rb, qt, 0, rows, &a, out_n, (size_t)rows);
            for (int i = 0; i < n; i++)
                for (int r = 0; r < rows; r++) {
                    const int8_t *qi = q + (size_t)i * cols;
                    const float *di = dd + i * nb, *si = ss + i * nb;
                    const int32_t *ii = is + (size_t)i * nb * (kq ? 16 : 1);
                    const uint8_t *wr = w + r * rb;
                    const float rs = ref_dot(qt, wr, nb, qi, di, si, ii);
                    const float rn = dair_neon_kernel(qt)(wr, nb, qi, di, si, ii);
                    report("dispatch-scalar", TNAMES[t], nb, rs, out_s[i * rows + r], 0.0);
                    report("dispatch-neon", TNAMES[t], nb, rn, out_n[i * rows + r], 0.0);
                    report("matmul", TNAMES[t], nb, out_s[i * rows + r], out_n[i * rows + r],
                           2e-5 * magnitude(qt, wr, nb, qi, di, si, ii) + 1e-30);
                }
        }
    }
}

/* neon_float.h through qdot.h's F16 rows and float dot, and attn.h's attention built on them. */
static void float_tests(void) {
    static uint16_t h[65536];
    static float f[65536];
    for (int i = 0; i < 65536; i++)
        h[i] = (uint16_t)i;
    for (int start = 0; start < 3; start++) { /* lengths 65536, 65535, 65534: every tail length */
        dair_dequant_row((const uint8_t *)(h + start), DAIR_F16, 65536 - start, f);
        int bad = 0;
        for (int i = start; i < 65536; i++) {
            const float r = dair_fp16_to_fp32_soft(h[i]), g = f[i - start];
            bad += isnan(r) ? !isnan(g) : memcmp(&r, &g, 4) != 0;
        }
        checks++;
        if (bad) {
            failures++;
            printf("FAIL f16 row from %d: %d of the halves convert differently\n", start, bad);
        }
    }
    static float a[300], b[300];
    for (int trial = 0; trial < 200; trial++) {
        const int n = (int)(rnd() % 300);
        double r = 0.0, mag = 0.0;
        for (int j = 0; j < n; j++) {
            a[j] = (rndf() - 0.5f) * ldexpf(1.0f, (int)(rnd() % 16) - 8);
            b[j] = (rndf() - 0.5f) * ldexpf(1.0f, (int)(rnd() % 16) - 8);
            r += (double)a[j] * b[j];
            mag += fabs((double)a[j] * b[j]);
        }
        report("dot_f32", "F32", n, r, dair_dot_f32(a, b, n), 1e-6 * mag + 1e-30);
    }
}

/* softmax(scale q . k) v for every query head of a kv group, in double from the maths. */
/* Off-by-one activations on the NEON side only: every type must show mismatches. */
static int perturb_tests(void) {
    int detected = 0;
    for (int t = 0; t < NT; t++) {
        const int qt = TYPES[t], bv = dair_uses_q8k(qt) ? DAIR_QKK : DAIR_QK;
        const int before = failures;
        for (int trial = 0; trial < 20; trial++) {
            const int nb = 1 + (int)(rnd() % MAXNB);
            make_weights(qt, nb, w, 0, 0);
            make_act(qt, nb, q, dd, ss, is, 0, 0);
            memcpy(qp, q, (size_t)nb * bv);
            for (int b = 0; b < nb; b++) {
                const int j = b * bv + (int)(rnd() % bv);
                qp[j] = (int8_t)(qp[j] == 127 ? 126 : qp[j] + 1);
            }
            report("perturbed", TNAMES[t], nb, ref_dot(qt, w, nb, q, dd, ss, is),
                   dair_neon_kernel(qt)(w, nb, qp, dd, ss, is), 2e-5 * magnitude(qt, w, nb, q, dd, ss, is) + 1e-30);
        }
        printf("perturbed %s: %d of 20 products flagged\n", TNAMES[t], failures - before);
        detected += failures > before;
    }
    return detected;
}

int main(int argc, char **argv) {
    printf("kernels: %s (%s)\n", dair_simd_name(), dair_family_names[dair_cpu_family()]);
    if (argc > 1 && strcmp(argv[1], "perturb") == 0) {
        const int detected = perturb_tests();
        printf("perturb: mismatches found for %d of %d types\n", detected, NT);
        return detected == NT ? 3 : 0; /* 3: every type's corruption was caught */
    }
    kernel_tests();
    matmul_tests();
    float_tests();
    printf("%d checks, %d failures\n", checks, failures);
    return failures ? 1 : 0;
}
