/* context.c: the context window over a model's KV cache, and the shift when it is full.
 *
 * The C twin of lib/babyllama/context.py (read that file's docstring for the why): a context
 * remembers which token sits at each cached position; feeding tokens that would pass seq_len
 * keeps the first n_keep, drops the oldest half of the rest, and recomputes the kept tokens at
 * their new positions. Chat mode (run.c -m chat) keeps one context across the turns.
 *
 * Generation runs here too: bl_context_generate samples and feeds token after token inside C
 * (the Python API calls it once per chunk of tokens rather than twice per token), and
 * bl_generate, run.c's loop, is built on it, so both shift the context past seq_len.
 */
#include "model.h"

#include <stdlib.h>
#include <string.h>

struct bl_context {
    bl_model *m;
    int seq_len, vocab_size, n_keep, shift;
    int len, n_shifts;
    long n_fed;     /* tokens fed in all, shifts or not: run.c's pos, for error messages */
    float *logits;  /* (vocab_size,) the last token's, for bl_context_generate */
    int *tokens;    /* (seq_len,) tokens[i] is cached at position i, i < len */
    int *target;    /* (seq_len,) what the cache holds after a feed */
    char err[512];
};

int bl_context_open(bl_model *m, int n_keep, int shift, bl_context **out, char *err,
                    size_t errlen) {
    if (!m || !out) return bl_fail(err, errlen, BL_ERR_ARG, "no model or no output pointer");
    *out = NULL;
    int32_t cfg[BL_CONFIG_LEN];
    bl_model_config(m, cfg);
    int seq_len = cfg[6];
    if (shift && seq_len < 3)   /* as babyllama.context.check_n_keep */
        return bl_fail(err, errlen, BL_ERR_ARG, "a context of %d positions is too short to shift (it needs 3: "
                       "BOS, one token kept and one new): stay within it or turn the context shift off (-k 0)", seq_len);
    if (shift && (n_keep < 1 || n_keep > seq_len - 2))
        return bl_fail(err, errlen, BL_ERR_ARG, "n_keep must be in [1, %d] for a context of %d (BOS at least, and room to shift), got %d",
                       seq_len - 2, seq_len, n_keep);
    bl_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory");
    ctx->tokens = malloc(sizeof(int) * (size_t)seq_len);
    ctx->target = malloc(sizeof(int) * (size_t)seq_len);
    ctx->logits = malloc(sizeof(float) * (size_t)cfg[5]);
    if (!ctx->tokens || !ctx->target || !ctx->logits) {
        bl_context_close(ctx);
        return bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory for a context of %d", seq_len);
    }
    ctx->m = m;
    ctx->seq_len = seq_len;
    ctx->vocab_size = cfg[5];
    ctx->n_keep = n_keep;
    ctx->shift = shift != 0;
    *out = ctx;
    return BL_OK;
}

void bl_context_close(bl_context *ctx) {
    if (!ctx) return;
    free(ctx->tokens);
    free(ctx->target);
    free(ctx->logits);
    free(ctx);
}

const char *bl_context_error(const bl_context *ctx) { return ctx ? ctx->err : "no context"; }

int bl_context_len(const bl_context *ctx) { return ctx ? ctx->len : 0; }

int bl_context_shifts(const bl_context *ctx) { return ctx ? ctx->n_shifts : 0; }

const int *bl_context_tokens(const bl_context *ctx) { return ctx ? ctx->tokens : NULL; }

/* the logits of the last of n tokens at positions pos..pos+n-1: a batched prefill, or the
 * plain forward pass for the one token of a decoding step (same numbers, no prefill scratch) */
static int forward_tokens(bl_model *m, const int *tokens, int n, int pos, float *logits) {
    return n == 1 ? bl_forward(m, tokens[0], pos, logits) : bl_prefill(m, tokens, n, pos, logits);
}

/* the i-th token of (the cached tokens, then new) */
static int joined(const bl_context *ctx, const int *new_tokens, int i) {
    return i < ctx->len ? ctx->tokens[i] : new_tokens[i - ctx->len];
}

int bl_context_feed(bl_context *ctx, const int *new_tokens, int n, float *logits) {
    if (!ctx || !new_tokens || !logits) return BL_ERR_ARG;
    if (n < 1) return bl_fail(ctx->err, sizeof ctx->err, BL_ERR_ARG, "feed needs at least one token");
    for (int i = 0; i < n; i++)
        if (new_tokens[i] < 0 || new_tokens[i] >= ctx->vocab_size)
            return bl_fail(ctx->err, sizeof ctx->err, BL_ERR_ARG, "token id %d outside the vocabulary [0, %d)", new_tokens[i], ctx->vocab_size);
    /* the target: everything if it fits, else the first n_keep and the newest tail */
    long total = (long)ctx->len + n;
    int count;
    if (total <= ctx->seq_len) {
        count = (int)total;
        for (int i = 0; i < count; i++) ctx->target[i] = joined(ctx, new_tokens, i);
    } else {
        if (!ctx->shift)
            return bl_fail(ctx->err, sizeof ctx->err, BL_ERR_ARG, "%d more tokens do not fit in the context: %d of %d positions are in use and the context shift is off",
                           n, ctx->len, ctx->seq_len);
        int n_discard = (ctx->seq_len - ctx->n_keep) / 2;
        int n_tail = ctx->seq_len - ctx->n_keep - n_discard;
        count = ctx->n_keep + n_tail;
        for (int i = 0; i < ctx->n_keep; i++) ctx->target[i] = joined(ctx, new_tokens, i);
        for (int i = 0; i < n_tail; i++) ctx->target[ctx->n_keep + i] = joined(ctx, new_tokens, (int)(total - n_tail + i));
        ctx->n_shifts++;
    }
    /* unchanged positions keep their keys and values (causal attention); the last token is
     * always computed, for its logits */
    int common = 0, limit = ctx->len < count - 1 ? ctx->len : count - 1;
    while (common < limit && ctx->tokens[common] == ctx->target[common]) common++;
    int rc = forward_tokens(ctx->m, ctx->target + common, count - common, common, logits);
    if (rc != BL_OK) {
        ctx->len = common;   /* past `common` the cache may be half-written */
        return bl_fail(ctx->err, sizeof ctx->err, rc, "%s", bl_model_error(ctx->m));
    }
    memcpy(ctx->tokens, ctx->target, sizeof(int) * (size_t)count);
    ctx->len = count;
    ctx->n_fed += n;
    return BL_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* generation */

/* feed, then sample and feed in turn: at most max_new tokens into out (when not NULL) and to
 * cb (when not NULL); stops before a sampled BOS or EOS. The last token sampled is not fed. */
static int generate(bl_context *ctx, const int *feed, int n_feed, int max_new, float temperature,
                    float topp, uint64_t *rng, int *out, int *n_out, bl_token_cb cb, void *user) {
    int rc = bl_context_feed(ctx, feed, n_feed, ctx->logits);
    while (rc == BL_OK) {
        int next;
        if ((rc = bl_sample(ctx->m, ctx->logits, temperature, topp, rng, &next)) != BL_OK)
            return bl_fail(ctx->err, sizeof ctx->err, rc, "the logits at position %ld: %s", ctx->n_fed - 1,
                           bl_model_error(ctx->m));
        if (next == 1 || next == 2) break;   /* BOS or EOS: the story is over */
        if (out) out[*n_out] = next;
        ++*n_out;
        if (cb && cb(next, user)) return bl_fail(ctx->err, sizeof ctx->err, BL_ERR_STOPPED, "stopped by the callback");
        if (*n_out >= max_new) break;
        rc = bl_context_feed(ctx, &next, 1, ctx->logits);
    }
    return rc;
}

static int check_sampling(char *err, size_t errlen, float temperature, float topp) {
    if (!(temperature >= 0.0f)) return bl_fail(err, errlen, BL_ERR_ARG, "temperature must be >= 0, got %g", temperature);
    if (!(topp > 0.0f && topp <= 1.0f)) return bl_fail(err, errlen, BL_ERR_ARG, "topp must be in (0, 1], got %g", topp);
    return BL_OK;
}

int bl_context_generate(bl_context *ctx, const int *feed, int n_feed, int max_new,
                        float temperature, float topp, uint64_t *rng_state, int *out, int *n_out) {
    if (!ctx || !feed || !rng_state || !out || !n_out) return BL_ERR_ARG;
    *n_out = 0;
    if (max_new < 1) return bl_fail(ctx->err, sizeof ctx->err, BL_ERR_ARG, "max_new must be >= 1, got %d", max_new);
    if (*rng_state == 0) return bl_fail(ctx->err, sizeof ctx->err, BL_ERR_ARG, "the random state must be nonzero (xorshift would repeat 0 forever)");
    int rc = check_sampling(ctx->err, sizeof ctx->err, temperature, topp);
    if (rc != BL_OK) return rc;
    return generate(ctx, feed, n_feed, max_new, temperature, topp, rng_state, out, n_out, NULL, NULL);
}

int bl_generate(bl_model *m, const int *prompt, int n_prompt, int steps, float temperature,
                float topp, uint64_t seed, int n_keep, bl_token_cb cb, void *user,
                int *n_generated) {
    if (!m || !prompt) return BL_ERR_ARG;
    char *err = m->err;
    size_t errlen = sizeof m->err;
    int seq_len = m->c.seq_len, count = 0, rc;
    if (n_generated) *n_generated = 0;
    if (n_prompt < 1) return bl_fail(err, errlen, BL_ERR_ARG, "the prompt needs at least one token (BOS = 1)");
    if (n_keep < 0) return bl_fail(err, errlen, BL_ERR_ARG, "n_keep must be >= 0 (0 = no context shift), got %d", n_keep);
    if (n_keep == 0 && n_prompt > seq_len)
        return bl_fail(err, errlen, BL_ERR_ARG, "prompt of %d tokens is longer than the context (%d) and the context shift is off", n_prompt, seq_len);
    if (seed == 0) return bl_fail(err, errlen, BL_ERR_ARG, "seed must be nonzero (xorshift would repeat 0 forever)");
    if ((rc = check_sampling(err, errlen, temperature, topp)) != BL_OK) return rc;
    if (n_keep == 0 && steps > seq_len) steps = seq_len;   /* run.c's clamp */
    uint64_t rng = seed;
    bl_reset(m);
    if (steps <= n_prompt - 1) return BL_OK;
    bl_context *ctx;
    /* shift only when the run can pass the end of the context: a model whose context is too
     * short to shift still generates within it, as run.c does */
    int shift = n_keep != 0 && (steps > seq_len || n_prompt > seq_len);
    if ((rc = bl_context_open(m, shift ? n_keep : 1, shift, &ctx, err, errlen)) != BL_OK) return rc;
    /* `steps` counts every position, prompt included: steps - n_prompt + 1 new tokens */
    rc = generate(ctx, prompt, n_prompt, steps - n_prompt + 1, temperature, topp, &rng, NULL, &count, cb, user);
    if (rc != BL_OK) bl_fail(err, errlen, rc, "%s", ctx->err);
    if (n_generated) *n_generated = count;
    bl_context_close(ctx);
    return rc;
}
