/* context.c: the context window over a model's KV cache, and the shift when it is full.
 *
 * The C twin of lib/babyllama/context.py (read that file's docstring for the why): a context
 * remembers which token sits at each cached position; feeding tokens that would pass seq_len
 * keeps the first n_keep, drops the oldest half of the rest, and recomputes the kept tokens at
 * their new positions. Chat mode (run.c -m chat) keeps one context across the turns.
 */
#include "babyllama.h"
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

struct bl_context {
    bl_model *m;
    int seq_len, vocab_size, n_keep, shift;
    int len, n_shifts;
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
    if (n_keep < 1 || n_keep > seq_len - 2)
        return bl_fail(err, errlen, BL_ERR_ARG, "n_keep must be in [1, %d] for a context of %d (BOS at least, and room to shift), got %d",
                       seq_len - 2, seq_len, n_keep);
    bl_context *ctx = calloc(1, sizeof *ctx);
    if (!ctx) return bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory");
    ctx->tokens = malloc(sizeof(int) * (size_t)seq_len);
    ctx->target = malloc(sizeof(int) * (size_t)seq_len);
    if (!ctx->tokens || !ctx->target) {
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
    free(ctx);
}

const char *bl_context_error(const bl_context *ctx) { return ctx ? ctx->err : "no context"; }

int bl_context_len(const bl_context *ctx) { return ctx ? ctx->len : 0; }

int bl_context_shifts(const bl_context *ctx) { return ctx ? ctx->n_shifts : 0; }

const int *bl_context_tokens(const bl_context *ctx) { return ctx ? ctx->tokens : NULL; }

/* the logits of the last of n tokens at positions pos..pos+n-1; one forward per token until
 * a batched prefill replaces this loop */
static int forward_tokens(bl_model *m, const int *tokens, int n, int pos, float *logits) {
    for (int i = 0; i < n; i++) {
        int rc = bl_forward(m, tokens[i], pos + i, i == n - 1 ? logits : NULL);
        if (rc != BL_OK) return rc;
    }
    return BL_OK;
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
    return BL_OK;
}
