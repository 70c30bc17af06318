/* run.c: a command-line front end to libbabyllama with llama2.c's flags.
 *
 *   make -C csrc            # builds ./csrc/run and the shared library
 *   ./csrc/run out/model.bin -z out/tok512.bin -i "Once upon a time" -t 0.8 -p 0.9 -n 256 -s 42
 *   ./csrc/run out/chat.bin -z out/tok512.bin -m chat -y "You tell stories." -i "Tell me one."
 *
 * Chat mode renders each turn with Llama 2's template exactly as llama2.c's run.c does (BOS
 * before every turn, the system prompt in the first turn only), reads further turns from stdin
 * until it ends, and keeps one KV cache across the turns: a turn feeds only its new tokens (the
 * previous reply's EOS, then BOS and the rendered turn), all at once, and a reply ends at EOS.
 * Past the context the cache shifts (context.c); -k 0 turns that off, and a turn that does not
 * fit is then an error. Unlike run.c, no (discarded) token is sampled after each prompt token,
 * so the random stream is spent on reply tokens only, as in the Python chat. Setting
 * BABYLLAMA_DUMP_IDS=FILE writes the ids fed to the model, one line per feed (in generate
 * mode: the prompt's ids on the first line, then each new id on its own line).
 *
 * Generate mode shifts the context too (-k, default 1), so -n may exceed the context.
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
    FILE *dump;       /* BABYLLAMA_DUMP_IDS: each new id on a line, or NULL */
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
    if (p->dump) fprintf(p->dump, "%d\n", token);
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
            "  -n <int>    number of steps to run for, default 256. 0 = max_seq_len;\n"
            "              past max_seq_len the context shifts (see -k)\n"
            "  -i <string> input prompt\n"
            "  -z <string> optional path to custom tokenizer\n"
            "  -m <string> mode: generate|chat, default: generate\n"
            "  -y <string> (optional) system prompt in chat mode\n"
            "  -k <int>    tokens kept at the start when the context shifts, default 1;\n"
            "              0 = no shift (generation stops at the end of the context)\n"
            "  -T <int>    threads, default 1\n"
            "In chat mode -n counts the positions of the whole conversation, 0 = no limit\n"
            "(the default; with -k 0: until the context is full).\n");
    exit(2);
}

/* ---------------------------------------------------------------------------------------- */
/* chat mode */

/* print `prompt`, read one line from stdin without its newline; 0 at the end of the input */
static int read_line(const char *prompt, char **line, size_t *cap) {
    printf("%s", prompt);
    fflush(stdout);
    ssize_t n = getline(line, cap, stdin);
    if (n < 0) return 0;
    while (n > 0 && ((*line)[n - 1] == '\n' || (*line)[n - 1] == '\r')) (*line)[--n] = '\0';
    return 1;
}

static void dump_ids(FILE *dump, const int *ids, int n) {
    if (!dump) return;
    for (int i = 0; i < n; i++) fprintf(dump, i ? " %d" : "%d", ids[i]);
    fprintf(dump, "\n");
    fflush(dump);
}

typedef struct {
    const char *system, *user;   /* from -y and -i: the first turn's, else read from stdin */
    int steps, n_keep;           /* steps: positions in the whole conversation, 0 = no limit */
    float temperature, topp;
    uint64_t seed;
} ChatArgs;

/* the rendered turn, as run.c: the system prompt only in the first turn, when not empty */
static char *render_turn(const char *system, const char *user) {
    size_t n = strlen(user) + (system ? strlen(system) : 0) + 64;
    char *out = malloc(n);
    if (!out) return NULL;
    if (system && system[0])
        snprintf(out, n, "[INST] <<SYS>>\n%s\n<</SYS>>\n\n%s [/INST]", system, user);
    else
        snprintf(out, n, "[INST] %s [/INST]", user);
    return out;
}

static int oom(char *err, size_t n) {
    snprintf(err, n, "out of memory");
    return BL_ERR_NOMEM;
}

static int chat(bl_model *m, bl_tokenizer *tok, const ChatArgs *a, int vocab_size) {
    char err[600];
    bl_context *ctx;
    int shift = a->n_keep != 0;   /* -k 0: no shift, a turn that does not fit is an error */
    if (bl_context_open(m, shift ? a->n_keep : 1, shift, &ctx, err, sizeof err) != BL_OK) {
        fprintf(stderr, "error: %s\n", err);
        return 1;
    }
    const char *dump_path = getenv("BABYLLAMA_DUMP_IDS");
    FILE *dump = dump_path && dump_path[0] ? fopen(dump_path, "w") : NULL;
    if (dump_path && dump_path[0] && !dump) {
        fprintf(stderr, "error: cannot write BABYLLAMA_DUMP_IDS=%s\n", dump_path);
        bl_context_close(ctx);
        return 1;
    }
    float *logits = malloc(sizeof(float) * (size_t)vocab_size);
    char *line = NULL, *system = NULL, *rendered = NULL;
    size_t cap = 0;
    int *ids = NULL, n_ids = 0, pending_eos = 0, rc = BL_OK;
    long pos = 0;   /* positions fed in the whole conversation, run.c's pos */
    uint64_t rng = a->seed;
    if (!logits) { rc = oom(err, sizeof err); goto done; }
    for (int first = 1; a->steps <= 0 || pos < a->steps; first = 0) {
        if (first && a->system) {
            system = strdup(a->system);
        } else if (first) {
            if (!read_line("Enter system prompt (optional): ", &line, &cap)) break;
            system = strdup(line);
        }
        if (first && !system) { rc = oom(err, sizeof err); goto done; }
        const char *user = a->user;
        if (!first || !user) {
            if (!read_line("User: ", &line, &cap)) break;
            user = line;
        }
        free(rendered);
        if (!(rendered = render_turn(first ? system : NULL, user))) {
            rc = oom(err, sizeof err);
            goto done;
        }
        /* the previous reply's EOS, then BOS + the turn: one feed */
        int max_ids = (int)strlen(rendered) * 4 + 4, n_turn = 0;
        free(ids);
        if (!(ids = malloc(sizeof(int) * (size_t)max_ids))) { rc = oom(err, sizeof err); goto done; }
        if (pending_eos) ids[0] = 2;
        rc = bl_encode(tok, rendered, 1, 0, ids + pending_eos, max_ids - pending_eos, &n_turn);
        if (rc != BL_OK) {
            snprintf(err, sizeof err, "%s", bl_tokenizer_error(tok));
            goto done;
        }
        n_ids = n_turn + pending_eos;
        printf("Assistant: ");
        fflush(stdout);
        if ((rc = bl_context_feed(ctx, ids, n_ids, logits)) != BL_OK) {
            snprintf(err, sizeof err, "%s", bl_context_error(ctx));
            goto done;
        }
        dump_ids(dump, ids, n_ids);
        pos += n_ids;
        /* the reply: sample, print, feed, until EOS (or the step limit) */
        Printer pr = {.tok = tok, .prev = ids[n_ids - 1]};
        pending_eos = 0;
        for (;;) {
            int next;
            if ((rc = bl_sample(m, logits, a->temperature, a->topp, &rng, &next)) != BL_OK) {
                snprintf(err, sizeof err, "%s", bl_model_error(m));
                goto done;
            }
            if (next == 2) { pending_eos = 1; break; }
            print_token(next, &pr);
            if (a->steps > 0 && pos >= a->steps) break;
            if ((rc = bl_context_feed(ctx, &next, 1, logits)) != BL_OK) {
                snprintf(err, sizeof err, "%s", bl_context_error(ctx));
                goto done;
            }
            dump_ids(dump, &next, 1);
            pos++;
        }
        printf("\n");
    }
done:
    if (rc != BL_OK) fprintf(stderr, "\nerror: %s\n", err);
    free(ids); free(rendered); free(system); free(line); free(logits);
    if (dump) fclose(dump);
    bl_context_close(ctx);
    return rc == BL_OK ? 0 : 1;
}

/* ---------------------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv) {
    const char *checkpoint = NULL, *tokenizer_path = "tokenizer.bin", *prompt = NULL, *mode = "generate";
    const char *system_prompt = NULL;
    float temperature = 1.0f, topp = 0.9f;
    unsigned long long seed = 0;
    int steps = 256, steps_set = 0, threads = 1, n_keep = 1;
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
        case 'n': steps = (int)strtol(val, &end, 10); steps_set = 1; break;
        case 'T': threads = (int)strtol(val, &end, 10); break;
        case 'i': prompt = val; break;
        case 'z': tokenizer_path = val; break;
        case 'm': mode = val; break;
        case 'y': system_prompt = val; break;
        case 'k': n_keep = (int)strtol(val, &end, 10); break;
        default: usage();
        }
        if (end && *end) { fprintf(stderr, "error: bad value for -%c: %s\n", flag, val); return 2; }
    }
    int is_chat = strcmp(mode, "chat") == 0;
    if (!is_chat && strcmp(mode, "generate") != 0) { fprintf(stderr, "error: unknown mode: %s\n", mode); usage(); }
    if (n_keep < 0) { fprintf(stderr, "error: bad value for -k: %d (0 = no context shift)\n", n_keep); return 2; }
    if (seed == 0) seed = (unsigned long long)time(NULL);
    bl_model *m;
#ifndef _OPENMP
    if (threads > 1) fprintf(stderr, "warning: built without OpenMP: -T %d runs on one thread\n", threads);
#endif
    if (bl_model_open(checkpoint, threads, &m, err, sizeof err) != BL_OK) { fprintf(stderr, "error: %s\n", err); return 1; }
    int32_t cfg[BL_CONFIG_LEN];
    bl_model_config(m, cfg);
    if (is_chat && !steps_set) steps = 0;   /* a conversation runs until stdin ends */
    /* -n 0 is the whole context; past it the context shifts, except with -k 0 (run.c's clamp) */
    if ((!is_chat && steps <= 0) || (n_keep == 0 && (steps <= 0 || steps > cfg[6]))) steps = cfg[6];
    bl_tokenizer *tok;
    if (bl_tokenizer_open(tokenizer_path, cfg[5], &tok, err, sizeof err) != BL_OK) {
        fprintf(stderr, "error: %s\n", err);
        bl_model_close(m);
        return 1;
    }
    if (is_chat) {
        ChatArgs ca = {system_prompt, prompt, steps, n_keep, temperature, topp, seed};
        int chat_rc = chat(m, tok, &ca, cfg[5]);
        bl_tokenizer_close(tok);
        bl_model_close(m);
        return chat_rc;
    }
    if (!prompt) prompt = "";
    int max_tokens = (int)strlen(prompt) * 4 + 3, n_prompt = 0, n_gen = 0;
    int *ids = malloc(sizeof(int) * (size_t)max_tokens);
    int rc = ids ? bl_encode(tok, prompt, 1, 0, ids, max_tokens, &n_prompt) : BL_ERR_NOMEM;
    if (rc != BL_OK) {
        fprintf(stderr, "error: %s\n", ids ? bl_tokenizer_error(tok) : "out of memory");
    } else {
        const char *dump_path = getenv("BABYLLAMA_DUMP_IDS");
        Printer pr = {tok, 1, -1.0, NULL};
        for (int i = 1; i < n_prompt; i++) print_token(ids[i], &pr);
        if (dump_path && dump_path[0] && !(pr.dump = fopen(dump_path, "w"))) {
            fprintf(stderr, "error: cannot write BABYLLAMA_DUMP_IDS=%s\n", dump_path);
            rc = BL_ERR_IO;
            goto end;
        }
        for (int i = 0; pr.dump && i < n_prompt; i++) fprintf(pr.dump, i ? " %d" : "%d", ids[i]);
        if (pr.dump) fprintf(pr.dump, "\n");
        pr.t_first = 0.0;
        double t0 = now_s();
        rc = bl_generate(m, ids, n_prompt, steps, temperature, topp, seed, n_keep, print_token, &pr, &n_gen);
        if (pr.dump) fclose(pr.dump);
        double dt = now_s() - t0;
        printf("\n");
        if (rc != BL_OK) fprintf(stderr, "error: %s: %s\n", checkpoint, bl_model_error(m));
        else if (n_gen > 0) {
            /* llama.cpp-style: prompt (prefill, up to the first new token) and generation apart */
            double tp = pr.t_first - t0, tg = dt - tp;
            fprintf(stderr, "prompt: %d tokens, %f tok/s; generation: %d tokens, %f tok/s\n", n_prompt,
                    n_prompt / tp, n_gen - 1, n_gen > 1 && tg > 0 ? (n_gen - 1) / tg : 0.0);
            fprintf(stderr, "achieved tok/s: %f\n", (n_gen + n_prompt - 1) / dt);
        }
    }
end:
    free(ids);
    bl_tokenizer_close(tok);
    bl_model_close(m);
    return rc == BL_OK ? 0 : 1;
}
