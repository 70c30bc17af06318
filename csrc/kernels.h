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

/* xout (d,) = W (d, n) @ x (n,), fp32 */
void bl_matmul_f32(float *xout, const float *x, const float *w, int n, int d, int threads);

/* xout (d,) = W (d, n) @ x (n,), both Q8_0 with group size gs (gs divides n) */
void bl_matmul_q80(float *xout, const bl_qtensor *x, const bl_qtensor *w, int n, int d, int gs,
                   int threads);

/* quantize x (n,) into q/s in groups of gs, as runq.c: scale = max|x| / 127, round half away */
void bl_quantize(int8_t *q, float *s, const float *x, int n, int gs);

#endif
