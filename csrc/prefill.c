/* prefill.c: a prompt's tokens through the model together (batched prefill).
 *
 * Token by token, every weight is read from memory once per token: a matrix-vector product
 * does 1 multiply-add per weight loaded, and the CPU waits on DRAM. With T tokens at once each
 * matmul becomes matrix-matrix, x (T, n) @ W^T, and every weight loaded serves T tokens
 * (kernels.c's bl_matmats_*), so the same bytes buy T times the arithmetic. Attention goes head
 * by head, two of the block's tokens at a time (attend_head), causal within the block: token t
 * sees the cache up to its own position, which the block writes for all its tokens first. The
 * classifier runs for the last token only (bl_prefill) or for every token (bl_forward_batch). Each token's numbers are the same ones
 * bl_forward computes: the same small ops (model.h) and the same summation order per row.
 */
#include "model.h"

#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* tokens per pass through the layers: bounds the scratch memory; by 64 tokens the weights are
 * reused enough that the products are limited by arithmetic, not by loading them */
#define BLOCK 64
#define AQ 2   /* queries of a head attended together (attend_head; weighted assumes two) */

typedef struct {
    float *x, *xb, *xb2, *q, *k, *v, *hb, *hb2;   /* (B, dim), ... (B, kv_dim), (B, hidden_dim) */
    int8_t *xq;                                   /* Q8_0 activations (B, max(dim, hidden_dim)) */
    float *xs;                                    /* and their scales */
    double *att, *qd;                             /* per thread: (AQ, seq_len), (AQ, head_size) */
    double *kd, *vd;                              /* per thread: a head's cache (seq_len, head_size) */
} Scratch;

static void scratch_free(Scratch *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v);
    free(s->hb); free(s->hb2); free(s->xq); free(s->xs); free(s->att); free(s->qd);
    free(s->kd); free(s->vd);
}

static int scratch_alloc(bl_model *m, Scratch *s, int B) {
    const Config *c = &m->c;
    size_t hs = c->dim / c->n_heads, kv = (size_t)c->n_kv_heads * hs, dim = c->dim;
    size_t big = c->hidden_dim > c->dim ? c->hidden_dim : c->dim;
    size_t gs = c->group_size > 0 ? c->group_size : 1;
    *s = (Scratch){0};
    s->x = malloc(B * dim * sizeof(float));
    s->xb = malloc(B * dim * sizeof(float));
    s->xb2 = malloc(B * dim * sizeof(float));
    s->q = malloc(B * dim * sizeof(float));
    s->k = malloc(B * kv * sizeof(float));
    s->v = malloc(B * kv * sizeof(float));
    s->hb = malloc(B * (size_t)c->hidden_dim * sizeof(float));
    s->hb2 = malloc(B * (size_t)c->hidden_dim * sizeof(float));
    s->xq = malloc(B * big);
    s->xs = malloc(B * (big / gs) * sizeof(float));
    s->att = malloc((size_t)m->threads * AQ * c->seq_len * sizeof(double));
    s->qd = malloc((size_t)m->threads * AQ * hs * sizeof(double));
    s->kd = malloc((size_t)m->threads * c->seq_len * hs * sizeof(double));
    s->vd = malloc((size_t)m->threads * c->seq_len * hs * sizeof(double));
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->hb || !s->hb2 || !s->xq ||
        !s->xs || !s->att || !s->qd || !s->kd || !s->vd) {
        scratch_free(s);
        return bl_fail(m->err, sizeof m->err, BL_ERR_NOMEM, "out of memory for a prefill block of %d tokens", B);
    }
    return BL_OK;
}

/* out[k] (T, d[k]) = x (T, n) @ W[k]^T for k < count: fp32, or each row of x quantized once
 * and then Q8_0 */
static void matmats(bl_model *m, Scratch *s, const float *x, int T, int n, int count,
                    float *const out[], const bl_mat *const w[], const int d[]) {
    bl_matvec jobs[3];
    int threads = work_threads(m, T);
    for (int k = 0; k < count; k++) jobs[k] = (bl_matvec){out[k], w[k], d[k]};
    if (w[0]->f) {
        bl_matmats_f32(jobs, count, x, T, n, threads);
    } else {
        int gs = m->c.group_size, t;
        (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)T * n >= 1 << 15)
        for (t = 0; t < T; t++)
            bl_quantize(s->xq + (size_t)t * n, s->xs + (size_t)t * (n / gs), x + (size_t)t * n, n, gs);
        bl_qtensor xq = {s->xq, s->xs};
        bl_matmats_q80(jobs, count, &xq, T, n, gs, threads);
    }
}

/* Attention of one head for the block's tokens, two queries at a time: the head's cached keys
 * and values are converted to double once per block (kd, vd), not once per query and position,
 * and each key and value row loaded serves both queries. Every number is attend's (model.h):
 * each score sums q[i] * k[i] in four partial sums (i mod 4, in order of i; a tail into the
 * first) added as (s0 + s1) + (s2 + s3), then / sqrt(head_size) and softmax_d, and each output
 * adds att[p] * v[p][i] in order of position, so the logits are the same bits either way.
 * Measured on AMD Zen 3 against attend per (token, head): 1.03-1.13x, little, because each
 * pair of queries still streams the head's keys and values (in double) from L2. */

/* the score of query qd against key k, both double: dot_d's sums */
static inline double dot_dd(const double *qd, const double *k, int n) {
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    int i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) s[j] += qd[i + j] * k[i + j];
    for (; i < n; i++) s[0] += qd[i] * k[i];
    return (s[0] + s[1]) + (s[2] + s[3]);
}

/* att[u][p] for the nq queries qd[u] and positions p < np (the same for all queries) */
static void scores(double *const att[AQ], const double *const qd[AQ], const double *kd, int np,
                   int hs, int nq) {
    int p = 0;
#if defined(BL_AVX2)
    if (nq == AQ && hs % 4 == 0)   /* 4 positions x 2 queries: 8 accumulators, one lane per sum */
        for (; p + 4 <= np; p += 4) {
            const double *k = kd + (size_t)p * hs;
            __m256d s[AQ][4];
            for (int u = 0; u < AQ; u++)
                for (int v = 0; v < 4; v++) s[u][v] = _mm256_setzero_pd();
            for (int i = 0; i < hs; i += 4) {
                __m256d q0 = _mm256_loadu_pd(qd[0] + i), q1 = _mm256_loadu_pd(qd[1] + i);
                for (int v = 0; v < 4; v++) {
                    __m256d kv = _mm256_loadu_pd(k + (size_t)v * hs + i);
                    s[0][v] = _mm256_add_pd(s[0][v], _mm256_mul_pd(q0, kv));
                    s[1][v] = _mm256_add_pd(s[1][v], _mm256_mul_pd(q1, kv));
                }
            }
            for (int u = 0; u < AQ; u++)
                for (int v = 0; v < 4; v++) {
                    double l[4];
                    _mm256_storeu_pd(l, s[u][v]);
                    att[u][p + v] = (l[0] + l[1]) + (l[2] + l[3]);
                }
        }
#endif
    for (; p < np; p++)
        for (int u = 0; u < nq; u++) att[u][p] = dot_dd(qd[u], kd + (size_t)p * hs, hs);
}

/* out[u][i0 + i] (W outputs) = sum over p < np of att[u][p] * vd[p][i0 + i], plus for the
 * last query one more position (np) when `extra`: attend's sums in position order */
#define WEIGHTED(W)                                                                              \
    static void weighted##W(float *const out[AQ], const double *const att[AQ], const double *vd, \
                            int np, int extra, int hs, int i0, int nq) {                         \
        double a[AQ][W] = {{0.0}};                                                               \
        for (int p = 0; p < np; p++) {                                                           \
            const double *v = vd + (size_t)p * hs + i0;                                          \
            for (int u = 0; u < AQ; u++)                                                         \
                for (int i = 0; i < W; i++) a[u][i] += att[u][p] * v[i];                         \
        }                                                                                        \
        if (extra)                                                                               \
            for (int i = 0; i < W; i++) a[nq - 1][i] += att[nq - 1][np] * vd[(size_t)np * hs + i0 + i]; \
        for (int u = 0; u < nq; u++)                                                             \
            for (int i = 0; i < W; i++) out[u][i0 + i] = (float)a[u][i];                         \
    }
WEIGHTED(16)
WEIGHTED(8)
WEIGHTED(1)

/* one head, T queries q (rows `stride` apart) at positions pos.. -> out (the same layout);
 * kh, vh: the head's cache (positions x hs); kd, vd (pos + T, hs), att (AQ, seq_len) and qd
 * (AQ, hs): scratch */
static void attend_head(float *out, const float *q, int stride, const float *kh, const float *vh,
                        int T, int pos, int hs, int seq_len, double *kd, double *vd, double *att,
                        double *qd) {
    const double sqrt_hs = sqrt((double)hs);
    for (size_t i = 0; i < (size_t)(pos + T) * hs; i++) kd[i] = kh[i], vd[i] = vh[i];
    for (int t = 0; t < T; t += AQ) {
        int nq = T - t < AQ ? T - t : AQ, np = pos + t + 1;   /* positions all nq queries see */
        double *a[AQ], *qu[AQ];
        float *o[AQ];
        for (int u = 0; u < AQ; u++) {
            int tu = t + (u < nq ? u : 0);
            a[u] = att + (size_t)(u < nq ? u : 0) * seq_len, qu[u] = qd + (size_t)u * hs;
            o[u] = out + (size_t)tu * stride;
            for (int i = 0; i < hs; i++) qu[u][i] = q[(size_t)tu * stride + i];
        }
        scores(a, (const double *const *)qu, kd, np, hs, nq);
        for (int u = 1; u < nq; u++)   /* query u also sees positions np .. np + u - 1 */
            for (int p = np; p < np + u; p++) a[u][p] = dot_dd(qu[u], kd + (size_t)p * hs, hs);
        for (int u = 0; u < nq; u++) {
            for (int p = 0; p < np + u; p++) a[u][p] /= sqrt_hs;
            softmax_d(a[u], np + u);
        }
        const double *ca[AQ] = {a[0], a[1]};
        int i0 = 0, extra = nq > 1;
        for (; i0 + 16 <= hs; i0 += 16) weighted16(o, ca, vd, np, extra, hs, i0, nq);
        for (; i0 + 8 <= hs; i0 += 8) weighted8(o, ca, vd, np, extra, hs, i0, nq);
        for (; i0 < hs; i0++) weighted1(o, ca, vd, np, extra, hs, i0, nq);
    }
}

/* attention for the block's T tokens at positions pos..pos+T-1, the cache already holding
 * them: out (T, dim), one head per work item */
static void attention_block(bl_model *m, Scratch *s, int l, const float *q, float *out, int T,
                            int pos) {
    const Config *c = &m->c;
    int head_size = c->dim / c->n_heads, kv_mul = c->n_heads / c->n_kv_heads;
    size_t hstride = (size_t)c->seq_len * head_size;   /* one KV head of one layer */
    const float *kcache = m->key_cache + (size_t)l * c->n_kv_heads * hstride;
    const float *vcache = m->value_cache + (size_t)l * c->n_kv_heads * hstride;
    long work = (long)T * (pos + T) * c->dim;
    int h, threads = work_threads(m, T);
    (void)work, (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if (work >= 1 << 13)
    for (h = 0; h < c->n_heads; h++) {
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        const float *kh = kcache + (h / kv_mul) * hstride, *vh = vcache + (h / kv_mul) * hstride;
        attend_head(out + (size_t)h * head_size, q + (size_t)h * head_size, c->dim, kh, vh, T, pos,
                    head_size, c->seq_len, s->kd + (size_t)me * hstride, s->vd + (size_t)me * hstride,
                    s->att + (size_t)me * AQ * c->seq_len, s->qd + (size_t)me * AQ * head_size);
    }
}

/* T <= BLOCK tokens at positions pos.. through every layer; logits of the last token into
 * out (vocab_size,), or of every token into out (T, vocab_size) when `all`; none when out is
 * NULL (a block before the last one of a prompt) */
static void forward_block(bl_model *m, Scratch *s, const int *tokens, int T, int pos, float *out,
                          int all) {
    const Config *c = &m->c;
    int dim = c->dim, hidden_dim = c->hidden_dim, head_size = dim / c->n_heads;
    int kv_dim = c->n_kv_heads * head_size, half = head_size / 2;
    size_t hstride = (size_t)c->seq_len * head_size;
    for (int t = 0; t < T; t++)
        memcpy(s->x + (size_t)t * dim, m->tok_embeddings + (size_t)tokens[t] * dim, dim * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        const Layer *w = &m->layers[l];
        for (int t = 0; t < T; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, w->attention_norm, dim);
        matmats(m, s, s->xb, T, dim, 3, (float *const[]){s->q, s->k, s->v},
                (const bl_mat *const[]){&w->wq, &w->wk, &w->wv}, (const int[]){dim, kv_dim, kv_dim});

        /* RoPE at each token's position, then k and v into the cache for every position */
        float *kcache = m->key_cache + (size_t)l * c->n_kv_heads * hstride;
        float *vcache = m->value_cache + (size_t)l * c->n_kv_heads * hstride;
        for (int t = 0; t < T; t++) {
            const double *fcos = m->freqs_cos + (size_t)(pos + t) * half;
            const double *fsin = m->freqs_sin + (size_t)(pos + t) * half;
            float *k = s->k + (size_t)t * kv_dim, *v = s->v + (size_t)t * kv_dim;
            rope(s->q + (size_t)t * dim, dim, head_size, fcos, fsin);
            rope(k, kv_dim, head_size, fcos, fsin);
            for (int g = 0; g < c->n_kv_heads; g++) {
                size_t at = g * hstride + (size_t)(pos + t) * head_size;
                memcpy(kcache + at, k + g * head_size, head_size * sizeof(float));
                memcpy(vcache + at, v + g * head_size, head_size * sizeof(float));
            }
        }
        attention_block(m, s, l, s->q, s->xb, T, pos);
        matmats(m, s, s->xb, T, dim, 1, (float *const[]){s->xb2}, (const bl_mat *const[]){&w->wo},
                (const int[]){dim});
        for (size_t i = 0; i < (size_t)T * dim; i++) s->x[i] += s->xb2[i];

        /* SwiGLU feed-forward: w2(silu(w1 x) * w3 x) */
        for (int t = 0; t < T; t++)
            rmsnorm(s->xb + (size_t)t * dim, s->x + (size_t)t * dim, w->ffn_norm, dim);
        matmats(m, s, s->xb, T, dim, 2, (float *const[]){s->hb, s->hb2},
                (const bl_mat *const[]){&w->w1, &w->w3}, (const int[]){hidden_dim, hidden_dim});
        int t, threads = work_threads(m, T);
        (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)T * hidden_dim >= 1 << 15)
        for (t = 0; t < T; t++)
            silu_mul(s->hb + (size_t)t * hidden_dim, s->hb2 + (size_t)t * hidden_dim, hidden_dim);
        matmats(m, s, s->hb, T, hidden_dim, 1, (float *const[]){s->xb}, (const bl_mat *const[]){&w->w2},
                (const int[]){dim});
        for (size_t i = 0; i < (size_t)T * dim; i++) s->x[i] += s->xb[i];
    }
    if (!out) return;
    int first = all ? 0 : T - 1, n = T - first;   /* the classifier: only the rows wanted */
    for (int t = first; t < T; t++)
        rmsnorm(s->x + (size_t)t * dim, s->x + (size_t)t * dim, m->norm, dim);
    matmats(m, s, s->x + (size_t)first * dim, n, dim, 1, (float *const[]){out},
            (const bl_mat *const[]){&m->output}, (const int[]){c->vocab_size});
}

/* the same checks as bl_forward's, for every token and position */
static int check_tokens(bl_model *m, const int *tokens, int n, int pos) {
    const Config *c = &m->c;
    if (n < 1 || !tokens) return bl_fail(m->err, sizeof m->err, BL_ERR_ARG, "at least one token is needed (got %d)", n);
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= c->vocab_size)
            return bl_fail(m->err, sizeof m->err, BL_ERR_ARG, "token id %d outside the vocabulary [0, %d)", tokens[i], c->vocab_size);
    if (pos < 0 || pos >= c->seq_len)
        return bl_fail(m->err, sizeof m->err, BL_ERR_ARG, "position %d outside the context [0, %d)", pos, c->seq_len);
    if (n > c->seq_len - pos)
        return bl_fail(m->err, sizeof m->err, BL_ERR_ARG, "position %d outside the context [0, %d)", c->seq_len, c->seq_len);
    return BL_OK;
}

static int run_blocks(bl_model *m, const int *tokens, int n, int pos, float *out, int all) {
    Scratch s;
    int rc = check_tokens(m, tokens, n, pos);
    if (rc != BL_OK) return rc;
    if ((rc = scratch_alloc(m, &s, n < BLOCK ? n : BLOCK)) != BL_OK) return rc;
    for (int b = 0; b < n; b += BLOCK) {
        int T = n - b < BLOCK ? n - b : BLOCK;
        float *o = all ? out + (size_t)b * m->c.vocab_size : b + T == n ? out : NULL;
        forward_block(m, &s, tokens + b, T, pos + b, o, all);
    }
    scratch_free(&s);
    return BL_OK;
}

int bl_prefill(bl_model *m, const int *tokens, int n_tokens, int pos, float *logits) {
    if (!m) return BL_ERR_ARG;
    return run_blocks(m, tokens, n_tokens, pos, logits ? logits : m->logits, 0);
}

int bl_forward_batch(bl_model *m, const int *tokens, int n_tokens, int pos, float *logits) {
    if (!m || !logits) return BL_ERR_ARG;
    return run_blocks(m, tokens, n_tokens, pos, logits, 1);
}
