/* idot_driver.c: the int8 group dot products of csrc/simd.h on given data, for
 * tests/test_int8_range.py (built once per SIMD path with -DBL_SIMD=<path>).
 *
 *   idot_driver DATA     DATA: int32 gs, int32 ngroups, int32 rows, then for each row
 *                        x[ngroups * gs] and w[ngroups * gs] as int8
 *
 * Prints the path, then per row the idot of each group and the row's qdot with all scales 1
 * (a float sum of the group sums: exact while the partial sums stay below 2^24).
 */
#include "simd.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    FILE *f = argc == 2 ? fopen(argv[1], "rb") : NULL;
    int32_t h[3];
    if (!f || fread(h, sizeof h, 1, f) != 1) return fprintf(stderr, "idot_driver: cannot read\n"), 1;
    int gs = h[0], ngroups = h[1], rows = h[2];
    size_t n = (size_t)gs * ngroups;
    int8_t *x = malloc(n), *w = malloc(n);
    float *ones = malloc(ngroups * sizeof(float));
    if (!x || !w || !ones) return fprintf(stderr, "idot_driver: out of memory\n"), 1;
    for (int g = 0; g < ngroups; g++) ones[g] = 1.0f;
    printf("%s\n", bl_simd_name());
    for (int r = 0; r < rows; r++) {
        if (fread(x, 1, n, f) != n || fread(w, 1, n, f) != n)
            return fprintf(stderr, "idot_driver: truncated\n"), 1;
        for (int g = 0; g < ngroups; g++) printf("%d ", (int)idot(x + (size_t)g * gs, w + (size_t)g * gs, gs));
        printf("%.1f\n", (double)qdot(x, ones, w, ones, ngroups, gs));
    }
    fclose(f);
    free(x), free(w), free(ones);
    return 0;
}
