/* babyllama.h: the C inference library of chapter 06 (libbabyllama).
 *
 * Loads llama2.c model files (v0 fp32, v1 fp32, v2 int8 Q8_0) by mmap after validating them,
 * runs the forward pass with a KV cache, samples exactly as run.c (and our NumPy engine) do,
 * and encodes/decodes text with a tokenizer.bin. No global state; nothing here prints or exits:
 * every entry point returns BL_OK or an error code, with a message in the object or buffer.
 */
#ifndef BABYLLAMA_H
#define BABYLLAMA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
    BL_OK = 0,
    BL_ERR_IO = 1,       /* cannot open, stat or map a file */
    BL_ERR_FORMAT = 2,   /* the file is not what its header says */
    BL_ERR_ARG = 3,      /* an argument is out of range */
    BL_ERR_NOMEM = 4,    /* allocation failed */
    BL_ERR_STOPPED = 5,  /* a callback asked to stop */
    BL_ERR_NONFINITE = 6, /* NaN or infinite logits: nothing to sample from */
};

typedef struct bl_model bl_model;
typedef struct bl_tokenizer bl_tokenizer;

/* config[0..9]: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len,
 * version, group_size (0 unless v2), shared_classifier */
enum { BL_CONFIG_LEN = 10 };

int bl_model_open(const char *path, int threads, bl_model **out, char *err, size_t errlen);
void bl_model_close(bl_model *m);
int bl_model_config(const bl_model *m, int32_t *config);
const char *bl_model_error(const bl_model *m);
int bl_set_threads(bl_model *m, int threads);
int bl_reset(bl_model *m);
/* logits of `token` at `pos` into out[vocab_size]; fills the KV cache at pos */
int bl_forward(bl_model *m, int token, int pos, float *out);
/* prefill: tokens[0..n_tokens) at positions pos.. all at once (matrix-matrix products), the KV
 * cache filled for every position; logits of the last token into out[vocab_size] (NULL: kept
 * inside the model for bl_generate). The same numbers as n_tokens calls of bl_forward. */
int bl_prefill(bl_model *m, const int *tokens, int n_tokens, int pos, float *out);
/* the same with every token's logits, out[n_tokens * vocab_size] */
int bl_forward_batch(bl_model *m, const int *tokens, int n_tokens, int pos, float *out);

/* run.c's sampler: argmax at temperature 0, else softmax(logits / temperature) sampled with
 * top-p (0 < topp < 1) or from the full distribution (topp >= 1); xorshift64* state.
 * Argmax too when logits / temperature overflows; BL_ERR_NONFINITE for a NaN or infinite logit */
uint32_t bl_random_u32(uint64_t *state);
float bl_random_f32(uint64_t *state);
int bl_sample(bl_model *m, const float *logits, float temperature, float topp,
              uint64_t *rng_state, int *token);

/* one decoding step in one call: bl_forward(token, pos) then bl_sample, the next token in
 * *next and the logits kept inside the model (a caller's loop saves a round trip per token) */
int bl_forward_sample(bl_model *m, int token, int pos, float temperature, float topp,
                      uint64_t *rng_state, int *next);

/* the int8 dot-product path compiled in: "portable", "avx2", "vnni", "vnni_emul", "neon" or
 * "sdot" (see simd.h) */
const char *bl_simd(void);
/* seconds per empty OpenMP parallel region of `threads` threads, mean of `reps` (0 without
 * OpenMP): what each parallel region of a forward pass costs before any work is split */
double bl_fork_join_seconds(int threads, int reps);

/* generation (context.c): `steps` positions in all, prompt included; calls cb(token, user)
 * for each new token; stops at BOS/EOS or when cb returns nonzero. Past seq_len the context
 * shifts keeping n_keep tokens (see bl_context below); n_keep 0 is run.c's behaviour: steps
 * clamped to seq_len, and a prompt longer than the context an error. */
typedef int (*bl_token_cb)(int token, void *user);
int bl_generate(bl_model *m, const int *prompt, int n_prompt, int steps, float temperature,
                float topp, uint64_t seed, int n_keep, bl_token_cb cb, void *user,
                int *n_generated);

/* a context: which token sits at each cached position, and the shift when the cache is full
 * (context.c): feeding tokens past seq_len keeps the first n_keep, drops the oldest half of the
 * rest and recomputes the kept ones at their new positions; with shift 0 it is an error.
 * A rejected feed changes nothing. */
typedef struct bl_context bl_context;
int bl_context_open(bl_model *m, int n_keep, int shift, bl_context **out, char *err,
                    size_t errlen);
void bl_context_close(bl_context *ctx);
const char *bl_context_error(const bl_context *ctx);
/* logits[vocab_size] of the last of the n tokens fed after those already in the context */
int bl_context_feed(bl_context *ctx, const int *tokens, int n, float *logits);
/* generation in one call: feed feed[0..n_feed) (a prompt, or the last token a previous call
 * returned), then sample and feed in turn, run.c's sampler with *rng_state; writes at most
 * max_new tokens to out and their count to *n_out. Fewer than max_new: a BOS or EOS was
 * sampled (not written), the story is over. The last token written is not fed yet. */
int bl_context_generate(bl_context *ctx, const int *feed, int n_feed, int max_new,
                        float temperature, float topp, uint64_t *rng_state, int *out, int *n_out);
int bl_context_len(const bl_context *ctx);
int bl_context_shifts(const bl_context *ctx);
const int *bl_context_tokens(const bl_context *ctx);   /* bl_context_len of them */

int bl_tokenizer_open(const char *path, int vocab_size, bl_tokenizer **out, char *err,
                      size_t errlen);
void bl_tokenizer_close(bl_tokenizer *t);
const char *bl_tokenizer_error(const bl_tokenizer *t);
int bl_tokenizer_vocab_size(const bl_tokenizer *t);
/* text is NUL-terminated UTF-8; writes at most max_tokens ids */
int bl_encode(bl_tokenizer *t, const char *text, int bos, int eos, int *tokens, int max_tokens,
              int *n_tokens);
/* the bytes token `token` stands for after `prev` (not NUL-terminated when a raw byte) */
int bl_decode(const bl_tokenizer *t, int prev, int token, const char **piece, size_t *len);

#ifdef __cplusplus
}
#endif
#endif
