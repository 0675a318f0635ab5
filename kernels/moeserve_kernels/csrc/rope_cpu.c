/* Rotary position embedding on CPU, float32, one thread, half-split pairs: for token t, head h and the rotary dim D,
 *
 *     out[t, h] = x[t, h] * cos[t] + (x2, x1) * sin[t]      (x1, x2) = the halves of x[t, h]
 *
 * with cos = (cos, cos) and sin = (-sin, sin) as RotaryEmbedding.cos_sin lays them out: one call per tensor instead
 * of torch's four ops and a roll. A token's result depends on that token only.
 *
 * native.py builds and loads it; rope.py dispatches.
 */
#include <stdint.h>

#include "vec.h"

/* x and out [T, H, D] contiguous, cos and sin [T, D]; D even. */
int moeserve_rope_f32(const float *x, int64_t num_tokens, int64_t heads, int64_t dim, const float *cos,
                      const float *sin, float *out) {
    if (dim % 2) return -1;
    const int64_t half = dim / 2;
    for (int64_t t = 0; t < num_tokens; t++) {
        const float *c = cos + t * dim, *s = sin + t * dim;
        for (int64_t h = 0; h < heads; h++) {
            const float *xh = x + (t * heads + h) * dim;
            float *o = out + (t * heads + h) * dim;
            int64_t d = 0;
            for (; d + 8 <= half; d += 8) {
                const v8f x1 = load8(xh + d), x2 = load8(xh + half + d);
                store8(o + d, x1 * load8(c + d) + x2 * load8(s + d));
                store8(o + half + d, x2 * load8(c + half + d) + x1 * load8(s + half + d));
            }
            for (; d < half; d++) {
                o[d] = xh[d] * c[d] + xh[half + d] * s[d];
                o[half + d] = xh[half + d] * c[half + d] + xh[d] * s[half + d];
            }
        }
    }
    return 0;
}
