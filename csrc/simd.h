/* simd.h: the SIMD path of the build, and the int8 group dot product every Q8_0 kernel uses.
 *
 * The path follows the build target (-march=native picks what this CPU has), or is forced with
 * -DBL_SIMD=<path>, so tests can build the library once per path and compare results:
 *   portable     plain C loops
 *   avx2         AVX2 + FMA: maddubs (u8 x s8 -> s16 pairs) then madd to s32
 *   vnni         AVX-VNNI (-mavxvnni) or AVX-512 VNNI (-mavx512vnni -mavx512vl): vpdpbusd,
 *                u8 x s8 summed in fours straight into s32 lanes
 *   vnni_emul    vnni's algorithm with vpdpbusd emulated in C: runs anywhere, tests the trick
 *   neon         ARM NEON widening multiplies (vmull_s8 + vpadal)
 *   sdot         ARM dot product extension (-march=armv8.2-a+dotprod): vdotq_s32
 * Every path computes each group's sum exactly in int32, so all give identical results.
 *
 * The sign trick (avx2, vnni): the instructions multiply an unsigned byte by a signed one, and
 * a * b = |a| * (b with a's sign applied), so |a| goes in the unsigned operand. Quantized values
 * lie in [-127, 127], so |a| <= 127 fits and no product saturates. -128 must not occur: its
 * negation does not fit in an int8 (_mm256_sign_epi8 leaves it -128), and a group holding it
 * would sum wrongly. The writer never emits it and both loaders refuse a file that holds it
 * (model.c check_mat, export.py _int8_values; tests/test_int8_range.py).
 */
#ifndef BABYLLAMA_SIMD_H
#define BABYLLAMA_SIMD_H

#include <stddef.h>
#include <stdint.h>

/* names for -DBL_SIMD=<path> (the preprocessor compares numbers, not words) */
#define BL_PATH_portable 1
#define BL_PATH_avx2 2
#define BL_PATH_vnni 3
#define BL_PATH_vnni_emul 4
#define BL_PATH_neon 5
#define BL_PATH_sdot 6
#define BL_PATH_(name) BL_PATH_##name
#define BL_PATH(name) BL_PATH_(name)

#if defined(BL_SIMD)
#define BL_SIMD_PATH BL_PATH(BL_SIMD)
#elif (defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))) && defined(__FMA__)
#define BL_SIMD_PATH BL_PATH_vnni
#elif defined(__AVX2__) && defined(__FMA__)
#define BL_SIMD_PATH BL_PATH_avx2
#elif defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
#define BL_SIMD_PATH BL_PATH_sdot
#elif defined(__ARM_NEON)
#define BL_SIMD_PATH BL_PATH_neon
#else
#define BL_SIMD_PATH BL_PATH_portable
#endif

#if BL_SIMD_PATH < BL_PATH_portable || BL_SIMD_PATH > BL_PATH_sdot
#error "BL_SIMD must be one of portable, avx2, vnni, vnni_emul, neon, sdot"
#endif

/* the fp32 kernels use AVX2/FMA on the x86 paths that have it, NEON on ARM */
#if (BL_SIMD_PATH == BL_PATH_avx2 || BL_SIMD_PATH == BL_PATH_vnni || BL_SIMD_PATH == BL_PATH_vnni_emul) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BL_AVX2 1
#elif (BL_SIMD_PATH == BL_PATH_neon || BL_SIMD_PATH == BL_PATH_sdot) && defined(__ARM_NEON)
#include <arm_neon.h>
#define BL_NEON 1
#endif

#if BL_SIMD_PATH == BL_PATH_avx2 && !defined(BL_AVX2)
#error "BL_SIMD=avx2 needs -mavx2 -mfma (or -march=native on a CPU with them)"
#endif
#if BL_SIMD_PATH == BL_PATH_vnni && !(defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
#error "BL_SIMD=vnni needs -mavxvnni, or -mavx512vnni -mavx512vl"
#endif
#if (BL_SIMD_PATH == BL_PATH_neon || BL_SIMD_PATH == BL_PATH_sdot) && !defined(BL_NEON)
#error "BL_SIMD=neon/sdot needs an ARM target with NEON"
#endif
#if BL_SIMD_PATH == BL_PATH_sdot && !defined(__ARM_FEATURE_DOTPROD)
#error "BL_SIMD=sdot needs -march=armv8.2-a+dotprod (or newer)"
#endif

#define BL_STR_(x) #x
#define BL_STR(x) BL_STR_(x)

static inline const char *bl_simd_name(void) {
    static const char *names[] = {"", "portable", "avx2", "vnni", "vnni_emul", "neon", "sdot"};
    return names[BL_SIMD_PATH];
}

#if defined(BL_AVX2)
static inline int32_t hsum_epi32(__m256i acc) {
    __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
    v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(v);
}
#endif

#if BL_SIMD_PATH == BL_PATH_vnni_emul
/* vpdpbusd, lane by lane: acc[l] += sum over i < 4 of u[4l + i] (unsigned) * s[4l + i] (signed) */
static inline void dpbusd_emul(int32_t acc[8], const uint8_t u[32], const int8_t s[32]) {
    for (int l = 0; l < 8; l++)
        for (int i = 0; i < 4; i++) acc[l] += (int32_t)u[4 * l + i] * (int32_t)s[4 * l + i];
}
#endif

/* exact integer dot product of gs int8 pairs */
static inline int32_t idot(const int8_t *a, const int8_t *b, int gs) {
    int k = 0;
    int32_t s = 0;
#if BL_SIMD_PATH == BL_PATH_vnni
    if (gs % 32 == 0) {
        __m256i acc = _mm256_setzero_si256();
        for (; k < gs; k += 32) {
            __m256i va = _mm256_loadu_si256((const __m256i *)(a + k));
            __m256i vb = _mm256_loadu_si256((const __m256i *)(b + k));
#if defined(__AVXVNNI__)
            acc = _mm256_dpbusd_avx_epi32(acc, _mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va));
#else
            acc = _mm256_dpbusd_epi32(acc, _mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va));
#endif
        }
        return hsum_epi32(acc);
    }
#elif BL_SIMD_PATH == BL_PATH_vnni_emul
    if (gs % 32 == 0) {
        int32_t acc[8] = {0};
        uint8_t u[32];
        int8_t sb[32];
        for (; k < gs; k += 32) {
            for (int i = 0; i < 32; i++) {   /* what _mm256_sign_epi8 computes */
                int8_t x = a[k + i], y = b[k + i];
                u[i] = (uint8_t)(x < 0 ? -x : x);
                sb[i] = (int8_t)(x < 0 ? -y : x == 0 ? 0 : y);
            }
            dpbusd_emul(acc, u, sb);
        }
        for (int l = 0; l < 8; l++) s += acc[l];
        return s;
    }
#elif BL_SIMD_PATH == BL_PATH_avx2
    if (gs % 32 == 0) {
        /* 32 products per step, pairs summed to int16 (at most 2 * 127 * 127: no overflow) */
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i acc = _mm256_setzero_si256();
        for (; k < gs; k += 32) {
            __m256i va = _mm256_loadu_si256((const __m256i *)(a + k));
            __m256i vb = _mm256_loadu_si256((const __m256i *)(b + k));
            __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, ones));
        }
        return hsum_epi32(acc);
    }
#endif
#if defined(BL_AVX2) && BL_SIMD_PATH != BL_PATH_vnni_emul
    if (gs % 16 == 0) {   /* e.g. 48-wide groups: sign-extend to int16 and madd */
        __m256i acc = _mm256_setzero_si256();
        for (; k < gs; k += 16) {
            __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a + k)));
            __m256i vb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + k)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(va, vb));
        }
        return hsum_epi32(acc);
    }
#elif BL_SIMD_PATH == BL_PATH_sdot
    if (gs % 16 == 0) {
        int32x4_t acc = vdupq_n_s32(0);
        for (; k < gs; k += 16) acc = vdotq_s32(acc, vld1q_s8(a + k), vld1q_s8(b + k));
        return vaddvq_s32(acc);
    }
#elif BL_SIMD_PATH == BL_PATH_neon
    if (gs % 16 == 0) {
        int32x4_t acc = vdupq_n_s32(0);
        for (; k < gs; k += 16) {
            int8x16_t va = vld1q_s8(a + k), vb = vld1q_s8(b + k);
            acc = vpadalq_s16(acc, vmull_s8(vget_low_s8(va), vget_low_s8(vb)));
            acc = vpadalq_s16(acc, vmull_s8(vget_high_s8(va), vget_high_s8(vb)));
        }
        return vaddvq_s32(acc);
    }
#endif
    for (; k < gs; k++) s += (int32_t)a[k] * (int32_t)b[k];
    return s;
}

/* The sum over a row's groups of ((float)ival_g * ws[g]) * xs[g], added in group order, for
 * weights w and activations x (ngroups * gs int8 each). On avx2/vnni, eight groups are summed at
 * a time (the last block of a row: fewer, if more than one) and their eight int32 totals reduced together (one
 * transpose-and-add instead of eight horizontal sums), scaled with two vector multiplies; the
 * terms are then added one by one, so the float result is the same as group by group. */
#if defined(BL_AVX2) && (BL_SIMD_PATH == BL_PATH_avx2 || BL_SIMD_PATH == BL_PATH_vnni)
#define BL_QDOT8 1
/* acc + the 32 products w * x summed in fours into acc's 8 int32 lanes, given uw = |w| (the
 * sign trick: only x takes w's sign). A tile computes |w| once per weight vector and shares
 * it across its tokens. */
static inline __m256i dot32_abs(__m256i acc, __m256i uw, __m256i w, __m256i x) {
    __m256i sx = _mm256_sign_epi8(x, w);
#if BL_SIMD_PATH == BL_PATH_vnni && defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, uw, sx);
#elif BL_SIMD_PATH == BL_PATH_vnni
    return _mm256_dpbusd_epi32(acc, uw, sx);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(uw, sx), _mm256_set1_epi16(1)));
#endif
}

/* acc + the 32 products w * x, summed in fours into acc's 8 int32 lanes */
static inline __m256i dot32_i8(__m256i acc, __m256i w, __m256i x) {
    return dot32_abs(acc, _mm256_sign_epi8(w, w), w, x);
}

/* lane k of the result = the sum of v[k]'s 8 lanes */
static inline __m256i hsum8_epi32(const __m256i v[8]) {
    __m256i a = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    __m256i b = _mm256_hadd_epi32(_mm256_hadd_epi32(v[4], v[5]), _mm256_hadd_epi32(v[6], v[7]));
    return _mm256_add_epi32(_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31));
}
#endif

#if defined(BL_QDOT8)
/* val + the terms of m <= 8 groups starting at x, w (and their scales), added in group order */
static inline __attribute__((always_inline)) float qdot_block(float val, const int8_t *x, const float *xs,
                                                              const int8_t *w, const float *ws, int m, int gs) {
    __m256i acc[8];
    for (int k = 0; k < 8; k++) {
        const int8_t *xg = x + (size_t)k * gs, *wg = w + (size_t)k * gs;
        __m256i a = _mm256_setzero_si256();
        for (int j = 0; k < m && j < gs; j += 32)
            a = dot32_i8(a, _mm256_loadu_si256((const __m256i *)(wg + j)),
                         _mm256_loadu_si256((const __m256i *)(xg + j)));
        acc[k] = a;
    }
    __m256 wsv, xsv;
    if (m == 8) {
        wsv = _mm256_loadu_ps(ws), xsv = _mm256_loadu_ps(xs);
    } else {   /* only the m groups' scales (masked lanes are not read) */
        __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(m), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        wsv = _mm256_maskload_ps(ws, mask), xsv = _mm256_maskload_ps(xs, mask);
    }
    __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(hsum8_epi32(acc)), wsv), xsv);
    float f[8];
    _mm256_storeu_ps(f, t);
    for (int k = 0; k < m; k++) val += f[k];
    return val;
}
#endif

#if defined(BL_QDOT8)
/* The exact sums of 8 consecutive groups narrower than 32 (4, 8 or 16 wide: stories260K's are
 * 4), in group order: the 8 groups fill 1, 2 or 4 32-byte steps whose int32 lanes each hold a
 * sum of 4 products, and adjacent lanes are added (hadd) until each lane holds one group. */
static inline __m256i group_sums8_narrow(const int8_t *x, const int8_t *w, int gs) {
    __m256i v[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    for (int k = 0; k < gs / 4; k++)
        v[k] = dot32_i8(_mm256_setzero_si256(), _mm256_loadu_si256((const __m256i *)(w + 32 * k)),
                        _mm256_loadu_si256((const __m256i *)(x + 32 * k)));
    if (gs == 4) return v[0];
    if (gs == 8)   /* hadd leaves groups 0 1 4 5 | 2 3 6 7 */
        return _mm256_permute4x64_epi64(_mm256_hadd_epi32(v[0], v[1]), 0xD8);
    /* gs == 16: two hadds leave groups 0 2 4 6 | 1 3 5 7 */
    __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
    return _mm256_permutevar8x32_epi32(h, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
#endif

static inline float qdot(const int8_t *x, const float *xs, const int8_t *w, const float *ws,
                         int ngroups, int gs) {
    float val = 0.0f;
    int g = 0;
#if defined(BL_QDOT8)
    if (gs == 4 || gs == 8 || gs == 16) {   /* 8 groups a step, the terms added in group order */
        for (; g + 8 <= ngroups; g += 8) {
            __m256i isum = group_sums8_narrow(x + (size_t)g * gs, w + (size_t)g * gs, gs);
            __m256 t = _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(isum), _mm256_loadu_ps(ws + g)),
                                     _mm256_loadu_ps(xs + g));
            float f[8];
            _mm256_storeu_ps(f, t);
            for (int k = 0; k < 8; k++) val += f[k];
        }
    }
    if (gs % 32 == 0) {
        for (; g + 8 <= ngroups; g += 8)
            val = qdot_block(val, x + (size_t)g * gs, xs + g, w + (size_t)g * gs, ws + g, 8, gs);
        if (ngroups - g >= 2) {   /* the last groups of a row; a single one costs less alone */
            val = qdot_block(val, x + (size_t)g * gs, xs + g, w + (size_t)g * gs, ws + g, ngroups - g, gs);
            g = ngroups;
        }
    }
#endif
    for (; g < ngroups; g++) val += ((float)idot(x + (size_t)g * gs, w + (size_t)g * gs, gs) * ws[g]) * xs[g];
    return val;
}

#endif
