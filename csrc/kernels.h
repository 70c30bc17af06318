/* kernels.h: the library's internals: the hot loops of the forward pass (kernels.c), SIMD
 * where the CPU has it, and the error helper every file uses. */
#ifndef BABYLLAMA_KERNELS_H
#define BABYLLAMA_KERNELS_H

#include <stddef.h>
#include <stdint.h>

/* format an error message into err[len] (when err is not NULL) and return `code` */
#if defined(__GNUC__)
__attribute__((format(printf, 4, 5)))
#endif
int bl_fail(char *err, size_t len, int code, const char *fmt, ...);

/* a quantized vector or matrix: int8 values q and one fp32 scale per group of gs values */
typedef struct {
    const int8_t *q;
    const float *s;
} bl_qtensor;

/* a weight matrix (d, n): fp32 (f), or Q8_0 (q) when f is NULL */
typedef struct {
    const float *f;
    bl_qtensor q;
} bl_mat;

/* one product of a batch: out (d,) = w (d, n) @ x */
typedef struct {
    float *out;
    const bl_mat *w;
    int d;
} bl_matvec;

/* xout (d,) = W (d, n) @ x (n,), fp32 */
void bl_matmul_f32(float *xout, const float *x, const float *w, int n, int d, int threads);

/* the products of `jobs` that share one input x (n,), fp32 weights, in one parallel region:
 * one fork and one join for, e.g., wq, wk and wv together */
void bl_matmuls_f32(const bl_matvec *jobs, int njobs, const float *x, int n, int threads);

/* the same with Q8_0 weights and a Q8_0 input x (n,), group size gs (gs divides n) */
void bl_matmuls_q80(const bl_matvec *jobs, int njobs, const bl_qtensor *x, int n, int gs,
                    int threads);

/* prefill: the same for T tokens at once, x (T, n) row-major (Q8_0: x->q (T, n), x->s
 * (T, n / gs)), each job's out (T, d) row-major; weights are reused across the tokens */
void bl_matmats_f32(const bl_matvec *jobs, int njobs, const float *x, int T, int n,
                    int threads);
void bl_matmats_q80(const bl_matvec *jobs, int njobs, const bl_qtensor *x, int T, int n, int gs,
                    int threads);

/* quantize x (n,) into q/s in groups of gs, as runq.c: scale = max|x| / 127, round half away */
void bl_quantize(int8_t *q, float *s, const float *x, int n, int gs);

#endif
