/* kernels.c: matrix-vector products for fp32 and Q8_0, the ~90% of inference time.
 *
 * Rows are split across OpenMP threads (serial when built without OpenMP). Inside a row:
 * - fp32: AVX2/FMA or NEON intrinsics with several accumulators (independent chains hide the
 *   FMA latency), four rows at a time so each load of x serves four rows; a portable loop
 *   otherwise.
 * - Q8_0: exact int32 dot products per group (SIMD widening multiply-add), then the groups are
 *   added in order as val += ival * w_scale * x_scale, the same float operations as runq.c and
 *   our NumPy engine (the build turns off FMA contraction so the order is kept exactly).
 */
#include "kernels.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>

/* below this many multiply-adds a matmul runs on one thread: forking costs more than it saves */
#define BL_PARALLEL_MIN (1 << 16)

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define BL_AVX2 1
#elif defined(__ARM_NEON)
#include <arm_neon.h>
#define BL_NEON 1
#endif

#if defined(BL_AVX2)
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#endif

/* dot products of 4 rows with x. The next 4 rows (16n bytes, right after w3) are prefetched
 * two cache lines per step, so they arrive while these are summed: the weights stream from
 * DRAM, and with short rows (288 floats in stories15M) the hardware prefetcher alone leaves
 * a single thread waiting at every new block (measured: 10 -> 11-12 GB/s on one core). */
static void dot4_f32(float *out, const float *x, const float *w0, const float *w1,
                     const float *w2, const float *w3, int n) {
    int j = 0;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    uintptr_t next = (uintptr_t)(w3 + n);   /* integer math: a prefetch past the end never faults */
#if defined(BL_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        __builtin_prefetch((const void *)(next + 16 * (uintptr_t)j), 0, 3);   /* 8 x 4 floats */
        __builtin_prefetch((const void *)(next + 16 * (uintptr_t)j + 64), 0, 3);
        __m256 xv = _mm256_loadu_ps(x + j);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + j), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + j), xv, a3);
    }
    s0 = hsum256(a0); s1 = hsum256(a1); s2 = hsum256(a2); s3 = hsum256(a3);
#elif defined(BL_NEON)
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0), a2 = vdupq_n_f32(0), a3 = vdupq_n_f32(0);
    for (; j + 4 <= n; j += 4) {
        __builtin_prefetch((const void *)(next + 16 * (uintptr_t)j), 0, 3);   /* 4 x 4 floats */
        float32x4_t xv = vld1q_f32(x + j);
        a0 = vfmaq_f32(a0, vld1q_f32(w0 + j), xv);
        a1 = vfmaq_f32(a1, vld1q_f32(w1 + j), xv);
        a2 = vfmaq_f32(a2, vld1q_f32(w2 + j), xv);
        a3 = vfmaq_f32(a3, vld1q_f32(w3 + j), xv);
    }
    s0 = vaddvq_f32(a0); s1 = vaddvq_f32(a1); s2 = vaddvq_f32(a2); s3 = vaddvq_f32(a3);
#else
    (void)next;
#endif
    for (; j < n; j++) {
        s0 += w0[j] * x[j]; s1 += w1[j] * x[j]; s2 += w2[j] * x[j]; s3 += w3[j] * x[j];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static float dot1_f32(const float *x, const float *w, int n) {
    int j = 0;
    float s = 0.0f;
#if defined(BL_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    }
    s = hsum256(_mm256_add_ps(a0, a1));
#endif
    for (; j < n; j++) s += w[j] * x[j];
    return s;
}

/* rows [4b, 4b + 4) of out = w @ x, fewer at the end of a matrix */
static void rows4_f32(float *out, const float *x, const float *w, int n, int d, int b) {
    const float *wb = w + (size_t)4 * b * n;
    if (4 * b + 4 <= d) {
        dot4_f32(out + 4 * b, x, wb, wb + n, wb + 2 * (size_t)n, wb + 3 * (size_t)n, n);
        return;
    }
    for (int i = 4 * b; i < d; i++) out[i] = dot1_f32(x, w + (size_t)i * n, n);
}

/* the multiply-adds of a batch, plus `per_row` more for each row's fixed costs */
static long batch_work(const bl_matvec *jobs, int njobs, int n, int per_row) {
    long work = 0;
    for (int k = 0; k < njobs; k++) work += (long)jobs[k].d * (n + per_row);
    return work;
}

/* Each thread takes the same share of every matrix (schedule static) and goes on to the next
 * matrix without waiting (nowait): the threads meet once, at the end of the region. */
void bl_matmuls_f32(const bl_matvec *jobs, int njobs, const float *x, int n, int threads) {
    long work = batch_work(jobs, njobs, n, 0);
    (void)threads, (void)work;   /* unused without OpenMP */
#pragma omp parallel num_threads(threads) if (work >= BL_PARALLEL_MIN)
    for (int k = 0; k < njobs; k++) {
        const bl_matvec *j = &jobs[k];
        int nblocks = (j->d + 3) / 4, b;
#pragma omp for schedule(static) nowait
        for (b = 0; b < nblocks; b++) rows4_f32(j->out, x, j->w->f, n, j->d, b);
    }
}

void bl_matmul_f32(float *xout, const float *x, const float *w, int n, int d, int threads) {
    bl_mat mat = {w, {NULL, NULL}};
    bl_matvec job = {xout, &mat, d};
    bl_matmuls_f32(&job, 1, x, n, threads);
}

/* exact integer dot product of gs int8 pairs */
static inline int32_t idot(const int8_t *a, const int8_t *b, int gs) {
    int k = 0;
    int32_t s = 0;
#if defined(BL_AVX2)
    if (gs % 32 == 0) {
        /* |a| * sign(b, a) = a * b, with |a| unsigned for maddubs: 32 products per step, pairs
         * summed to int16 (at most 2 * 127 * 127, no overflow), then to int32 */
        const __m256i ones = _mm256_set1_epi16(1);
        __m256i acc = _mm256_setzero_si256();
        for (; k < gs; k += 32) {
            __m256i va = _mm256_loadu_si256((const __m256i *)(a + k));
            __m256i vb = _mm256_loadu_si256((const __m256i *)(b + k));
            __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(va, va), _mm256_sign_epi8(vb, va));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p16, ones));
        }
        __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
        return _mm_cvtsi128_si32(v);
    }
    if (gs % 16 == 0) {
        __m256i acc = _mm256_setzero_si256();
        for (; k < gs; k += 16) {
            __m256i va = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(a + k)));
            __m256i vb = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(b + k)));
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(va, vb));
        }
        __m128i v = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(1, 0, 3, 2)));
        v = _mm_add_epi32(v, _mm_shuffle_epi32(v, _MM_SHUFFLE(2, 3, 0, 1)));
        return _mm_cvtsi128_si32(v);
    }
#elif defined(BL_NEON)
    if (gs % 16 == 0) {
        int32x4_t acc = vdupq_n_s32(0);
        for (; k < gs; k += 16) {
            int8x16_t va = vld1q_s8(a + k), vb = vld1q_s8(b + k);
            int16x8_t lo = vmull_s8(vget_low_s8(va), vget_low_s8(vb));
            int16x8_t hi = vmull_s8(vget_high_s8(va), vget_high_s8(vb));
            acc = vpadalq_s16(acc, lo);
            acc = vpadalq_s16(acc, hi);
        }
        return vaddvq_s32(acc);
    }
#endif
    for (; k < gs; k++) s += (int32_t)a[k] * (int32_t)b[k];
    return s;
}

void bl_matmuls_q80(const bl_matvec *jobs, int njobs, const bl_qtensor *x, int n, int gs,
                    int threads) {
    int ngroups = n / gs;
    /* each group adds a scaled float sum on top of its int8 products: with small groups
     * (stories260K's are 4 wide) that dominates, and a small matrix is worth the threads */
    long work = batch_work(jobs, njobs, n, 16 * ngroups);
    (void)threads, (void)work;
#pragma omp parallel num_threads(threads) if (work >= BL_PARALLEL_MIN)
    for (int k = 0; k < njobs; k++) {
        const bl_matvec *j = &jobs[k];
        const bl_qtensor *w = &j->w->q;
        int i;
#pragma omp for schedule(static) nowait
        for (i = 0; i < j->d; i++) {
            const int8_t *wq = w->q + (size_t)i * n;
            const float *ws = w->s + (size_t)i * ngroups;
            float val = 0.0f;
            for (int g = 0; g < ngroups; g++) {
                int32_t ival = idot(x->q + (size_t)g * gs, wq + (size_t)g * gs, gs);
                val += ((float)ival * ws[g]) * x->s[g];
            }
            j->out[i] = val;
        }
    }
}

void bl_quantize(int8_t *q, float *s, const float *x, int n, int gs) {
    for (int g = 0; g < n / gs; g++) {
        const float *xg = x + (size_t)g * gs;
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
            q[(size_t)g * gs + k] = scale == 0.0f || !isfinite(scale) ? 0 : (int8_t)round(xg[k] / scale);
        }
    }
}

int bl_fail(char *err, size_t len, int code, const char *fmt, ...) {
    if (err && len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return code;
}
