/* model.c: load a llama2.c model file (v0/v1/v2) by mmap, validate it, run the forward pass.
 *
 * The forward pass is llama2.c's run.c (fp32) and runq.c (Q8_0) with the same names: rmsnorm,
 * wq/wk/wv/wo, freqs from the RoPE formula, grouped-query attention over the KV cache, SwiGLU
 * with w1/w2/w3, and the classifier. Every size is checked against the file before a pointer is
 * taken, so a truncated or corrupted file gives an error, never a read past the mapping.
 */
#define _POSIX_C_SOURCE 200809L
#include "model.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAGIC 0x616b3432u
#define HEADER_V1 256
#define MAX_DIM (1 << 20)


const char *bl_model_error(const bl_model *m) { return m ? m->err : "no model"; }

int bl_model_config(const bl_model *m, int32_t *out) {
    if (!m || !out) return BL_ERR_ARG;
    const Config *c = &m->c;
    int32_t v[BL_CONFIG_LEN] = {c->dim, c->hidden_dim, c->n_layers, c->n_heads, c->n_kv_heads,
                                c->vocab_size, c->seq_len, c->version, c->group_size, c->shared};
    memcpy(out, v, sizeof v);
    return BL_OK;
}

int bl_set_threads(bl_model *m, int threads) {
    if (!m || threads < 1) return BL_ERR_ARG;
    m->threads = threads;
    return BL_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* the header, checked field by field; then the payload size against the file size */

static int parse_header(const unsigned char *p, size_t size, Config *c, size_t *header,
                        char *err, size_t errlen) {
    int32_t h[7];
    uint32_t magic = 0;
    if (size < 28) return bl_fail(err, errlen, BL_ERR_FORMAT, "truncated: %zu bytes, a header needs at least 28", size);
    memcpy(&magic, p, 4);
    if (magic == MAGIC) {
        if (size < HEADER_V1) return bl_fail(err, errlen, BL_ERR_FORMAT, "truncated header: %zu bytes, expected %d", size, HEADER_V1);
        memcpy(&c->version, p + 4, 4);
        if (c->version != 1 && c->version != 2)
            return bl_fail(err, errlen, BL_ERR_FORMAT, "offset 4: unsupported version %d, expected 1 or 2", c->version);
        memcpy(h, p + 8, sizeof h);
        c->shared = p[36];
        if (c->shared > 1) return bl_fail(err, errlen, BL_ERR_FORMAT, "offset 36: shared-classifier flag %d, expected 0 or 1", c->shared);
        c->group_size = 0;
        if (c->version == 2) memcpy(&c->group_size, p + 37, 4);
        *header = HEADER_V1;
    } else {
        memcpy(h, p, sizeof h);
        c->version = 0;
        c->group_size = 0;
        c->shared = h[5] > 0;
        if (h[5] < 0 && h[5] != INT32_MIN) h[5] = -h[5];
        *header = 28;
    }
    static const char *names[7] = {"dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len"};
    for (int i = 0; i < 7; i++)
        if (h[i] <= 0 || h[i] > MAX_DIM)
            return bl_fail(err, errlen, BL_ERR_FORMAT, "offset %d: %s = %d is not a plausible value",
                        (c->version ? 8 : 0) + 4 * i, names[i], h[i]);
    c->dim = h[0]; c->hidden_dim = h[1]; c->n_layers = h[2]; c->n_heads = h[3];
    c->n_kv_heads = h[4]; c->vocab_size = h[5]; c->seq_len = h[6];
    if (c->dim % c->n_heads || c->n_heads % c->n_kv_heads || (c->dim / c->n_heads) % 2)
        return bl_fail(err, errlen, BL_ERR_FORMAT, "inconsistent header: dim %d, n_heads %d, n_kv_heads %d",
                    c->dim, c->n_heads, c->n_kv_heads);
    if (c->version == 2 && (c->group_size <= 0 || c->dim % c->group_size || c->hidden_dim % c->group_size))
        return bl_fail(err, errlen, BL_ERR_FORMAT, "offset 37: group size %d does not divide dim %d and hidden_dim %d",
                    c->group_size, c->dim, c->hidden_dim);
    return BL_OK;
}

/* a * b and a + b saturated at SIZE_MAX, which no file can have: each field is at most 2^20,
 * yet 2^20 layers of 2^20 x 2^20 matrices do not fit in 64 bits, and a size that wrapped
 * around could match the file's and take pointers far past the mapping */
static size_t mul_sz(size_t a, size_t b) { return a && b > SIZE_MAX / a ? SIZE_MAX : a * b; }
static size_t add_sz(size_t a, size_t b) { return b > SIZE_MAX - a ? SIZE_MAX : a + b; }

/* bytes of a matrix of n values in this file's format */
static size_t mat_bytes(const Config *c, size_t n) {
    return c->version == 2 ? add_sz(n, mul_sz(4, n / (size_t)c->group_size)) : mul_sz(4, n);
}

/* bytes after the header, or SIZE_MAX when that does not fit in a size_t */
static size_t payload_size(const Config *c) {
    size_t L = c->n_layers, dim = c->dim, hd = c->dim / c->n_heads, kv = c->n_kv_heads * hd;
    size_t hid = c->hidden_dim, V = c->vocab_size;
    size_t norms = mul_sz(4, add_sz(mul_sz(2 * L, dim), dim));
    size_t layer = add_sz(add_sz(mul_sz(mat_bytes(c, mul_sz(dim, dim)), 2), mul_sz(mat_bytes(c, mul_sz(kv, dim)), 2)),
                          mul_sz(mat_bytes(c, mul_sz(hid, dim)), 3));
    size_t emb = mul_sz(mat_bytes(c, mul_sz(V, dim)), c->shared ? 1 : 2);
    size_t rope = c->version == 0 ? mul_sz(8 * (size_t)c->seq_len, hd / 2) : 0;
    return add_sz(add_sz(norms, mul_sz(L, layer)), add_sz(emb, rope));
}

/* the matrices of a v2 file in file order (tok_embeddings, each kind for all layers, output):
 * how many, at most 7 n_layers + 2, with their sizes and names */
typedef struct {
    bl_mat *mat;
    size_t n;
    int layer;           /* -1: not a layer's */
    const char *name;
} MatInfo;

static size_t v2_matrices(bl_model *m, bl_mat *emb, MatInfo *out) {
    const Config *c = &m->c;
    size_t dim = c->dim, kv = (size_t)c->n_kv_heads * (dim / c->n_heads), hid = c->hidden_dim;
    static const char *names[7] = {"wq", "wk", "wv", "wo", "w1", "w2", "w3"};
    const size_t sizes[7] = {dim * dim, kv * dim, kv * dim, dim * dim, hid * dim, dim * hid, hid * dim};
    size_t count = 0;
    out[count++] = (MatInfo){emb, (size_t)c->vocab_size * dim, -1, "tok_embeddings"};
    for (int k = 0; k < 7; k++)
        for (int l = 0; l < c->n_layers; l++) {
            Layer *w = &m->layers[l];
            bl_mat *mats[7] = {&w->wq, &w->wk, &w->wv, &w->wo, &w->w1, &w->w2, &w->w3};
            out[count++] = (MatInfo){mats[k], sizes[k], l, names[k]};
        }
    if (!c->shared) out[count++] = (MatInfo){&m->output, (size_t)c->vocab_size * dim, -1, "output"};
    return count;
}

/* "layers.3.wq" or "tok_embeddings": the name both engines use in their errors */
static void mat_name(char *out, size_t len, const MatInfo *info) {
    if (info->layer >= 0) snprintf(out, len, "layers.%d.%s", info->layer, info->name);
    else snprintf(out, len, "%s", info->name);
}

/* one v2 matrix: no int8 value is -128 and every scale is finite, or an error naming the
 * tensor and the offset of the first bad byte. The writer quantizes to [-127, 127]; -128 is
 * refused because the SIMD kernels' sign trick (simd.h) negates int8 values, and -(-128) does
 * not fit in an int8, so those paths would differ from NumPy. A NaN scale would turn into int8
 * garbage in C and NaN in NumPy. */
static int check_mat(bl_model *m, const MatInfo *info) {
    const unsigned char *map = (const unsigned char *)m->map;
    const unsigned char *q = (const unsigned char *)info->mat->q.q;
    const unsigned char *s = (const unsigned char *)info->mat->q.s;
    char name[48];
    const unsigned char *bad = memchr(q, 0x80, info->n);   /* -128 as a byte */
    if (bad) {
        mat_name(name, sizeof name, info);
        return bl_fail(m->err, sizeof m->err, BL_ERR_FORMAT,
                       "offset %zu: %s holds the int8 value -128, outside the quantized range [-127, 127]",
                       (size_t)(bad - map), name);
    }
    for (size_t g = 0; g < info->n / (size_t)m->c.group_size; g++) {
        float v;
        memcpy(&v, s + 4 * g, 4);
        if (isfinite(v)) continue;
        mat_name(name, sizeof name, info);
        return bl_fail(m->err, sizeof m->err, BL_ERR_FORMAT, "offset %zu: %s has a scale that is not finite (%g)",
                       (size_t)(s + 4 * g - map), name, v);
    }
    return BL_OK;
}

/* v2: every matrix checked (check_mat), in file order so that the first error is the one
 * NumPy reports. The scales sit right after their int8 values, so they are 4-byte aligned
 * only when a matrix's size is a multiple of 4 (not with, e.g., dim 6 and 13 tokens): read
 * with memcpy in check_mat, and when any is misaligned all are copied, aligned, since the
 * kernels load them as floats. */
static int check_quantized(bl_model *m, bl_mat *emb) {
    size_t gs = m->c.group_size, total = 0, count;
    MatInfo *info = malloc((7 * (size_t)m->c.n_layers + 2) * sizeof *info);
    int rc = BL_OK, misaligned = 0;
    if (!info) return bl_fail(m->err, sizeof m->err, BL_ERR_NOMEM, "out of memory");
    count = v2_matrices(m, emb, info);
    for (size_t i = 0; i < count && rc == BL_OK; i++) {
        misaligned |= (uintptr_t)info[i].mat->q.s % sizeof(float) != 0;
        total += info[i].n / gs;
        rc = check_mat(m, &info[i]);
    }
    float *dst = rc == BL_OK && misaligned ? (m->scales = malloc(total * sizeof(float))) : NULL;
    if (rc == BL_OK && misaligned && !dst) rc = bl_fail(m->err, sizeof m->err, BL_ERR_NOMEM, "out of memory");
    for (size_t i = 0; dst && rc == BL_OK && i < count; i++) {
        memcpy(dst, info[i].mat->q.s, info[i].n / gs * sizeof(float));
        info[i].mat->q.s = dst;
        dst += info[i].n / gs;
    }
    free(info);
    return rc;
}

/* take the next tensor of n values from the mapping */
static void take_f32(const unsigned char **p, const float **dst, size_t n) {
    *dst = (const float *)*p;
    *p += 4 * n;
}

static void take_mat(const Config *c, const unsigned char **p, bl_mat *m, size_t n) {
    if (c->version == 2) {
        m->q.q = (const int8_t *)*p;
        m->q.s = (const float *)(*p + n);
        m->f = NULL;
        *p += n + 4 * (n / c->group_size);
    } else {
        take_f32(p, &m->f, n);
    }
}

static int map_weights(bl_model *m) {
    const Config *c = &m->c;
    size_t L = c->n_layers, dim = c->dim, hd = dim / c->n_heads, kv = c->n_kv_heads * hd;
    size_t hid = c->hidden_dim, V = c->vocab_size;
    const unsigned char *p = (const unsigned char *)m->map + (c->version ? HEADER_V1 : 28);
    bl_mat emb = {0};
    m->layers = calloc(L, sizeof(Layer));
    if (!m->layers) return bl_fail(m->err, sizeof m->err, BL_ERR_NOMEM, "out of memory");
    if (c->version == 0) {   /* run.c's order: embeddings, then each kind for all layers */
        take_mat(c, &p, &emb, V * dim);
        for (size_t l = 0; l < L; l++) take_f32(&p, &m->layers[l].attention_norm, dim);
    } else {
        for (size_t l = 0; l < L; l++) take_f32(&p, &m->layers[l].attention_norm, dim);
        for (size_t l = 0; l < L; l++) take_f32(&p, &m->layers[l].ffn_norm, dim);
        take_f32(&p, &m->norm, dim);
        take_mat(c, &p, &emb, V * dim);
    }
    for (size_t l = 0; l < L; l++) take_mat(c, &p, &m->layers[l].wq, dim * dim);
    for (size_t l = 0; l < L; l++) take_mat(c, &p, &m->layers[l].wk, kv * dim);
    for (size_t l = 0; l < L; l++) take_mat(c, &p, &m->layers[l].wv, kv * dim);
    for (size_t l = 0; l < L; l++) take_mat(c, &p, &m->layers[l].wo, dim * dim);
    if (c->version == 0)
        for (size_t l = 0; l < L; l++) take_f32(&p, &m->layers[l].ffn_norm, dim);
    for (size_t l = 0; l < L; l++) take_mat(c, &p, &m->layers[l].w1, hid * dim);
    for (size_t l = 0; l < L; l++) take_mat(c, &p, &m->layers[l].w2, dim * hid);
    for (size_t l = 0; l < L; l++) take_mat(c, &p, &m->layers[l].w3, hid * dim);
    if (c->version == 0) {
        take_f32(&p, &m->norm, dim);
        p += 2 * 4 * (size_t)c->seq_len * (hd / 2);   /* the unused RoPE tables */
    }
    if (c->shared) m->output = emb;
    else take_mat(c, &p, &m->output, V * dim);
    if (c->version == 2) {   /* runq.c keeps an fp32 copy of the embeddings to look rows up */
        int rc = check_quantized(m, &emb);
        if (rc != BL_OK) return rc;
        if (c->shared) m->output = emb;
        m->tok_embeddings = malloc(V * dim * sizeof(float));
        if (!m->tok_embeddings) return bl_fail(m->err, sizeof m->err, BL_ERR_NOMEM, "out of memory");
        m->owns_embeddings = 1;
        size_t gs = c->group_size;
        for (size_t i = 0; i < V * dim; i++) m->tok_embeddings[i] = emb.q.q[i] * emb.q.s[i / gs];
    } else {
        m->tok_embeddings = (float *)emb.f;
    }
    return BL_OK;
}

static int alloc_state(bl_model *m) {
    const Config *c = &m->c;
    size_t kv = (size_t)c->n_kv_heads * (c->dim / c->n_heads);
    size_t big = c->hidden_dim > c->dim ? c->hidden_dim : c->dim;
    m->x = calloc(c->dim, sizeof(float));
    m->xb = calloc(c->dim, sizeof(float));
    m->xb2 = calloc(c->dim, sizeof(float));
    m->hb = calloc(c->hidden_dim, sizeof(float));
    m->hb2 = calloc(c->hidden_dim, sizeof(float));
    m->q = calloc(c->dim, sizeof(float));
    m->k = calloc(kv, sizeof(float));
    m->v = calloc(kv, sizeof(float));
    size_t natt = (size_t)c->n_heads * c->seq_len;
    m->att = calloc(natt > (size_t)c->vocab_size ? natt : (size_t)c->vocab_size, sizeof(double));
    m->qd = calloc(c->dim, sizeof(double));
    m->logits = calloc(c->vocab_size, sizeof(float));
    m->xq_q = calloc(big, 1);
    m->xq_s = calloc(big, sizeof(float));
    m->key_cache = calloc((size_t)c->n_layers * c->seq_len * kv, sizeof(float));
    m->value_cache = calloc((size_t)c->n_layers * c->seq_len * kv, sizeof(float));
    m->probindex = calloc(c->vocab_size, sizeof(ProbIndex));
    m->probs = calloc(c->vocab_size, sizeof(float));
    size_t half = (size_t)(c->dim / c->n_heads) / 2;
    m->freqs_cos = calloc((size_t)c->seq_len * half, sizeof(double));
    m->freqs_sin = calloc((size_t)c->seq_len * half, sizeof(double));
    if (!m->x || !m->xb || !m->xb2 || !m->hb || !m->hb2 || !m->q || !m->k || !m->v || !m->att || !m->qd || !m->logits ||
        !m->xq_q || !m->xq_s || !m->key_cache || !m->value_cache || !m->probindex || !m->probs ||
        !m->freqs_cos || !m->freqs_sin)
        return bl_fail(m->err, sizeof m->err, BL_ERR_NOMEM, "out of memory for the KV cache and activations");
    return BL_OK;
}

/* RoPE's cos and sin of pos * 10000^(-2i/head_size), computed once rather than per token and
 * layer: freqs_cos/sin[pos][i] for i < head_size / 2 */
static void rope_tables(bl_model *m) {
    int head_size = m->c.dim / m->c.n_heads, half = head_size / 2;
    for (int i = 0; i < half; i++) {
        double freq = 1.0 / pow(10000.0, 2 * i / (double)head_size);
        for (int pos = 0; pos < m->c.seq_len; pos++) {
            m->freqs_cos[(size_t)pos * half + i] = cos(pos * freq);
            m->freqs_sin[(size_t)pos * half + i] = sin(pos * freq);
        }
    }
}

int bl_model_open(const char *path, int threads, bl_model **out, char *err, size_t errlen) {
    if (!path || !out) return bl_fail(err, errlen, BL_ERR_ARG, "null argument");
    *out = NULL;
    /* non-blocking, so that opening a FIFO returns at once; then only a regular file is read */
    int fd = open(path, O_RDONLY | O_NONBLOCK);
    if (fd < 0) return bl_fail(err, errlen, BL_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return bl_fail(err, errlen, BL_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return bl_fail(err, errlen, BL_ERR_IO, "%s: not a regular file (%s)", path,
                       S_ISDIR(st.st_mode) ? "a directory" : S_ISFIFO(st.st_mode) ? "a FIFO" : "a device or socket");
    }
    size_t size = (size_t)st.st_size;
    unsigned char head[HEADER_V1] = {0};
    ssize_t got = pread(fd, head, sizeof head, 0);
    Config c;
    size_t header = 0;
    char msg[400];
    int rc = parse_header(head, got < 0 ? 0 : (size_t)got, &c, &header, msg, sizeof msg);
    if (rc == BL_OK) {
        size_t want = add_sz(header, payload_size(&c));
        if (want == SIZE_MAX)
            rc = bl_fail(msg, sizeof msg, BL_ERR_FORMAT, "the header describes a file of more than %zu bytes (v%d), but the file has %zu bytes",
                      want, c.version, size);
        else if (want != size)
            rc = bl_fail(msg, sizeof msg, BL_ERR_FORMAT, "the header describes a %zu-byte file (v%d), but the file has %zu bytes%s",
                      want, c.version, size, size < want ? " (truncated?)" : "");
    }
    if (rc != BL_OK) {
        close(fd);
        return bl_fail(err, errlen, rc, "%s: %s", path, msg);
    }
    void *map = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return bl_fail(err, errlen, BL_ERR_IO, "%s: mmap failed: %s", path, strerror(errno));
    bl_model *m = calloc(1, sizeof *m);
    if (!m) {
        munmap(map, size);
        return bl_fail(err, errlen, BL_ERR_NOMEM, "out of memory");
    }
    m->c = c;
    m->map = map;
    m->map_size = size;
    m->threads = threads > 0 ? threads : 1;
    if ((rc = map_weights(m)) != BL_OK || (rc = alloc_state(m)) != BL_OK) {
        bl_fail(err, errlen, rc, "%s: %s", path, m->err);
        bl_model_close(m);
        return rc;
    }
    rope_tables(m);
    *out = m;
    return BL_OK;
}

void bl_model_close(bl_model *m) {
    if (!m) return;
    if (m->owns_embeddings) free(m->tok_embeddings);
    free(m->scales);
    free(m->layers);
    free(m->x); free(m->xb); free(m->xb2); free(m->hb); free(m->hb2); free(m->q); free(m->k); free(m->v); free(m->att); free(m->qd);
    free(m->logits); free(m->xq_q); free(m->xq_s); free(m->key_cache); free(m->value_cache);
    free(m->probindex); free(m->probs); free(m->freqs_cos); free(m->freqs_sin);
    if (m->map) munmap(m->map, m->map_size);
    free(m);
}

int bl_reset(bl_model *m) {
    if (!m) return BL_ERR_ARG;
    size_t n = (size_t)m->c.n_layers * m->c.seq_len * m->c.n_kv_heads * (m->c.dim / m->c.n_heads);
    memset(m->key_cache, 0, n * sizeof(float));
    memset(m->value_cache, 0, n * sizeof(float));
    return BL_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* the forward pass */


/* probs (vocab_size,) = softmax(logits / temperature), in double and stored as float. The
 * sampler does this every token while the other threads would wait, so they share it: the
 * vocabulary is cut into a fixed number of chunks (not one per thread) and the chunks' maxima
 * and sums are combined in chunk order, so the result is the same with any thread count. */
#define SOFTMAX_CHUNKS 8
static void chunk(int c, int n, int *lo, int *hi) {   /* chunk c of [0, n) */
    int len = (n + SOFTMAX_CHUNKS - 1) / SOFTMAX_CHUNKS;
    *lo = c * len < n ? c * len : n;
    *hi = *lo + len < n ? *lo + len : n;
}

static void softmax_probs(bl_model *m, const float *logits, float temperature, float *probs) {
    int n = m->c.vocab_size;
    double *pd = m->att;   /* scratch of at least vocab_size doubles, see alloc_state */
    double cmax[SOFTMAX_CHUNKS], csum[SOFTMAX_CHUNKS];
#pragma omp parallel num_threads(m->threads) if (n >= 1 << 13)
    {
        int c, lo, hi;
#pragma omp for schedule(static)
        for (c = 0; c < SOFTMAX_CHUNKS; c++) {
            chunk(c, n, &lo, &hi);
            for (int i = lo; i < hi; i++) pd[i] = logits[i] / temperature;
            cmax[c] = hi > lo ? max_d(pd + lo, hi - lo) : -INFINITY;
        }
        double max = cmax[0];
        for (c = 1; c < SOFTMAX_CHUNKS; c++) max = cmax[c] > max ? cmax[c] : max;
#pragma omp for schedule(static)
        for (c = 0; c < SOFTMAX_CHUNKS; c++) {
            chunk(c, n, &lo, &hi);
            csum[c] = hi > lo ? exp_sum_d(pd + lo, hi - lo, max) : 0.0;
        }
        double sum = 0.0;
        for (c = 0; c < SOFTMAX_CHUNKS; c++) sum += csum[c];
#pragma omp for schedule(static)
        for (c = 0; c < SOFTMAX_CHUNKS; c++) {
            chunk(c, n, &lo, &hi);
            for (int i = lo; i < hi; i++) probs[i] = (float)(pd[i] / sum);
        }
    }
}

/* out[k] (d[k],) = W[k] (d[k], n) @ x (n,) for k < count: fp32, or quantize x then Q8_0 */
static void matmuls(bl_model *m, int threads, const float *x, int n, int count,
                    float *const out[], const bl_mat *const w[], const int d[]) {
    bl_matvec jobs[3];
    for (int k = 0; k < count; k++) jobs[k] = (bl_matvec){out[k], w[k], d[k]};
    if (w[0]->f) {
        bl_matmuls_f32(jobs, count, x, n, threads);
    } else {
        bl_quantize(m->xq_q, m->xq_s, x, n, m->c.group_size);
        bl_qtensor xq = {m->xq_q, m->xq_s};
        bl_matmuls_q80(jobs, count, &xq, n, m->c.group_size, threads);
    }
}

static void matmul(bl_model *m, int threads, float *xout, const float *x, const bl_mat *w, int n,
                   int d) {
    matmuls(m, threads, x, n, 1, (float *const[]){xout}, (const bl_mat *const[]){w}, (const int[]){d});
}

int bl_forward(bl_model *m, int token, int pos, float *out) {
    if (!m) return BL_ERR_ARG;
    const Config *c = &m->c;
    if (token < 0 || token >= c->vocab_size)
        return bl_fail(m->err, sizeof m->err, BL_ERR_ARG, "token id %d outside the vocabulary [0, %d)", token, c->vocab_size);
    if (pos < 0 || pos >= c->seq_len)
        return bl_fail(m->err, sizeof m->err, BL_ERR_ARG, "position %d outside the context [0, %d)", pos, c->seq_len);
    int dim = c->dim, hidden_dim = c->hidden_dim, head_size = dim / c->n_heads;
    int kv_dim = c->n_kv_heads * head_size, kv_mul = c->n_heads / c->n_kv_heads;
    int threads = work_threads(m, 1);
    float *x = m->x;
    memcpy(x, m->tok_embeddings + (size_t)token * dim, dim * sizeof(float));

    for (int l = 0; l < c->n_layers; l++) {
        const Layer *w = &m->layers[l];
        float *k = m->k, *v = m->v;

        rmsnorm(m->xb, x, w->attention_norm, dim);
        matmuls(m, threads, m->xb, dim, 3, (float *const[]){m->q, k, v},
                (const bl_mat *const[]){&w->wq, &w->wk, &w->wv}, (const int[]){dim, kv_dim, kv_dim});

        /* RoPE on q and k at pos */
        const double *fcos = m->freqs_cos + (size_t)pos * (head_size / 2);
        const double *fsin = m->freqs_sin + (size_t)pos * (head_size / 2);
        rope(m->q, dim, head_size, fcos, fsin);
        rope(k, kv_dim, head_size, fcos, fsin);

        /* into the cache: each KV head keeps its positions together, so attention reads one
         * contiguous run of pos * head_size floats per head instead of strided rows */
        size_t hstride = (size_t)c->seq_len * head_size;   /* one KV head of one layer */
        float *kcache = m->key_cache + (size_t)l * c->n_kv_heads * hstride;
        float *vcache = m->value_cache + (size_t)l * c->n_kv_heads * hstride;
        for (int g = 0; g < c->n_kv_heads; g++) {
            memcpy(kcache + g * hstride + (size_t)pos * head_size, k + g * head_size, head_size * sizeof(float));
            memcpy(vcache + g * hstride + (size_t)pos * head_size, v + g * head_size, head_size * sizeof(float));
        }

        /* attention: each query head h reads KV head h / kv_mul at positions 0..pos */
        int h;
#pragma omp parallel for private(h) num_threads(threads) if ((long)(pos + 1) * dim >= 1 << 13)
        for (h = 0; h < c->n_heads; h++) {
            const float *q = m->q + h * head_size;
            const float *kh = kcache + (h / kv_mul) * hstride, *vh = vcache + (h / kv_mul) * hstride;
            double *att = m->att + (size_t)h * c->seq_len;
            attend(m->xb + h * head_size, q, kh, vh, pos, head_size, att, m->qd + h * head_size);
        }
        matmul(m, threads, m->xb2, m->xb, &w->wo, dim, dim);
        for (int i = 0; i < dim; i++) x[i] += m->xb2[i];

        /* SwiGLU feed-forward: w2(silu(w1 x) * w3 x) */
        rmsnorm(m->xb, x, w->ffn_norm, dim);
        matmuls(m, threads, m->xb, dim, 2, (float *const[]){m->hb, m->hb2},
                (const bl_mat *const[]){&w->w1, &w->w3}, (const int[]){hidden_dim, hidden_dim});
        silu_mul(m->hb, m->hb2, hidden_dim);
        matmul(m, threads, m->xb, m->hb, &w->w2, hidden_dim, dim);
        for (int i = 0; i < dim; i++) x[i] += m->xb[i];
    }
    rmsnorm(x, x, m->norm, dim);
    matmul(m, threads, out ? out : m->logits, x, &m->output, dim, c->vocab_size);
    return BL_OK;
}

/* ---------------------------------------------------------------------------------------- */
/* run.c's sampler */

uint32_t bl_random_u32(uint64_t *state) {
    *state ^= *state >> 12;
    *state ^= *state << 25;
    *state ^= *state >> 27;
    return (uint32_t)((*state * 0x2545F4914F6CDD1Dull) >> 32);
}

float bl_random_f32(uint64_t *state) { return (bl_random_u32(state) >> 8) / 16777216.0f; }

/* descending probability; ties by lower id, so the order is total and matches NumPy's */
static int compare_prob(const void *a, const void *b) {
    const ProbIndex *x = a, *y = b;
    if (x->prob > y->prob) return -1;
    if (x->prob < y->prob) return 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* the first of the largest values of x (n,): the greedy choice */
static int argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++) if (x[i] > x[best]) best = i;
    return best;
}

static int sample_topp(const float *probs, int n, float topp, ProbIndex *pi, float coin) {
    if (n == 1) return 0;
    const float cutoff = (1.0f - topp) / (n - 1);   /* below it a token cannot be in the nucleus */
    int n0 = 0;
    for (int i = 0; i < n; i++)
        if (probs[i] >= cutoff) { pi[n0].index = i; pi[n0].prob = probs[i]; n0++; }
    /* none: then topp < 1/n <= the top probability, and the top token alone is the nucleus */
    if (n0 == 0) return argmax(probs, n);
    qsort(pi, n0, sizeof(ProbIndex), compare_prob);
    float cumulative = 0.0f;
    int last = n0 - 1;
    for (int i = 0; i < n0; i++) {
        cumulative += pi[i].prob;
        if (cumulative > topp) { last = i; break; }
    }
    float r = coin * cumulative, cdf = 0.0f;
    for (int i = 0; i <= last; i++) {
        cdf += pi[i].prob;
        if (r < cdf) return pi[i].index;
    }
    return pi[last].index;
}

int bl_sample(bl_model *m, const float *logits, float temperature, float topp,
              uint64_t *rng_state, int *token) {
    if (!m || !logits || !rng_state || !token) return BL_ERR_ARG;
    int n = m->c.vocab_size;
    if (!(temperature >= 0.0f)) return bl_fail(m->err, sizeof m->err, BL_ERR_ARG, "temperature must be >= 0, got %g", temperature);
    if (!(topp > 0.0f && topp <= 1.0f)) return bl_fail(m->err, sizeof m->err, BL_ERR_ARG, "topp must be in (0, 1], got %g", topp);
    float amax = 0.0f;   /* the largest |logit|, and no NaN or infinity among them */
    for (int i = 0; i < n; i++) {
        if (!isfinite(logits[i]))
            return bl_fail(m->err, sizeof m->err, BL_ERR_NONFINITE, "logit of token %d is %g, not finite: NaN or infinite weights or activations",
                           i, logits[i]);
        amax = fabsf(logits[i]) > amax ? fabsf(logits[i]) : amax;
    }
    /* a temperature so small that logits / temperature overflows is greedy, its limit */
    if (temperature == 0.0f || !isfinite(amax / temperature)) {
        *token = argmax(logits, n);
        return BL_OK;
    }
    float *probs = m->probs;
    softmax_probs(m, logits, temperature, probs);
    float coin = bl_random_f32(rng_state);
    if (topp >= 1.0f) {
        float cdf = 0.0f;
        *token = n - 1;
        for (int i = 0; i < n; i++) {
            cdf += probs[i];
            if (coin < cdf) { *token = i; break; }
        }
    } else {
        *token = sample_topp(probs, n, topp, m->probindex, coin);
    }
    return BL_OK;
}

int bl_forward_sample(bl_model *m, int token, int pos, float temperature, float topp,
                      uint64_t *rng_state, int *next) {
    int rc = bl_forward(m, token, pos, m->logits);
    return rc != BL_OK ? rc : bl_sample(m, m->logits, temperature, topp, rng_state, next);
}
