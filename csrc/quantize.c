/* quantize.c: Q8_0 quantization of activations, as runq.c and our NumPy engine do it: per
 * group of gs values, scale = max|x| / 127 and q = x / scale rounded half away from zero,
 * clipped to [-127, 127]. A matmul's input is quantized once, then every weight row reuses it.
 * AVX2 does a group 8 values at a time (4-wide groups two at a time), with the same float
 * operations as the portable loop, so every path gives the same bytes and scales.
 */
#include "kernels.h"
#include "simd.h"

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(BL_AVX2)
/* 8 values x divided by their scales sc, rounded half away from zero as trunc(v) + sign(v)
 * where |v - trunc(v)| >= 0.5 (both exact in float), clipped to [-127, 127], into q[0..8) */
static inline void round8(int8_t *q, const float *x, __m256 sc) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 half = _mm256_set1_ps(0.5f), one = _mm256_set1_ps(1.0f);
    const __m256 lim = _mm256_set1_ps(127.0f), sign = _mm256_set1_ps(-0.0f);
    __m256 v = _mm256_div_ps(_mm256_loadu_ps(x), sc);
    __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m256 away = _mm256_cmp_ps(_mm256_and_ps(_mm256_sub_ps(v, t), absmask), half, _CMP_GE_OQ);
    __m256 r = _mm256_add_ps(t, _mm256_and_ps(away, _mm256_or_ps(one, _mm256_and_ps(v, sign))));
    r = _mm256_min_ps(_mm256_max_ps(r, _mm256_sub_ps(_mm256_setzero_ps(), lim)), lim);
    __m256i i32 = _mm256_cvtps_epi32(r);   /* whole numbers: exact */
    __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
    _mm_storel_epi64((__m128i *)q, _mm_packs_epi16(i16, i16));
}

/* One group (gs a multiple of 8) as bl_quantize's loop below computes it, bit for bit, 8 values
 * a step. Returns 0, having written nothing, for a group that holds a NaN: the loop below then
 * does it. */
static int quantize_group8(int8_t *q, float *s, const float *x, int gs) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
    for (int k = 0; k < gs; k += 8) {
        __m256 v = _mm256_and_ps(_mm256_loadu_ps(x + k), absmask);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        mx = _mm256_max_ps(mx, v);
    }
    if (_mm256_movemask_ps(nan)) return 0;
    float m[8], wmax = 0.0f;
    _mm256_storeu_ps(m, mx);
    for (int k = 0; k < 8; k++) wmax = m[k] > wmax ? m[k] : wmax;
    float scale = wmax / 127.0f;
    *s = scale;
    if (scale == 0.0f || !isfinite(scale)) {
        memset(q, 0, (size_t)gs);
        return 1;
    }
    for (int k = 0; k < gs; k += 8) round8(q + k, x + k, _mm256_set1_ps(scale));
    return 1;
}

/* Two 4-wide groups (stories260K's) at once, one per 128-bit half, as the loop below computes
 * them. Returns 0, having written nothing, when either holds a NaN or has a zero or infinite
 * scale: the loop below then does both. */
static int quantize_groups4x2(int8_t *q, float *s, const float *x) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v = _mm256_and_ps(_mm256_loadu_ps(x), absmask);
    if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) return 0;
    __m256 mx = _mm256_max_ps(v, _mm256_permute_ps(v, 0xB1));   /* each half's max, everywhere */
    mx = _mm256_max_ps(mx, _mm256_permute_ps(mx, 0x4E));
    __m256 sc = _mm256_div_ps(mx, _mm256_set1_ps(127.0f));
    __m256 bad = _mm256_or_ps(_mm256_cmp_ps(sc, _mm256_setzero_ps(), _CMP_EQ_OQ),
                              _mm256_cmp_ps(sc, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
    if (_mm256_movemask_ps(bad)) return 0;
    s[0] = _mm256_cvtss_f32(sc), s[1] = _mm256_cvtss_f32(_mm256_permute2f128_ps(sc, sc, 1));
    round8(q, x, sc);
    return 1;
}
#endif

void bl_quantize(int8_t *q, float *s, const float *x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
#if defined(BL_AVX2)
        if (gs % 8 == 0 && quantize_group8(q + (size_t)g * gs, s + g, xg, gs)) continue;
        if (gs == 4 && g + 2 <= n / gs && quantize_groups4x2(q + (size_t)g * gs, s + g, xg)) {
            g++;   /* two groups done */
            continue;
        }
#endif
        float wmax = 0.0f;
        for (int k = 0; k < gs; k++) {
            float v = fabsf(xg[k]);
            if (v > wmax || v != v) wmax = v;   /* a NaN stays: the scale is NaN, as in NumPy */
        }
        float scale = wmax / 127.0f;
        s[g] = scale;
        for (int k = 0; k < gs; k++) {
            /* an all-zero group has scale 0: its values are 0, not 0/0; a NaN or infinite
             * scale gives 0 too (converting NaN to int8 is undefined), and the scale carries
             * the NaN or infinity into the product */
            if (scale == 0.0f || !isfinite(scale)) { q[(size_t)g * gs + k] = 0; continue; }
            /* clipped to [-127, 127]: with a subnormal max|x| the rounded scale can be below
             * max|x| / 127, and x / scale past 127 would be undefined in int8 (or -128, which
             * the SIMD dot products' sign trick cannot take) */
            double r = round(xg[k] / scale);
            q[(size_t)g * gs + k] = (int8_t)(r > 127.0 ? 127.0 : r < -127.0 ? -127.0 : r);
        }
    }
}
