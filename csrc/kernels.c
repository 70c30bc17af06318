/* kernels.c: matrix-vector (decode) and matrix-matrix (prefill) products for fp32 and Q8_0,
 * the ~90% of inference time. The SIMD path is chosen in simd.h.
 *
 * Rows are split across OpenMP threads (serial when built without OpenMP). Inside a row:
 * - fp32: AVX2/FMA or NEON intrinsics with several accumulators (independent chains hide the
 *   FMA latency), four rows at a time so each load of x serves four rows; a portable loop
 *   otherwise.
 * - Q8_0: exact int32 dot products per group (SIMD widening multiply-add), then the groups are
 *   added in order as val += ival * w_scale * x_scale, the same float operations as runq.c and
 *   our NumPy engine (the build turns off FMA contraction so the order is kept exactly).
 */
#include "kernels.h"
#include "simd.h"

#include <math.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

/* below this many multiply-adds a matmul runs on one thread: forking costs more than it saves */
#define BL_PARALLEL_MIN (1 << 16)

#if defined(BL_AVX2)
static inline float hsum256(__m256 v) {
    __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
    lo = _mm_add_ps(lo, hi);
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
    return _mm_cvtss_f32(lo);
}
#endif

/* dot products of 4 rows with x. The next 4 rows (16n bytes, right after w3) are prefetched
 * two cache lines per step, so they arrive while these are summed: the weights stream from
 * DRAM, and with short rows (288 floats in stories15M) the hardware prefetcher alone leaves
 * a single thread waiting at every new block (measured: 10 -> 11-12 GB/s on one core). */
static void dot4_f32(float *out, const float *x, const float *w0, const float *w1,
                     const float *w2, const float *w3, int n) {
    int j = 0;
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    uintptr_t next = (uintptr_t)(w3 + n);   /* integer math: a prefetch past the end never faults */
#if defined(BL_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) {
        __builtin_prefetch((const void *)(next + 16 * (uintptr_t)j), 0, 3);   /* 8 x 4 floats */
        __builtin_prefetch((const void *)(next + 16 * (uintptr_t)j + 64), 0, 3);
        __m256 xv = _mm256_loadu_ps(x + j);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + j), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + j), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + j), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + j), xv, a3);
    }
    s0 = hsum256(a0); s1 = hsum256(a1); s2 = hsum256(a2); s3 = hsum256(a3);
#elif defined(BL_NEON)
    float32x4_t a0 = vdupq_n_f32(0), a1 = vdupq_n_f32(0), a2 = vdupq_n_f32(0), a3 = vdupq_n_f32(0);
    for (; j + 4 <= n; j += 4) {
        __builtin_prefetch((const void *)(next + 16 * (uintptr_t)j), 0, 3);   /* 4 x 4 floats */
        float32x4_t xv = vld1q_f32(x + j);
        a0 = vfmaq_f32(a0, vld1q_f32(w0 + j), xv);
        a1 = vfmaq_f32(a1, vld1q_f32(w1 + j), xv);
        a2 = vfmaq_f32(a2, vld1q_f32(w2 + j), xv);
        a3 = vfmaq_f32(a3, vld1q_f32(w3 + j), xv);
    }
    s0 = vaddvq_f32(a0); s1 = vaddvq_f32(a1); s2 = vaddvq_f32(a2); s3 = vaddvq_f32(a3);
#else
    (void)next;
#endif
    for (; j < n; j++) {
        s0 += w0[j] * x[j]; s1 += w1[j] * x[j]; s2 += w2[j] * x[j]; s3 += w3[j] * x[j];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static float dot1_f32(const float *x, const float *w, int n) {
    int j = 0;
    float s = 0.0f;
#if defined(BL_AVX2)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; j + 16 <= n; j += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8), a1);
    }
    s = hsum256(_mm256_add_ps(a0, a1));
#endif
    for (; j < n; j++) s += w[j] * x[j];
    return s;
}

/* rows [4b, 4b + 4) of out = w @ x, fewer at the end of a matrix */
static void rows4_f32(float *out, const float *x, const float *w, int n, int d, int b) {
    const float *wb = w + (size_t)4 * b * n;
    if (4 * b + 4 <= d) {
        dot4_f32(out + 4 * b, x, wb, wb + n, wb + 2 * (size_t)n, wb + 3 * (size_t)n, n);
        return;
    }
    for (int i = 4 * b; i < d; i++) out[i] = dot1_f32(x, w + (size_t)i * n, n);
}

/* the multiply-adds of a batch, plus `per_row` more for each row's fixed costs */
static long batch_work(const bl_matvec *jobs, int njobs, int n, int per_row) {
    long work = 0;
    for (int k = 0; k < njobs; k++) work += (long)jobs[k].d * (n + per_row);
    return work;
}

/* Each thread takes the same share of every matrix (schedule static) and goes on to the next
 * matrix without waiting (nowait): the threads meet once, at the end of the region. */
void bl_matmuls_f32(const bl_matvec *jobs, int njobs, const float *x, int n, int threads) {
    long work = batch_work(jobs, njobs, n, 0);
    (void)threads, (void)work;   /* unused without OpenMP */
#pragma omp parallel num_threads(threads) if (work >= BL_PARALLEL_MIN)
    for (int k = 0; k < njobs; k++) {
        const bl_matvec *j = &jobs[k];
        int nblocks = (j->d + 3) / 4, b;
#pragma omp for schedule(static) nowait
        for (b = 0; b < nblocks; b++) rows4_f32(j->out, x, j->w->f, n, j->d, b);
    }
}

void bl_matmul_f32(float *xout, const float *x, const float *w, int n, int d, int threads) {
    bl_mat mat = {w, {NULL, NULL}};
    bl_matvec job = {xout, &mat, d};
    bl_matmuls_f32(&job, 1, x, n, threads);
}

void bl_matmuls_q80(const bl_matvec *jobs, int njobs, const bl_qtensor *x, int n, int gs,
                    int threads) {
    int ngroups = n / gs;
    /* each group adds a scaled float sum on top of its int8 products: with small groups
     * (stories260K's are 4 wide) that dominates, and a small matrix is worth the threads */
    long work = batch_work(jobs, njobs, n, 16 * ngroups);
    (void)threads, (void)work;
#pragma omp parallel num_threads(threads) if (work >= BL_PARALLEL_MIN)
    for (int k = 0; k < njobs; k++) {
        const bl_matvec *j = &jobs[k];
        const bl_qtensor *w = &j->w->q;
        int i;
#pragma omp for schedule(static) nowait
        for (i = 0; i < j->d; i++) {
            j->out[i] = qdot(x->q, x->s, w->q + (size_t)i * n, w->s + (size_t)i * ngroups, ngroups, gs);
        }
    }
}

/* ---------------------------------------------------------------------------------------- */
/* matrix-matrix products for a batch of T tokens (prefill): out (T, d) = x (T, n) @ W^T.
 * A matvec reads every weight once per token from DRAM; here a panel of rows is read once and
 * kept in L2 while all T tokens pass over it (and the next panel is prefetched meanwhile), and
 * inside a panel a tile of rows x tokens keeps its sums in registers, so each loaded weight
 * vector serves several tokens and each loaded x vector several rows. fp32 on AMD Zen 3 (one
 * core, FMA peak ~120 GFLOPS): the tile, K blocks, prefetch and 32-row panels below took the
 * products of stories110M's shape from ~47 to ~55-70 GFLOPS, and a 256-token prefill x1.32 on
 * stories110M's shape and x1.20 on stories15M's (median of 5 interleaved pairs, CPU time,
 * one thread); quiet, that is 1.10x llama.cpp's prefill on one thread and 1.00x on two
 * (bench/bench_engines.py). (Q8_0 on AVX2/VNNI goes the other way
 * round: a block of 8 rows, repacked, stays in L1 while the tokens stream past it from L2; see
 * tile8_q80.) A tile at the edge of the tokens or rows repeats one of them (its extra results
 * are not stored). Each (row, token) sum runs in the same order as in the matvec (fp32: one
 * 8-lane accumulator, then the scalar tail; Q8_0: qdot's), so a token's logits are the same
 * bits either way. */

/* rows of a panel: about `bytes` of weights (64 KB), a multiple of 4 (so the matvec's 4-row
 * blocks and its last d % 4 rows, done one by one, fall the same way in a panel) */
static int panel_rows(int n, int bytes_per_value, int bytes) {
    int rows = (bytes / bytes_per_value / (n > 0 ? n : 1)) & ~3;
    return rows < 4 ? 4 : rows;
}

/* The fp32 tile: FR rows x FT tokens, 12 accumulators (AVX2 has 16 registers). Per 8 values:
 * FR weight vectors and then each token's x vector loaded once into a register and used for
 * the FR rows, 8 loads for 12 FMAs (measured on AMD Zen 3, all in L1: 2 x 6 89 GFLOPS, 3 x 4
 * and 4 x 3 60-65; with x as the FMAs' memory operand, which the compiler otherwise picks, each
 * x is loaded twice, 14 loads, 62-67). The sums run over the row in K blocks of FK values: the
 * FT tokens' x for one block (6 x 2 KB) stays in L1 while the panel's row pairs pass over it,
 * and between blocks a tile's 8-lane accumulators wait in memory (acc). Each lane still adds
 * its products in the row's order, so the sums are the matvec's to the bit. */
#define FR 2
#define FT 6
#if defined(BL_AVX2)
#define FL 8      /* lanes of an accumulator */
#define FK 512    /* values of x per K block */
#elif defined(BL_NEON)
#define FL 4
#define FK 512
#else
#define FL 1
#define FK (1 << 30)   /* the portable loop: one block, the whole row */
#endif
/* A panel holds about FPANEL bytes of weights but at least FK_ROWS rows: every FT tokens' x
 * (from L2, or L3 when 64 tokens of x are more than L2 holds, e.g. 512 KB for w2's rows of
 * 2048) then serves at least FK_ROWS rows (measured on AMD Zen 3, w2 of stories110M, 64
 * tokens: 8 rows 53, 32 rows 59 GFLOPS). There are several K blocks only when n > FK >= 512,
 * and then FPANEL / 4 / n < 32: such a panel has exactly FK_ROWS rows, the accumulators that
 * wait between K blocks (panel_f32's acc). */
#define FPANEL 65536
#define FK_ROWS 32

/* the sums of FR rows w[r] and FT tokens x[t] over values [j0, j1) of the SIMD part (a multiple
 * of FL), continuing those in acc (FR * FT * FL floats) unless j0 == 0; when j1 is the end of
 * the SIMD part (nv), out[t * ldo + r] = w_r . x_t (the first nr rows and nt tokens), else the
 * sums go back to acc */
static inline __attribute__((always_inline)) void tile_f32(float *out, int ldo, const float *const x[FT],
                                                           const float *const w[FR], int j0, int j1, int nv,
                                                           int n, float *acc, int nr, int nt) {
    float s[FR][FT];
#if defined(BL_AVX2)
    __m256 a[FR][FT];
    for (int r = 0; r < FR; r++)
        for (int t = 0; t < FT; t++)
            a[r][t] = j0 == 0 ? _mm256_setzero_ps() : _mm256_loadu_ps(acc + (r * FT + t) * FL);
    for (int j = j0; j < j1; j += 8) {
        __m256 wv[FR];
        for (int r = 0; r < FR; r++) wv[r] = _mm256_loadu_ps(w[r] + j);
        for (int t = 0; t < FT; t++) {
            __m256 xv = _mm256_loadu_ps(x[t] + j);
            __asm__("" : "+x"(xv));   /* keep it in a register: one load, not one per row */
            for (int r = 0; r < FR; r++) a[r][t] = _mm256_fmadd_ps(wv[r], xv, a[r][t]);
        }
    }
    if (j1 < nv) {
        for (int r = 0; r < FR; r++)
            for (int t = 0; t < FT; t++) _mm256_storeu_ps(acc + (r * FT + t) * FL, a[r][t]);
        return;
    }
    for (int r = 0; r < FR; r++)
        for (int t = 0; t < FT; t++) s[r][t] = hsum256(a[r][t]);
#elif defined(BL_NEON)
    float32x4_t a[FR][FT];
    for (int r = 0; r < FR; r++)
        for (int t = 0; t < FT; t++) a[r][t] = j0 == 0 ? vdupq_n_f32(0) : vld1q_f32(acc + (r * FT + t) * FL);
    for (int j = j0; j < j1; j += 4) {
        float32x4_t wv[FR];
        for (int r = 0; r < FR; r++) wv[r] = vld1q_f32(w[r] + j);
        for (int t = 0; t < FT; t++) {
            float32x4_t xv = vld1q_f32(x[t] + j);
            for (int r = 0; r < FR; r++) a[r][t] = vfmaq_f32(a[r][t], wv[r], xv);
        }
    }
    if (j1 < nv) {
        for (int r = 0; r < FR; r++)
            for (int t = 0; t < FT; t++) vst1q_f32(acc + (r * FT + t) * FL, a[r][t]);
        return;
    }
    for (int r = 0; r < FR; r++)
        for (int t = 0; t < FT; t++) s[r][t] = vaddvq_f32(a[r][t]);
#else
    (void)j0, (void)j1, (void)acc;
    for (int r = 0; r < FR; r++)
        for (int t = 0; t < FT; t++) s[r][t] = 0.0f;
#endif
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < nt; t++) {
            for (int k = nv; k < n; k++) s[r][t] += w[r][k] * x[t][k];
            out[(size_t)t * ldo + r] = s[r][t];
        }
}

/* rows [r0, r1) of one product for all T tokens: for each FT tokens, K block by K block, all
 * the panel's row pairs; rows [r1, rend) are this thread's next panels, fetched meanwhile */
static void panel_f32(const bl_matvec *job, const float *x, int T, int n, int r0, int r1, int rend) {
    const float *w = job->w->f;
    int d = job->d, r4 = r1 < d ? r1 : d / 4 * 4;   /* the matrix's last d % 4 rows: as rows4_f32 */
    int nv = FL > 1 ? n / FL * FL : 0;               /* the SIMD part of a row; the rest scalar */
    float acc[FK_ROWS / FR][FR * FT * FL];           /* a row pair's, when n > FK (r1 - r0 <= FK_ROWS) */
    /* the next panel's rows, fetched into L2 a few cache lines per tile while this one is
     * computed (on demand, the first tokens would wait on DRAM for every line of a panel) */
    int tiles = ((T + FT - 1) / FT) * ((r4 - r0 + FR - 1) / FR) * ((nv + FK - 1) / FK > 0 ? (nv + FK - 1) / FK : 1);
    int nnext = rend - r1 < r1 - r0 ? rend - r1 : r1 - r0;
    size_t lines = (size_t)nnext * n * sizeof(float) / 64, per_tile = tiles > 0 ? lines / tiles + 1 : 0, done = 0;
    uintptr_t next = (uintptr_t)(w + (size_t)r1 * n);
    for (int t = 0; t < T; t += FT) {
        int nt = T - t < FT ? T - t : FT;
        const float *xt[FT];
        for (int u = 0; u < FT; u++) xt[u] = x + (size_t)(t + (u < nt ? u : 0)) * n;
        float *ot = job->out + (size_t)t * d;
        for (int j0 = 0;; j0 += FK) {
            int j1 = nv - j0 < FK ? nv : j0 + FK;
            for (int r = r0; r < r4; r += FR) {
                int nr = r4 - r < FR ? r4 - r : FR;
                const float *wr[FR];
                for (int v = 0; v < FR; v++) wr[v] = w + (size_t)(r + (v < nr ? v : 0)) * n;
                for (size_t e = done + per_tile; done < lines && done < e; done++)
                    __builtin_prefetch((const void *)(next + 64 * done), 0, 2);
                tile_f32(ot + r, d, xt, wr, j0, j1, nv, n, acc[(r - r0) / FR % (FK_ROWS / FR)], nr, nt);   /* % : in bounds when unused */
            }
            if (j1 >= nv) break;
        }
        for (int r = r4 > r0 ? r4 : r0; r < r1; r++)
            for (int u = 0; u < nt; u++) ot[(size_t)u * d + r] = dot1_f32(xt[u], w + (size_t)r * n, n);
    }
}

void bl_matmats_f32(const bl_matvec *jobs, int njobs, const float *x, int T, int n,
                    int threads) {
    if (T == 1) {   /* one token (a prompt's classifier): the matvec, the same sums in the same
                     * order, and it streams rows from DRAM better than a tile would */
        bl_matmuls_f32(jobs, njobs, x, n, threads);
        return;
    }
    long work = (long)T * batch_work(jobs, njobs, n, 0);
    int rows = panel_rows(n, 4, FPANEL);
    rows = rows < FK_ROWS ? FK_ROWS : rows;   /* long rows: a bigger panel, see FK_ROWS */
    (void)threads, (void)work;
    /* Each thread takes an equal share of every matrix's rows (a multiple of 4) and goes
     * through it in panels: dealing whole panels out instead left stories15M's 288-row
     * matrices (6 panels of 56 rows: 168 vs 120 rows) and w2 (9 of 32) a thread idle ~15% of
     * the time at 2 threads. */
#pragma omp parallel num_threads(threads) if (work >= BL_PARALLEL_MIN)
    {
        int me = 0, nth = 1;
#ifdef _OPENMP
        me = omp_get_thread_num(), nth = omp_get_num_threads();
#endif
        for (int k = 0; k < njobs; k++) {
            int quads = (jobs[k].d + 3) / 4;   /* 4-row blocks, the last one maybe short */
            int lo = (int)((long)quads * me / nth) * 4, hi = (int)((long)quads * (me + 1) / nth) * 4;
            hi = hi < jobs[k].d ? hi : jobs[k].d;
            for (int r0 = lo; r0 < hi; r0 += rows)
                panel_f32(&jobs[k], x, T, n, r0, r0 + rows < hi ? r0 + rows : hi, hi);
        }
    }
}

/* Q8_0: one weight row against up to 4 tokens (the row's groups stay in L1 between them) */
static void row_q80(float *out, int ldo, const bl_qtensor *x, const int8_t *wq, const float *ws,
                    int nt, int n, int gs) {
    int ngroups = n / gs;
    for (int t = 0; t < nt; t++)
        out[(size_t)t * ldo] = qdot(x->q + (size_t)t * n, x->s + (size_t)t * ngroups, wq, ws, ngroups, gs);
}

#if defined(BL_QDOT8)
/* The AVX2/VNNI tile: 8 rows x QT tokens, the 8 rows in the 8 int32 lanes of one vector. The
 * rows are first repacked so that one 32-byte load holds 4 consecutive values of each of the 8
 * rows (pack8_q80); a token's 4 matching values, broadcast to all lanes, then multiply all 8
 * rows at once, and each lane sums its own row's products in fours: a (row, token) group sum
 * ends in a lane of its own, exact int32, with no horizontal reduction (the earlier 2 x 4 tile
 * spent about a third of its time transposing sums). Per group each lane then adds
 * ((float)ival * ws) * xs in group order, qdot's float operations, so every result is qdot's
 * to the bit. Per 4 values and token: a broadcast, a sign, two multiply-adds and an add (one
 * vpdpbusd with VNNI), 32 products; 8 x 5 keeps 5 int32 and 5 float accumulators in registers
 * (measured on AMD Zen 3, 110M shapes, 64 tokens: 8 x 4 40, 8 x 5 45, 8 x 6 44 GMAC/s, the
 * 2 x 4 tile it replaced 29). */
#define QR 8
#define QT 5

/* rows [r, r + nr) of w (nr <= 8) into wp (8n bytes): values 4c..4c+3 of row i at
 * wp[32c + 4i], and their scales at sp[8g + i]; the rows past nr are zeros (not stored) */
static void pack8_q80(int8_t *wp, float *sp, const bl_qtensor *w, int r, int nr, int n, int ngroups) {
    for (int i = 0; i < QR; i++) {
        const int8_t *src = w->q + (size_t)(r + i) * n;
        for (int c = 0; c < n / 4; c++) {
            if (i < nr) memcpy(wp + 32 * (size_t)c + 4 * i, src + 4 * (size_t)c, 4);
            else memset(wp + 32 * (size_t)c + 4 * i, 0, 4);
        }
        for (int g = 0; g < ngroups; g++) sp[8 * (size_t)g + i] = i < nr ? w->s[(size_t)(r + i) * ngroups + g] : 0.0f;
    }
}

/* out[t * ldo + i] = row i . token t for the nr packed rows and nt tokens x[t] (scales xs[t]);
 * a tile at the edge of the tokens repeats one (its results are not stored) */
static inline __attribute__((always_inline)) void tile8_q80(float *out, int ldo, const int8_t *wp, const float *sp,
                                                            const int8_t *const x[QT], const float *const xs[QT],
                                                            int nr, int nt, int ngroups, int gs) {
    __m256 val[QT];
    for (int t = 0; t < QT; t++) val[t] = _mm256_setzero_ps();
    for (int g = 0, c = 0; g < ngroups; g++) {
        __m256i acc[QT];
        for (int t = 0; t < QT; t++) acc[t] = _mm256_setzero_si256();
        for (int end = c + gs / 4; c < end; c++) {
            __m256i w = _mm256_loadu_si256((const __m256i *)(wp + 32 * (size_t)c)), uw = _mm256_sign_epi8(w, w);
            for (int t = 0; t < QT; t++) {
                int32_t x4;
                memcpy(&x4, x[t] + 4 * (size_t)c, 4);
                acc[t] = dot32_abs(acc[t], uw, w, _mm256_set1_epi32(x4));
            }
        }
        __m256 wsv = _mm256_loadu_ps(sp + 8 * (size_t)g);
        for (int t = 0; t < QT; t++)
            val[t] = _mm256_add_ps(val[t], _mm256_mul_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc[t]), wsv),
                                                         _mm256_set1_ps(xs[t][g])));
    }
    for (int t = 0; t < nt; t++) {
        if (nr == QR) {
            _mm256_storeu_ps(out + (size_t)t * ldo, val[t]);
        } else {
            float f[QR];
            _mm256_storeu_ps(f, val[t]);
            memcpy(out + (size_t)t * ldo, f, (size_t)nr * sizeof(float));
        }
    }
}

/* rows [r, r + nr) of one product for all T tokens, from their packed copy */
static void block8_q80(const bl_matvec *j, const bl_qtensor *x, int T, int n, int gs, int r, int nr,
                       int8_t *wp, float *sp) {
    int ngroups = n / gs;
    pack8_q80(wp, sp, &j->w->q, r, nr, n, ngroups);
    for (int t = 0; t < T; t += QT) {
        int nt = T - t < QT ? T - t : QT;
        const int8_t *xt[QT];
        const float *st[QT];
        for (int u = 0; u < QT; u++) {   /* past the last token: the first again */
            int tu = t + (u < nt ? u : 0);
            xt[u] = x->q + (size_t)tu * n, st[u] = x->s + (size_t)tu * ngroups;
        }
        tile8_q80(j->out + (size_t)t * j->d + r, j->d, wp, sp, xt, st, nr, nt, ngroups, gs);
    }
}
#endif

/* rows [r0, r1) of one Q8_0 product for T tokens, without the packed tile */
static void panel_q80(const bl_matvec *j, const bl_qtensor *x, int T, int n, int gs, int r0, int r1) {
    int ngroups = n / gs;
    const bl_qtensor *w = &j->w->q;
    for (int t = 0; t < T; t += 4) {
        int nt = T - t < 4 ? T - t : 4;
        bl_qtensor xt = {x->q + (size_t)t * n, x->s + (size_t)t * ngroups};
        for (int r = r0; r < r1; r++)
            row_q80(j->out + (size_t)t * j->d + r, j->d, &xt, w->q + (size_t)r * n, w->s + (size_t)r * ngroups, nt, n, gs);
    }
}

void bl_matmats_q80(const bl_matvec *jobs, int njobs, const bl_qtensor *x, int T, int n, int gs,
                    int threads) {
    if (T == 1) {   /* as bl_matmats_f32: the matvec, qdot's bits */
        bl_matmuls_q80(jobs, njobs, x, n, gs, threads);
        return;
    }
    int ngroups = n / gs, rows = panel_rows(n, 1, 65536);
    long work = (long)T * batch_work(jobs, njobs, n, 16 * ngroups);
    char *pack = NULL;   /* each thread's packed rows and scales */
    size_t per_thread = 0;
#if defined(BL_QDOT8)
    per_thread = ((size_t)QR * n + 31) / 32 * 32 + (size_t)QR * ngroups * sizeof(float);
    /* without it (out of memory) every thread takes the plain path below: the same bits */
    pack = gs % 4 == 0 ? malloc((size_t)(threads > 1 ? threads : 1) * per_thread) : NULL;
#endif
    (void)threads, (void)work, (void)rows, (void)per_thread;
#pragma omp parallel num_threads(threads) if (work >= BL_PARALLEL_MIN)
    {
#if defined(BL_QDOT8)
        if (pack) {
            int me = 0;
#ifdef _OPENMP
            me = omp_get_thread_num();
#endif
            int8_t *wp = (int8_t *)(pack + (size_t)me * per_thread);
            float *sp = (float *)(pack + (size_t)me * per_thread + ((size_t)QR * n + 31) / 32 * 32);
            for (int k = 0; k < njobs; k++) {
                int nblocks = (jobs[k].d + QR - 1) / QR, b;
#pragma omp for schedule(static) nowait
                for (b = 0; b < nblocks; b++) {
                    int nr = jobs[k].d - b * QR < QR ? jobs[k].d - b * QR : QR;
                    block8_q80(&jobs[k], x, T, n, gs, b * QR, nr, wp, sp);
                }
            }
        } else
#endif
        for (int k = 0; k < njobs; k++) {
            int npanels = (jobs[k].d + rows - 1) / rows, p;
#pragma omp for schedule(static) nowait
            for (p = 0; p < npanels; p++) {
                int r1 = (p + 1) * rows < jobs[k].d ? (p + 1) * rows : jobs[k].d;
                panel_q80(&jobs[k], x, T, n, gs, p * rows, r1);
            }
        }
    }
    free(pack);
}

/* the path compiled in, for bl_simd() (babyllama.h) */
const char *bl_simd(void) { return bl_simd_name(); }

/* seconds per empty parallel region of `threads` threads (its fork and join), the mean over
 * `reps`; 0 without OpenMP. For the benchmark's account of where a small model's time goes. */
double bl_fork_join_seconds(int threads, int reps) {
#ifdef _OPENMP
    volatile int sink = 0;
    reps = reps > 0 ? reps : 1;
    double t0 = omp_get_wtime();
    for (int r = 0; r < reps; r++) {
#pragma omp parallel num_threads(threads)
        if (omp_get_thread_num() < 0) sink = 1;   /* never true: only the region's cost */
    }
    (void)sink;
    return (omp_get_wtime() - t0) / reps;
#else
    (void)threads, (void)reps;
    return 0.0;
#endif
}

int bl_fail(char *err, size_t len, int code, const char *fmt, ...) {
    if (err && len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, len, fmt, ap);
        va_end(ap);
    }
    return code;
}
