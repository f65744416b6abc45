/* Vector exp for the elementwise kernels (SiLU, softmax).
 *
 * Why not libm's expf: the compiler does not vectorize it inside Cython's loops,
 * and one scalar expf per element made silu_mul over 1536 values cost ~6 us.
 * exp(x) = 2^n * exp(r), x = n ln2 + r, |r| <= ln2/2, exp(r) by a degree-6
 * polynomial (Cephes expf coefficients): relative error ~2e-7 over the float range,
 * inputs are clamped to [-103, 89]: tiny results come out ~1e-45, large ones +inf as expf.
 */
#ifndef DAIR_VMATH_H
#define DAIR_VMATH_H

#include <math.h>
#include <stddef.h>

#if defined(__AVX512F__)
#include <immintrin.h>

static inline __m512 dair_exp512(__m512 x) {
    const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
    const __m512 ln2_hi = _mm512_set1_ps(0.693359375f);
    const __m512 ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-103.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
    r = _mm512_fnmadd_ps(n, ln2_lo, r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 r2 = _mm512_mul_ps(r, r);
    p = _mm512_fmadd_ps(p, r2, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    /* scalef handles 2^n for n down to -149 (subnormals) and up to overflow */
    return _mm512_scalef_ps(p, n);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* exp's range reduction and polynomial on 8 lanes (x already clamped): exp(x) = p * 2^n. Shared
 * by dair_exp256 and attention's softmax exp (ops/attn.h), which scale and clamp differently. The
 * same steps as dair_exp512's, written again for the other width (one function per width, as
 * the kernels are): a macro over both would hide the intrinsics a reader checks them by. */
static inline __m256 dair_exp256_poly(__m256 x, __m256 *n_out) {
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    *n_out = n;
    return _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
}

/* dair_exp512's steps on 8 lanes, the same bits: 2^n as two exact powers of two (n / 2 and the
 * rest, each a normal float for n in [-149, 128]), so that the product rounds once, as scalef's. */
static inline __m256 dair_exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(89.0f)), _mm256_set1_ps(-103.0f));
    __m256 n;
    const __m256 p = dair_exp256_poly(x, &n);
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
}

/* the first m (< 8) lanes of a mask for maskload/maskstore */
static inline __m256i dair_tail_mask256(size_t m) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)m), lane);
}
#endif

/* g[j] = act(g[j]) * u[j] for the gated feed-forward's two activations, both g * sigmoid(z):
 * SiLU, z = g; GELU by llama.cpp's tanh formula 0.5 g (1 + tanh(y)), y = sqrt(2/pi) (g + 0.044715
 * g^3), which is g / (1 + exp(-2y)): the same function, with no cancellation in 1 + tanh(y) where
 * y is very negative. gelu is a constant at each call site, so each loop is specialised. */
#define DAIR_GELU_K2 1.5957691216057308f /* 2 sqrt(2/pi) */
#define DAIR_GELU_C 0.044715f
static inline void dair_gated_mul(float *g, const float *u, size_t m, const int gelu) {
    size_t j = 0;
#if defined(__AVX512F__)
    const __m512 one = _mm512_set1_ps(1.0f), k2 = _mm512_set1_ps(-DAIR_GELU_K2), c = _mm512_set1_ps(DAIR_GELU_C);
    for (; j < m; j += 16) {
        const __mmask16 k = m - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (m - j)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(k, g + j);
        const __m512 z = gelu ? _mm512_mul_ps(k2, _mm512_fmadd_ps(_mm512_mul_ps(c, v), _mm512_mul_ps(v, v), v))
                              : _mm512_sub_ps(_mm512_setzero_ps(), v);
        const __m512 s = _mm512_div_ps(v, _mm512_add_ps(one, dair_exp512(z)));
        _mm512_mask_storeu_ps(g + j, k, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(k, u + j)));
    }
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256 one = _mm256_set1_ps(1.0f), k2 = _mm256_set1_ps(-DAIR_GELU_K2), c = _mm256_set1_ps(DAIR_GELU_C);
    for (; j < m; j += 8) {
        const __m256i k = m - j >= 8 ? _mm256_set1_epi32(-1) : dair_tail_mask256(m - j);
        const __m256 v = _mm256_maskload_ps(g + j, k);
        const __m256 z = gelu ? _mm256_mul_ps(k2, _mm256_fmadd_ps(_mm256_mul_ps(c, v), _mm256_mul_ps(v, v), v))
                              : _mm256_sub_ps(_mm256_setzero_ps(), v);
        const __m256 s = _mm256_div_ps(v, _mm256_add_ps(one, dair_exp256(z)));
        _mm256_maskstore_ps(g + j, k, _mm256_mul_ps(s, _mm256_maskload_ps(u + j, k)));
    }
#else
    for (; j < m; j++) {
        const float v = g[j];
        const float z = gelu ? -DAIR_GELU_K2 * (v + DAIR_GELU_C * v * v * v) : -v;
        g[j] = v / (1.0f + expf(z)) * u[j];
    }
#endif
}

static void dair_silu_mul(float *g, const float *u, size_t m) { dair_gated_mul(g, u, m, 0); }

static void dair_gelu_tanh_mul(float *g, const float *u, size_t m) { dair_gated_mul(g, u, m, 1); }

/* x[j] = exp(x[j] - mx), returns the sum */
static float dair_exp_sub_sum(float *x, float mx, size_t m) {
    size_t j = 0;
    float sum = 0.0f;
#if defined(__AVX512F__)
    __m512 acc = _mm512_setzero_ps(), vm = _mm512_set1_ps(mx);
    for (; j + 16 <= m; j += 16) {
        __m512 e = dair_exp512(_mm512_sub_ps(_mm512_loadu_ps(x + j), vm));
        _mm512_storeu_ps(x + j, e);
        acc = _mm512_add_ps(acc, e);
    }
    if (j < m) {
        __mmask16 k = (__mmask16)((1u << (m - j)) - 1);
        __m512 e = dair_exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, x + j), vm));
        e = _mm512_maskz_mov_ps(k, e);
        _mm512_mask_storeu_ps(x + j, k, e);
        acc = _mm512_add_ps(acc, e);
        j = m;
    }
    sum = _mm512_reduce_add_ps(acc);
#endif
    for (; j < m; j++) {
        float e = expf(x[j] - mx);
        x[j] = e;
        sum += e;
    }
    return sum;
}

#endif
