/* model.h: the library's model object and the small ops of the forward pass, shared by the
 * token-at-a-time forward (model.c) and the batched prefill (prefill.c), so both compute the
 * same float32 values. Internal: not part of the public API (babyllama.h). */
#ifndef BABYLLAMA_MODEL_H
#define BABYLLAMA_MODEL_H

#include "babyllama.h"
#include "kernels.h"
#include "simd.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    float prob;
    int index;
} ProbIndex;

typedef struct {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
    int version, group_size, shared;
} Config;

typedef struct {
    const float *attention_norm, *ffn_norm;   /* (dim,) each */
    bl_mat wq, wk, wv, wo;                    /* (dim, dim), (kv_dim, dim) x2, (dim, dim) */
    bl_mat w1, w2, w3;                        /* (hidden_dim, dim), (dim, hidden_dim), (hidden_dim, dim) */
} Layer;

struct bl_model {
    Config c;
    int threads;
    void *map;
    size_t map_size;
    float *tok_embeddings;   /* (vocab_size, dim): the mapping, or a dequantized copy for v2 */
    int owns_embeddings;
    float *scales;           /* v2: aligned copies of all the scales, when some were misaligned */
    Layer *layers;
    const float *norm;       /* (dim,) */
    bl_mat output;           /* (vocab_size, dim) */
    /* state */
    float *x, *xb, *xb2, *hb, *hb2, *q, *k, *v, *logits; /* activations */
    double *att, *qd;                                    /* attention scores, a query in double */
    int8_t *xq_q;
    float *xq_s;                                         /* quantized activation (v2) */
    float *key_cache, *value_cache;   /* (n_layers, n_kv_heads, seq_len, head_size) each */
    double *freqs_cos, *freqs_sin;                       /* RoPE, (seq_len, head_size / 2) */
    ProbIndex *probindex;                                /* sampler scratch (vocab_size) */
    float *probs;
    char err[512];
};

/* The threads for T tokens through the model: a small model's tokens run on one thread.
 * Each parallel region costs a fork and a join, microseconds on an idle machine but up to a
 * scheduler time slice when the other cores are busy (bench/bench_engines.py measures it);
 * the book's model (dim 128, 4 layers, vocab 512: ~0.8M multiply-adds a token, ~0.1 ms on one
 * core) would pay that about nine times a token (the FFN and attention of each layer, and the
 * classifier) to split work that the wait alone exceeds. From stories15M's shape up (~15M a
 * token), or a prompt of several small tokens, the split pays, and each product still decides
 * by its own size (kernels.c). */
#define BL_WORK_PARALLEL_MIN (1L << 22)
static inline int work_threads(const bl_model *m, int T) {
    const Config *c = &m->c;
    long kv_dim = (long)c->n_kv_heads * (c->dim / c->n_heads);
    long layer = (long)c->dim * (2L * c->dim + 2 * kv_dim) + 3L * c->dim * c->hidden_dim;
    long work = c->n_layers * layer + (long)c->vocab_size * c->dim;
    return (double)T * work >= BL_WORK_PARALLEL_MIN ? m->threads : 1;
}

/* ---------------------------------------------------------------------------------------- */
/* the small ops of the forward pass */

/* The small ops are computed in double and stored as float: then the NumPy engine, doing the
 * same in float64, lands on the same float32 values (sums in a different order differ only in
 * the last bits of a double). For int8 files this matters: a last-bit difference before an
 * activation is quantized can flip a rounding and move the result by a whole quantization step. */
static inline void rmsnorm(float *o, const float *x, const float *weight, int n) {
    double ss = 0.0;
    for (int j = 0; j < n; j++) ss += (double)x[j] * x[j];
    ss = 1.0 / sqrt(ss / n + 1e-5);
    for (int j = 0; j < n; j++) o[j] = (float)(weight[j] * (ss * x[j]));
}

/* exp(x) in double for x <= 0 (softmax and silu inputs are shifted to be), branch-free so that
 * the loops calling it vectorize: x = k ln2 + r with |r| <= ln2/2 (ln2 split in two parts for
 * an exact reduction), exp(r) by its Taylor series to r^13 (error below 1e-16), times 2^k
 * built in the exponent bits. Within 2 ulp of a correctly rounded exp, like libm's and
 * NumPy's, so the float32 results it feeds round the same way in C and in NumPy. */
#if defined(__FMA__) || defined(__ARM_FEATURE_FMA)
#define MADD(a, b, c) fma(a, b, c)   /* one instruction, one rounding: faster and as accurate */
#else
#define MADD(a, b, c) ((a) * (b) + (c))
#endif
static inline double exp_neg(double x) {
    x = x < -708.0 ? -708.0 : x;   /* exp(-708) ~ 3e-308: below that, 0 for our purposes */
    double k = nearbyint(x * 1.4426950408889634);   /* nearest integer (vectorizes) */
    double r = (x - k * 6.93147180369123816490e-01) - k * 1.90821492927058770002e-10;
    double p = 1.0 / 6227020800.0;   /* 1/13!, then Horner down to 1/0! */
    p = MADD(p, r, 1.0 / 479001600.0);
    p = MADD(p, r, 1.0 / 39916800.0);
    p = MADD(p, r, 1.0 / 3628800.0);
    p = MADD(p, r, 1.0 / 362880.0);
    p = MADD(p, r, 1.0 / 40320.0);
    p = MADD(p, r, 1.0 / 5040.0);
    p = MADD(p, r, 1.0 / 720.0);
    p = MADD(p, r, 1.0 / 120.0);
    p = MADD(p, r, 1.0 / 24.0);
    p = MADD(p, r, 1.0 / 6.0);
    p = MADD(p, r, 0.5);
    p = MADD(p, r, 1.0);
    p = MADD(p, r, 1.0);
    /* 2^k: k + 1.5 * 2^52 holds k in its low mantissa bits; move k + 1023 to the exponent */
    double t = k + 6755399441055744.0;
    uint64_t bits;   /* unsigned: a NaN input (k is NaN) shifts garbage bits, not UB, and p is NaN */
    memcpy(&bits, &t, sizeof bits);
    bits = (bits - 0x4338000000000000ULL + 1023) << 52;
    double scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

#if defined(BL_AVX2) && defined(__FMA__)
/* exp_neg on four lanes, the same operations lane by lane (so the same bits) */
#define BL_EXP4 1
static inline __m256d exp_neg4(__m256d x) {
    x = _mm256_max_pd(_mm256_set1_pd(-708.0), x);   /* a NaN lane stays NaN, as above */
    __m256d k = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256d r = _mm256_sub_pd(_mm256_sub_pd(x, _mm256_mul_pd(k, _mm256_set1_pd(6.93147180369123816490e-01))),
                              _mm256_mul_pd(k, _mm256_set1_pd(1.90821492927058770002e-10)));
    static const double c[] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0,
                               1.0 / 40320.0, 1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0,
                               1.0 / 6.0, 0.5, 1.0, 1.0};
    __m256d p = _mm256_set1_pd(1.0 / 6227020800.0);
    for (int i = 0; i < 13; i++) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(c[i]));
    __m256i bits = _mm256_castpd_si256(_mm256_add_pd(k, _mm256_set1_pd(6755399441055744.0)));
    bits = _mm256_slli_epi64(_mm256_add_epi64(_mm256_sub_epi64(bits, _mm256_set1_epi64x(0x4338000000000000LL)),
                                              _mm256_set1_epi64x(1023)), 52);
    return _mm256_mul_pd(p, _mm256_castsi256_pd(bits));
}
#endif

/* q . k in double with four independent partial sums (one long chain of dependent adds
 * would leave the FPU waiting on each add's latency); q already in double */
static inline double dot_d(const double *q, const float *k, int n) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int i = 0;
#if defined(BL_AVX2)   /* the same four sums, one per lane (the compiler would use two lanes) */
    __m256d acc = _mm256_setzero_pd();
    for (; i + 4 <= n; i += 4)
        acc = _mm256_add_pd(acc, _mm256_mul_pd(_mm256_loadu_pd(q + i), _mm256_cvtps_pd(_mm_loadu_ps(k + i))));
    _mm256_storeu_pd(s, acc);
#endif
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) s[j] += q[i + j] * k[i + j];
    for (; i < n; i++) s[0] += q[i] * k[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

static inline double max_d(const double *x, int n) {
    double mx[4] = {x[0], x[0], x[0], x[0]};   /* four running maxima: no dependency chain */
    int i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) mx[j] = x[i + j] > mx[j] ? x[i + j] : mx[j];
    for (; i < n; i++) mx[0] = x[i] > mx[0] ? x[i] : mx[0];
    double a = mx[0] > mx[1] ? mx[0] : mx[1], b = mx[2] > mx[3] ? mx[2] : mx[3];
    return a > b ? a : b;
}

/* x[i] = exp(x[i] - max) in place; returns their sum (partial sums, as in dot_d) */
static inline double exp_sum_d(double *x, int n, double max) {
    double part[4] = {0.0, 0.0, 0.0, 0.0};
    int i = 0;
#if defined(BL_EXP4)   /* part[j] in lane j */
    __m256d acc = _mm256_setzero_pd(), mv = _mm256_set1_pd(max);
    for (; i + 4 <= n; i += 4) {
        __m256d e = exp_neg4(_mm256_sub_pd(_mm256_loadu_pd(x + i), mv));
        _mm256_storeu_pd(x + i, e);
        acc = _mm256_add_pd(acc, e);
    }
    _mm256_storeu_pd(part, acc);
#endif
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) {
            x[i + j] = exp_neg(x[i + j] - max);
            part[j] += x[i + j];
        }
    for (; i < n; i++) {
        x[i] = exp_neg(x[i] - max);
        part[0] += x[i];
    }
    return (part[0] + part[1]) + (part[2] + part[3]);
}

/* softmax of x (n,) in double, in place */
static inline void softmax_d(double *x, int n) {
    double sum = exp_sum_d(x, n, max_d(x, n));
    for (int i = 0; i < n; i++) x[i] /= sum;
}

/* RoPE: rotate each pair (2i, 2i+1) of every head of vec (n,) by its angle at the position
 * whose table rows are fcos/fsin (head_size / 2 each) */
static inline void rope(float *vec, int n, int head_size, const double *fcos, const double *fsin) {
    for (int i = 0; i < n; i += 2) {
        double fcr = fcos[(i % head_size) / 2], fci = fsin[(i % head_size) / 2];
        double v0 = vec[i], v1 = vec[i + 1];
        vec[i] = (float)(v0 * fcr - v1 * fci);
        vec[i + 1] = (float)(v0 * fci + v1 * fcr);
    }
}

/* one query head over cached positions 0..pos: out (head_size,) = softmax(q K^T / sqrt(hs)) V,
 * with kh, vh one KV head's cache (positions x head_size); att (pos + 1,), qd (head_size,)
 * scratch. q is converted to double once, not once per position. The weighted sum of V runs
 * over 32, 16 or 8 outputs at a time, all positions for each (the sums stay in registers instead of
 * going to memory and back at every position); each output adds its terms in position order. */
static inline void attend(float *out, const float *q, const float *kh, const float *vh, int pos,
                          int head_size, double *att, double *qd) {
    const double sqrt_hs = sqrt((double)head_size);
    for (int i = 0; i < head_size; i++) qd[i] = q[i];
    int t = 0;
#if defined(BL_AVX2)
    if (head_size % 4 == 0)   /* four positions at a time: four independent chains of adds */
        for (; t + 4 <= pos + 1; t += 4) {
            const float *k = kh + (size_t)t * head_size;
            __m256d s[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
            for (int i = 0; i < head_size; i += 4) {
                __m256d qv = _mm256_loadu_pd(qd + i);
                for (int u = 0; u < 4; u++)
                    s[u] = _mm256_add_pd(s[u], _mm256_mul_pd(qv, _mm256_cvtps_pd(_mm_loadu_ps(k + (size_t)u * head_size + i))));
            }
            for (int u = 0; u < 4; u++) {   /* as dot_d ends */
                double p[4];
                _mm256_storeu_pd(p, s[u]);
                att[t + u] = (p[0] + p[1]) + (p[2] + p[3]);
            }
        }
#endif
    for (; t <= pos; t++) att[t] = dot_d(qd, kh + (size_t)t * head_size, head_size);
    for (t = 0; t <= pos; t++) att[t] /= sqrt_hs;   /* a loop of its own: vector divisions */
    softmax_d(att, pos + 1);
    int i0 = 0;
    for (; i0 + 32 <= head_size; i0 += 32) {
        double a[32] = {0.0};
        for (t = 0; t <= pos; t++)
            for (int i = 0; i < 32; i++) a[i] += att[t] * vh[(size_t)t * head_size + i0 + i];
        for (int i = 0; i < 32; i++) out[i0 + i] = (float)a[i];
    }
    for (; i0 + 16 <= head_size; i0 += 16) {
        double a[16] = {0.0};
        for (t = 0; t <= pos; t++)
            for (int i = 0; i < 16; i++) a[i] += att[t] * vh[(size_t)t * head_size + i0 + i];
        for (int i = 0; i < 16; i++) out[i0 + i] = (float)a[i];
    }
    for (; i0 + 8 <= head_size; i0 += 8) {   /* stories260K's heads are 8 wide */
        double a[8] = {0.0};
        for (t = 0; t <= pos; t++)
            for (int i = 0; i < 8; i++) a[i] += att[t] * vh[(size_t)t * head_size + i0 + i];
        for (int i = 0; i < 8; i++) out[i0 + i] = (float)a[i];
    }
    for (int i = i0; i < head_size; i++) {   /* head sizes not a multiple of 8 */
        double a = 0.0;
        for (t = 0; t <= pos; t++) a += att[t] * vh[(size_t)t * head_size + i];
        out[i] = (float)a;
    }
}

/* SwiGLU's gate: hb = silu(hb) * hb2, n values */
static inline void silu_mul(float *hb, const float *hb2, int n) {
    int i = 0;
#if defined(BL_EXP4)   /* both branches' e^-|v|, then 1 / it where v < 0 */
    const __m256d one = _mm256_set1_pd(1.0), sign = _mm256_set1_pd(-0.0);
    for (; i + 4 <= n; i += 4) {
        __m256d val = _mm256_cvtps_pd(_mm_loadu_ps(hb + i));
        __m256d en = exp_neg4(_mm256_or_pd(val, sign));   /* -|v| */
        __m256d e = _mm256_blendv_pd(en, _mm256_div_pd(one, en), _mm256_cmp_pd(val, _mm256_setzero_pd(), _CMP_LT_OQ));
        __m256d y = _mm256_mul_pd(_mm256_div_pd(val, _mm256_add_pd(one, e)), _mm256_cvtps_pd(_mm_loadu_ps(hb2 + i)));
        _mm_storeu_ps(hb + i, _mm256_cvtpd_ps(y));
    }
#endif
    for (; i < n; i++) {
        double val = hb[i];   /* silu(v) = v / (1 + e^-v), e^-v = 1 / e^v for v < 0 */
        double e = val < 0 ? 1.0 / exp_neg(val) : exp_neg(-val);
        hb[i] = (float)(val / (1.0 + e) * hb2[i]);
    }
}

#endif
