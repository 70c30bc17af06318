/* cross_arch_driver.c: runs libbabyllama's sources on one model for tests/test_cross_arch.py,
 * where the library is cross-compiled for another CPU (aarch64) and run under an emulator.
 *
 *   driver MODEL THREADS TOKENS.i32 OUT.f32 STEPS
 *
 * Reads T int32 token ids, writes to OUT.f32 the logits of all T tokens from one batched
 * prefill (bl_forward_batch) and then from T single-token steps (bl_forward): 2 x T x vocab
 * float32. Prints the SIMD path, then the greedy continuation of the tokens (bl_generate at
 * temperature 0, STEPS positions in all). Exit status 1 with a message on any error.
 */
#include "babyllama.h"

#include <stdio.h>
#include <stdlib.h>

static int print_id(int token, void *user) {
    (void)user;
    printf(" %d", token);
    return 0;
}

static int fail(const char *what, const char *msg) {
    fprintf(stderr, "driver: %s: %s\n", what, msg);
    return 1;
}

int main(int argc, char **argv) {
    if (argc != 6) return fail("usage", "driver MODEL THREADS TOKENS.i32 OUT.f32 STEPS");
    char err[1024];
    bl_model *m;
    if (bl_model_open(argv[1], atoi(argv[2]), &m, err, sizeof err) != BL_OK) return fail("bl_model_open", err);
    int32_t cfg[BL_CONFIG_LEN];
    bl_model_config(m, cfg);
    int vocab = cfg[5];

    FILE *f = fopen(argv[3], "rb");
    if (!f) return fail(argv[3], "cannot open");
    int tokens[4096], T = (int)fread(tokens, sizeof(int), 4096, f);
    fclose(f);
    float *logits = malloc(sizeof(float) * 2 * (size_t)T * vocab);
    if (T < 1 || !logits) return fail(argv[3], "no tokens, or out of memory");

    if (bl_forward_batch(m, tokens, T, 0, logits) != BL_OK) return fail("bl_forward_batch", bl_model_error(m));
    bl_reset(m);
    for (int t = 0; t < T; t++)
        if (bl_forward(m, tokens[t], t, logits + (size_t)(T + t) * vocab) != BL_OK)
            return fail("bl_forward", bl_model_error(m));
    f = fopen(argv[4], "wb");
    if (!f || fwrite(logits, sizeof(float), 2 * (size_t)T * vocab, f) != 2 * (size_t)T * vocab || fclose(f))
        return fail(argv[4], "cannot write");

    printf("%s\n", bl_simd());
    bl_reset(m);
    int n = 0;
    if (bl_generate(m, tokens, T, atoi(argv[5]), 0.0f, 1.0f, 1, 0, print_id, NULL, &n) != BL_OK)
        return fail("bl_generate", bl_model_error(m));
    printf("\n");
    free(logits);
    bl_model_close(m);
    return 0;
}
