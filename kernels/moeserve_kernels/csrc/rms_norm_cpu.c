/* RMSNorm on CPU, float32, one thread: y[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * w, row by row.
 *
 * Torch's F.rms_norm on a CPU float32 tensor runs as a chain of ops (pow, mean, add, rsqrt, two multiplies), each a
 * dispatch and a pass over the rows; a decode step calls it two to four times per layer on a handful of rows. Here
 * it is one pass per row: the sum of squares in 8-wide lanes (one horizontal sum), then the scale. A row's result
 * depends on that row only.
 *
 * native.py builds and loads it; rms_norm.py dispatches.
 */
#include <math.h>
#include <stdint.h>

#include "vec.h"

int moeserve_rms_norm_f32(const float *x, int64_t num_rows, int64_t dim, const float *weight, float eps, float *y) {
    for (int64_t t = 0; t < num_rows; t++) {
        const float *xt = x + t * dim;
        float *yt = y + t * dim;
        const float rstd = 1.0f / sqrtf(vdot(xt, xt, dim) / (float)dim + eps);
        int64_t i = 0;
        for (; i + 8 <= dim; i += 8) store8(yt + i, load8(xt + i) * rstd * load8(weight + i));
        for (; i < dim; i++) yt[i] = xt[i] * rstd * weight[i];
    }
    return 0;
}
