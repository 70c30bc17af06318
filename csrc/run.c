/* run.c: a command-line front end to libbabyllama with llama2.c's flags.
 *
 *   make -C csrc            # builds ./csrc/run and the shared library
 *   ./csrc/run out/model.bin -z out/tok512.bin -i "Once upon a time" -t 0.8 -p 0.9 -n 256 -s 42
 *
 * Only this file prints or exits; the library reports errors with codes and messages.
 */
#define _POSIX_C_SOURCE 200809L
#include "babyllama.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef struct {
    bl_tokenizer *tok;
    int prev;
    double t_first;   /* when the first new token came: the prompt's time ends there */
} Printer;

static double now_s(void);

static int print_token(int token, void *user) {
    Printer *p = user;
    if (p->t_first == 0.0) p->t_first = now_s();
    const char *piece;
    size_t len;
    if (bl_decode(p->tok, p->prev, token, &piece, &len) == BL_OK) {
        /* skip lone control bytes, as run.c's safe_printf does */
        if (!(len == 1 && (unsigned char)piece[0] < 32 && piece[0] != '\n' && piece[0] != '\t'))
            fwrite(piece, 1, len, stdout);
    }
    fflush(stdout);
    p->prev = token;
    return 0;
}

static void usage(void) {
    fprintf(stderr,
            "Usage:   run <checkpoint> [options]\n"
            "Example: run model.bin -n 256 -i \"Once upon a time\"\n"
            "Options:\n"
            "  -t <float>  temperature in [0,inf], default 1.0\n"
            "  -p <float>  p value in top-p (nucleus) sampling in (0,1], default 0.9\n"
            "  -s <int>    random seed, default time(NULL)\n"
            "  -n <int>    number of steps to run for, default 256. 0 = max_seq_len\n"
            "  -i <string> input prompt\n"
            "  -z <string> optional path to custom tokenizer\n"
            "  -m <string> mode: generate (chat is not supported)\n"
            "  -T <int>    threads, default 1\n");
    exit(2);
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    const char *checkpoint = NULL, *tokenizer_path = "tokenizer.bin", *prompt = "", *mode = "generate";
    float temperature = 1.0f, topp = 0.9f;
    unsigned long long seed = 0;
    int steps = 256, threads = 1;
    char err[600];
    if (argc < 2) usage();
    checkpoint = argv[1];
    for (int i = 2; i < argc; i += 2) {
        if (i + 1 >= argc || argv[i][0] != '-' || strlen(argv[i]) != 2) usage();
        char flag = argv[i][1];
        const char *val = argv[i + 1];
        char *end = NULL;
        switch (flag) {
        case 't': temperature = strtof(val, &end); break;
        case 'p': topp = strtof(val, &end); break;
        case 's': seed = strtoull(val, &end, 10); break;
        case 'n': steps = (int)strtol(val, &end, 10); break;
        case 'T': threads = (int)strtol(val, &end, 10); break;
        case 'i': prompt = val; break;
        case 'z': tokenizer_path = val; break;
        case 'm': mode = val; break;
        default: usage();
        }
        if (end && *end) { fprintf(stderr, "error: bad value for -%c: %s\n", flag, val); return 2; }
    }
    if (strcmp(mode, "generate") != 0) { fprintf(stderr, "error: mode %s is not supported\n", mode); return 2; }
    if (seed == 0) seed = (unsigned long long)time(NULL);
    bl_model *m;
#ifndef _OPENMP
    if (threads > 1) fprintf(stderr, "warning: built without OpenMP: -T %d runs on one thread\n", threads);
#endif
    if (bl_model_open(checkpoint, threads, &m, err, sizeof err) != BL_OK) { fprintf(stderr, "error: %s\n", err); return 1; }
    int32_t cfg[BL_CONFIG_LEN];
    bl_model_config(m, cfg);
    if (steps <= 0 || steps > cfg[6]) steps = cfg[6];
    bl_tokenizer *tok;
    if (bl_tokenizer_open(tokenizer_path, cfg[5], &tok, err, sizeof err) != BL_OK) {
        fprintf(stderr, "error: %s\n", err);
        bl_model_close(m);
        return 1;
    }
    int max_tokens = (int)strlen(prompt) * 4 + 3, n_prompt = 0, n_gen = 0;
    int *ids = malloc(sizeof(int) * (size_t)max_tokens);
    int rc = ids ? bl_encode(tok, prompt, 1, 0, ids, max_tokens, &n_prompt) : BL_ERR_NOMEM;
    if (rc != BL_OK) {
        fprintf(stderr, "error: %s\n", ids ? bl_tokenizer_error(tok) : "out of memory");
    } else {
        Printer pr = {tok, 1, -1.0};
        for (int i = 1; i < n_prompt; i++) print_token(ids[i], &pr);
        pr.t_first = 0.0;
        double t0 = now_s();
        rc = bl_generate(m, ids, n_prompt, steps, temperature, topp, seed, print_token, &pr, &n_gen);
        double dt = now_s() - t0;
        printf("\n");
        if (rc != BL_OK) fprintf(stderr, "error: %s\n", bl_model_error(m));
        else if (n_gen > 0) {
            /* llama.cpp-style: prompt (prefill, up to the first new token) and generation apart */
            double tp = pr.t_first - t0, tg = dt - tp;
            fprintf(stderr, "prompt: %d tokens, %f tok/s; generation: %d tokens, %f tok/s\n", n_prompt,
                    n_prompt / tp, n_gen - 1, n_gen > 1 && tg > 0 ? (n_gen - 1) / tg : 0.0);
            fprintf(stderr, "achieved tok/s: %f\n", (n_gen + n_prompt - 1) / dt);
        }
    }
    free(ids);
    bl_tokenizer_close(tok);
    bl_model_close(m);
    return rc == BL_OK ? 0 : 1;
}
