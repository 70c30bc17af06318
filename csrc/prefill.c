/* prefill.c: a prompt's tokens through the model together (batched prefill).
 *
 * Token by token, every weight is read from memory once per token: a matrix-vector product
 * does 1 multiply-add per weight loaded, and the CPU waits on DRAM. With T tokens at once each
 * matmul becomes matrix-matrix, x (T, n) @ W^T, and every weight loaded serves T tokens
 * (kernels.c's bl_matmats_*), so the same bytes buy T times the arithmetic. Attention stays per
 * token and head (model.h's attend, as in decoding), causal within the block: token t sees the
 * cache up to its own position, which the block writes for all its tokens first. (Attending two
 * queries of a head together, with the head's cache converted to double once per block, gave
 * the same bits but no reliable gain: new/old prefill 0.85-1.15, median 1.04, over 15M and 110M
 * shapes on AMD Zen 3.) The classifier runs for the last token only (bl_prefill) or for every
 * token (bl_forward_batch). Each token's numbers are the same ones
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

typedef struct {
    float *x, *xb, *xb2, *q, *k, *v, *hb, *hb2;   /* (B, dim), ... (B, kv_dim), (B, hidden_dim) */
    int8_t *xq;                                   /* Q8_0 activations (B, max(dim, hidden_dim)) */
    float *xs;                                    /* and their scales */
    double *att, *qd;                             /* per thread: (seq_len,), (head_size,) */
} Scratch;

static void scratch_free(Scratch *s) {
    free(s->x); free(s->xb); free(s->xb2); free(s->q); free(s->k); free(s->v);
    free(s->hb); free(s->hb2); free(s->xq); free(s->xs); free(s->att); free(s->qd);
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
    s->att = malloc((size_t)m->threads * c->seq_len * sizeof(double));
    s->qd = malloc((size_t)m->threads * hs * sizeof(double));
    if (!s->x || !s->xb || !s->xb2 || !s->q || !s->k || !s->v || !s->hb || !s->hb2 || !s->xq ||
        !s->xs || !s->att || !s->qd) {
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

/* attention for the block's T tokens at positions pos..pos+T-1, the cache already holding
 * them: out (T, dim), one (token, head) pair per work item */
static void attention_block(bl_model *m, Scratch *s, int l, const float *q, float *out, int T,
                            int pos) {
    const Config *c = &m->c;
    int head_size = c->dim / c->n_heads, kv_mul = c->n_heads / c->n_kv_heads;
    size_t hstride = (size_t)c->seq_len * head_size;   /* one KV head of one layer */
    const float *kcache = m->key_cache + (size_t)l * c->n_kv_heads * hstride;
    const float *vcache = m->value_cache + (size_t)l * c->n_kv_heads * hstride;
    long work = (long)T * (pos + T) * c->dim;
    int items = T * c->n_heads, it, threads = work_threads(m, T);
    (void)work, (void)threads;
#pragma omp parallel for schedule(static, 1) num_threads(threads) if (work >= 1 << 13)
    for (it = 0; it < items; it++) {
        int t = it / c->n_heads, h = it % c->n_heads, me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        size_t off = (size_t)t * c->dim + (size_t)h * head_size;
        const float *kh = kcache + (h / kv_mul) * hstride, *vh = vcache + (h / kv_mul) * hstride;
        attend(out + off, q + off, kh, vh, pos + t, head_size, s->att + (size_t)me * c->seq_len,
               s->qd + (size_t)me * head_size);
    }
}

/* for each of T rows: x += dx (unless dx is NULL), then out = rmsnorm(x) * weight; a token
 * per work item, so no thread waits while one normalizes the whole block */
static void add_rmsnorm(float *out, float *x, const float *dx, const float *weight, int T, int dim,
                        int threads) {
    int t;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)T * dim >= 1 << 13)
    for (t = 0; t < T; t++) {
        float *xt = x + (size_t)t * dim;
        if (dx)
            for (int i = 0; i < dim; i++) xt[i] += dx[(size_t)t * dim + i];
        rmsnorm(out + (size_t)t * dim, xt, weight, dim);
    }
}

/* RoPE at each token's position, then its k and v into layer l's cache at that position */
static void rope_cache(bl_model *m, Scratch *s, int l, int T, int pos, int threads) {
    const Config *c = &m->c;
    int dim = c->dim, head_size = dim / c->n_heads, kv_dim = c->n_kv_heads * head_size, t;
    size_t hstride = (size_t)c->seq_len * head_size;
    float *kcache = m->key_cache + (size_t)l * c->n_kv_heads * hstride;
    float *vcache = m->value_cache + (size_t)l * c->n_kv_heads * hstride;
    (void)threads;
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)T * dim >= 1 << 13)
    for (t = 0; t < T; t++) {
        const double *fcos = m->freqs_cos + (size_t)(pos + t) * (head_size / 2);
        const double *fsin = m->freqs_sin + (size_t)(pos + t) * (head_size / 2);
        float *k = s->k + (size_t)t * kv_dim, *v = s->v + (size_t)t * kv_dim;
        rope(s->q + (size_t)t * dim, dim, head_size, fcos, fsin);
        rope(k, kv_dim, head_size, fcos, fsin);
        for (int g = 0; g < c->n_kv_heads; g++) {
            size_t at = g * hstride + (size_t)(pos + t) * head_size;
            memcpy(kcache + at, k + g * head_size, head_size * sizeof(float));
            memcpy(vcache + at, v + g * head_size, head_size * sizeof(float));
        }
    }
}

/* T <= BLOCK tokens at positions pos.. through every layer; logits of the last token into
 * out (vocab_size,), or of every token into out (T, vocab_size) when `all`; none when out is
 * NULL (a block before the last one of a prompt). Each sublayer's output lands in xb2 and is
 * added to the residual stream x right before the next rmsnorm. */
static void forward_block(bl_model *m, Scratch *s, const int *tokens, int T, int pos, float *out,
                          int all) {
    const Config *c = &m->c;
    int dim = c->dim, hidden_dim = c->hidden_dim, kv_dim = c->n_kv_heads * (dim / c->n_heads);
    int t, threads = work_threads(m, T);
    for (t = 0; t < T; t++)
        memcpy(s->x + (size_t)t * dim, m->tok_embeddings + (size_t)tokens[t] * dim, dim * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        const Layer *w = &m->layers[l];
        /* attention: x += the previous layer's FFN output first */
        add_rmsnorm(s->xb, s->x, l > 0 ? s->xb2 : NULL, w->attention_norm, T, dim, threads);
        matmats(m, s, s->xb, T, dim, 3, (float *const[]){s->q, s->k, s->v},
                (const bl_mat *const[]){&w->wq, &w->wk, &w->wv}, (const int[]){dim, kv_dim, kv_dim});
        rope_cache(m, s, l, T, pos, threads);
        attention_block(m, s, l, s->q, s->xb, T, pos);
        matmats(m, s, s->xb, T, dim, 1, (float *const[]){s->xb2}, (const bl_mat *const[]){&w->wo},
                (const int[]){dim});

        /* SwiGLU feed-forward: w2(silu(w1 x) * w3 x) */
        add_rmsnorm(s->xb, s->x, s->xb2, w->ffn_norm, T, dim, threads);
        matmats(m, s, s->xb, T, dim, 2, (float *const[]){s->hb, s->hb2},
                (const bl_mat *const[]){&w->w1, &w->w3}, (const int[]){hidden_dim, hidden_dim});
#pragma omp parallel for schedule(static) num_threads(threads) if ((long)T * hidden_dim >= 1 << 15)
        for (t = 0; t < T; t++)
            silu_mul(s->hb + (size_t)t * hidden_dim, s->hb2 + (size_t)t * hidden_dim, hidden_dim);
        matmats(m, s, s->hb, T, hidden_dim, 1, (float *const[]){s->xb2}, (const bl_mat *const[]){&w->w2},
                (const int[]){dim});
    }
    if (!out) return;
    int first = all ? 0 : T - 1, n = T - first;   /* the classifier: only the rows wanted */
    size_t at = (size_t)first * dim;
    add_rmsnorm(s->xb + at, s->x + at, s->xb2 + at, m->norm, n, dim, threads);
    matmats(m, s, s->xb + at, n, dim, 1, (float *const[]){out},
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
