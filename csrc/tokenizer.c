/* tokenizer.c: llama2.c's tokenizer.bin, BPE encoding and decoding (as run.c, and as our
 * pure-Python Tokenizer: the same pieces take part in merges, the same ties win).
 *
 * tokenizer.bin: int32 max_token_length, then per token: float32 score, int32 length, bytes.
 */
#define _POSIX_C_SOURCE 200809L
#include "babyllama.h"
#include "kernels.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_FILE_BYTES (1 << 30)   /* a plausible tokenizer.bin: Llama 2's is 434 KB */

typedef struct {
    const char *str;
    int id;
} TokenIndex;

struct bl_tokenizer {
    int vocab_size, max_token_length, byte_fallback;
    char **vocab;            /* NUL-terminated pieces */
    int *lengths;
    float *scores;
    TokenIndex *sorted;      /* mergeable pieces, sorted for bsearch */
    int n_sorted;
    unsigned char byte_pieces[256][2];
    char *buf;               /* scratch for merges */
    char err[512];
};

const char *bl_tokenizer_error(const bl_tokenizer *t) { return t ? t->err : "no tokenizer"; }
int bl_tokenizer_vocab_size(const bl_tokenizer *t) { return t ? t->vocab_size : -1; }

static int compare_tokens(const void *a, const void *b) {
    return strcmp(((const TokenIndex *)a)->str, ((const TokenIndex *)b)->str);
}

void bl_tokenizer_close(bl_tokenizer *t) {
    if (!t) return;
    if (t->vocab)
        for (int i = 0; i < t->vocab_size; i++) free(t->vocab[i]);
    free(t->vocab); free(t->lengths); free(t->scores); free(t->sorted); free(t->buf);
    free(t);
}

/* the whole file into *data (*size bytes): open without blocking (a FIFO), then read only
 * a regular file of plausible size, to its size as fstat tells it */
static int read_file(const char *path, unsigned char **data, size_t *size, char *err, size_t errlen) {
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return bl_fail(err, errlen, BL_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    int rc = BL_OK;
    if (fstat(fd, &st) != 0) rc = bl_fail(err, errlen, BL_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    else if (!S_ISREG(st.st_mode))
        rc = bl_fail(err, errlen, BL_ERR_IO, "%s: not a regular file (%s)", path,
                     S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket");
    else if (st.st_size < 4)
        rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: truncated: %lld bytes, expected at least a 4-byte header", path, (long long)st.st_size);
    else if (st.st_size > MAX_FILE_BYTES)
        rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: %lld bytes is too large for a tokenizer.bin (at most %d)", path, (long long)st.st_size, MAX_FILE_BYTES);
    *size = rc == BL_OK ? (size_t)st.st_size : 0;
    *data = rc == BL_OK ? malloc(*size) : NULL;
    if (rc == BL_OK && !*data) rc = bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory");
    for (size_t got = 0; rc == BL_OK && got < *size;) {
        ssize_t r = read(fd, *data + got, *size - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) rc = bl_fail(err, errlen, BL_ERR_IO, "%s: read failed after %zu bytes: %s", path, got, r < 0 ? strerror(errno) : "the file shrank");
        else got += (size_t)r;
    }
    close(fd);
    if (rc != BL_OK) { free(*data); *data = NULL; }
    return rc;
}

/* vocab_size <= 0: read records up to the end of the file */
int bl_tokenizer_open(const char *path, int vocab_size, bl_tokenizer **out, char *err, size_t errlen) {
    if (!path || !out) return bl_fail(err, errlen, BL_ERR_ARG, "null argument");
    *out = NULL;
    unsigned char *data = NULL;
    size_t size = 0, off = 4;
    int rc = read_file(path, &data, &size, err, errlen);
    if (rc != BL_OK) return rc;
    int32_t max_len;
    memcpy(&max_len, data, 4);
    bl_tokenizer *t = calloc(1, sizeof *t);
    if (!t) { free(data); return bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory"); }
    if (max_len <= 0 || max_len > (1 << 16)) {
        rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: offset 0: max_token_length %d is not plausible", path, max_len);
        goto done;
    }
    t->max_token_length = max_len;
    int cap = vocab_size > 0 ? vocab_size : 1024, n = 0, longest = 0;
    t->vocab = calloc(cap, sizeof(char *));
    t->lengths = calloc(cap, sizeof(int));
    t->scores = calloc(cap, sizeof(float));
    if (!t->vocab || !t->lengths || !t->scores) { rc = bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory"); goto done; }
    while (off < size && (vocab_size <= 0 || n < vocab_size)) {
        float score;
        int32_t len;
        if (off + 8 > size) {
            rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: offset %zu: truncated record header for token %d (need 8 bytes, have %zu)", path, off, n, size - off);
            goto done;
        }
        memcpy(&score, data + off, 4);
        memcpy(&len, data + off + 4, 4);
        if (len < 0 || len > max_len) {
            rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: offset %zu: token %d has length %d, expected 0..%d", path, off + 4, n, len, max_len);
            goto done;
        }
        if (score != score) {
            rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: offset %zu: token %d has a NaN score", path, off, n);
            goto done;
        }
        if (off + 8 + (size_t)len > size) {
            rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: offset %zu: token %d needs %d bytes, only %zu left", path, off + 8, n, len, size - off - 8);
            goto done;
        }
        if (n == cap) {
            cap *= 2;
            char **v = realloc(t->vocab, cap * sizeof(char *));
            if (v) t->vocab = v;
            int *l = realloc(t->lengths, cap * sizeof(int));
            if (l) t->lengths = l;
            float *s = realloc(t->scores, cap * sizeof(float));
            if (s) t->scores = s;
            if (!v || !l || !s) { t->vocab_size = n; rc = bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory"); goto done; }
        }
        t->vocab[n] = malloc((size_t)len + 1);
        if (!t->vocab[n]) { t->vocab_size = n; rc = bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory"); goto done; }
        memcpy(t->vocab[n], data + off + 8, len);
        t->vocab[n][len] = '\0';
        t->lengths[n] = len;
        longest = len > longest ? len : longest;
        t->scores[n] = score;
        n++;
        t->vocab_size = n;
        off += 8 + (size_t)len;
    }
    if (vocab_size > 0 && n < vocab_size) {
        rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: has %d tokens, expected %d", path, n, vocab_size);
        goto done;
    }
    if (n < 3) { rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: has only %d tokens", path, n); goto done; }
    /* every exporter writes the longest piece's length: a file cut at a record boundary
     * usually lost that piece, and would otherwise pass for a smaller vocabulary */
    if (longest != max_len) {
        rc = bl_fail(err, errlen, BL_ERR_FORMAT, "%s: offset 0: max_token_length %d, but the longest of the %d pieces has %d bytes (truncated?)",
                     path, max_len, n, longest);
        goto done;
    }
    /* byte fallback: <0x00>..<0xFF> at ids 3..258, as sentencepiece lays them out */
    t->byte_fallback = n >= 259;
    for (int b = 0; b < 256 && t->byte_fallback; b++) {
        char want[8];
        snprintf(want, sizeof want, "<0x%02X>", b);
        if (strcmp(t->vocab[3 + b], want) != 0) t->byte_fallback = 0;
    }
    for (int b = 0; b < 256; b++) { t->byte_pieces[b][0] = (unsigned char)b; t->byte_pieces[b][1] = 0; }
    /* only normal pieces take part in merges: never <unk>, <s>, </s> or a byte piece;
     * a piece with an embedded NUL cannot be matched by C strings and is left out too */
    int first = t->byte_fallback ? 259 : 3;
    t->sorted = malloc(sizeof(TokenIndex) * (size_t)(n > first ? n - first : 1));
    t->buf = malloc((size_t)max_len * 2 + 8);
    if (!t->sorted || !t->buf) { rc = bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory"); goto done; }
    for (int i = first; i < n; i++) {
        if ((int)strlen(t->vocab[i]) != t->lengths[i]) continue;
        t->sorted[t->n_sorted].str = t->vocab[i];
        t->sorted[t->n_sorted].id = i;
        t->n_sorted++;
    }
    qsort(t->sorted, t->n_sorted, sizeof(TokenIndex), compare_tokens);
    /* the first id wins for duplicate strings (as Python's dict.setdefault) */
    int w = 0;
    for (int i = 0; i < t->n_sorted; i++) {
        if (w > 0 && strcmp(t->sorted[w - 1].str, t->sorted[i].str) == 0) {
            if (t->sorted[i].id < t->sorted[w - 1].id) t->sorted[w - 1] = t->sorted[i];
            continue;
        }
        t->sorted[w++] = t->sorted[i];
    }
    t->n_sorted = w;
done:
    free(data);
    if (rc != BL_OK) { bl_tokenizer_close(t); return rc; }
    *out = t;
    return BL_OK;
}

static int lookup(const bl_tokenizer *t, const char *str) {
    TokenIndex key = {str, 0};
    const TokenIndex *res = bsearch(&key, t->sorted, t->n_sorted, sizeof(TokenIndex), compare_tokens);
    return res ? res->id : -1;
}

int bl_encode(bl_tokenizer *t, const char *text, int bos, int eos, int *tokens, int max_tokens, int *n_tokens) {
    if (!t || !text || !tokens || !n_tokens) return BL_ERR_ARG;
    int n = 0;
    size_t tlen = strlen(text);
    /* worst case: BOS + the prefix space + 4 bytes per character + EOS */
    size_t need = 3 + 4 * tlen;
    int *sym = malloc(sizeof(int) * (need + 1));
    if (!sym) return bl_fail(t->err, sizeof t->err, BL_ERR_NOMEM, "out of memory");
    char cp[8];
    size_t cl = 0;
    /* the dummy prefix: sentencepiece starts non-empty text with a space */
    const char *p = text;
    int prefix = tlen > 0;
    while (prefix || *p) {
        /* U+2581 is sentencepiece's own spelling of a space: encode it as one */
        if (prefix) { cp[0] = ' '; cl = 1; prefix = 0; }
        else if ((unsigned char)p[0] == 0xE2 && (unsigned char)p[1] == 0x96 && (unsigned char)p[2] == 0x81) { cp[0] = ' '; cl = 1; p += 3; }
        else {
            cl = 0;
            cp[cl++] = *p++;
            while ((*p & 0xC0) == 0x80 && cl < 4) cp[cl++] = *p++;   /* continuation bytes */
        }
        cp[cl] = '\0';
        int id = lookup(t, cp);
        if (id != -1) sym[n++] = id;
        else if (t->byte_fallback)
            for (size_t i = 0; i < cl; i++) sym[n++] = (unsigned char)cp[i] + 3;
        else sym[n++] = 0;
    }
    /* merge the best-scoring adjacent pair until none is in the vocabulary; ties: leftmost */
    for (;;) {
        float best = 0.0f;   /* any score wins the first time, -inf included (as in Python) */
        int best_id = -1, best_idx = -1;
        for (int i = 0; i + 1 < n; i++) {
            int a = sym[i], b = sym[i + 1];
            if ((t->byte_fallback && (a < 259 || b < 259)) || a < 3 || b < 3) continue;
            size_t la = t->lengths[a], lb = t->lengths[b];
            if ((int)(la + lb) > t->max_token_length) continue;
            memcpy(t->buf, t->vocab[a], la);
            memcpy(t->buf + la, t->vocab[b], lb);
            t->buf[la + lb] = '\0';
            int id = lookup(t, t->buf);
            if (id != -1 && (best_idx == -1 || t->scores[id] > best)) { best = t->scores[id]; best_id = id; best_idx = i; }
        }
        if (best_idx == -1) break;
        sym[best_idx] = best_id;
        memmove(sym + best_idx + 1, sym + best_idx + 2, sizeof(int) * (n - best_idx - 2));
        n--;
    }
    int total = n + (bos ? 1 : 0) + (eos ? 1 : 0);
    if (total > max_tokens) {
        free(sym);
        *n_tokens = total;
        return bl_fail(t->err, sizeof t->err, BL_ERR_ARG, "text encodes to %d tokens, more than the %d allowed", total, max_tokens);
    }
    int k = 0;
    if (bos) tokens[k++] = 1;
    for (int i = 0; i < n; i++) tokens[k++] = sym[i];
    if (eos) tokens[k++] = 2;
    *n_tokens = k;
    free(sym);
    return BL_OK;
}

int bl_decode(const bl_tokenizer *t, int prev, int token, const char **piece, size_t *len) {
    if (!t || !piece || !len) return BL_ERR_ARG;
    if (token < 0 || token >= t->vocab_size) return BL_ERR_ARG;
    if (token == 1 || token == 2) { *piece = ""; *len = 0; return BL_OK; }
    const char *s = t->vocab[token];
    size_t n = t->lengths[token];
    if (prev == 1 && n > 0 && s[0] == ' ') { s++; n--; }   /* no dummy-prefix space after BOS */
    if (t->byte_fallback && token >= 3 && token < 259) {   /* <0xXX>: the raw byte */
        *piece = (const char *)t->byte_pieces[token - 3];
        *len = 1;
        return BL_OK;
    }
    *piece = s;
    *len = n;
    return BL_OK;
}
