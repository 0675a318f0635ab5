/* Fused MoE on CPU, float32, one thread: the routed experts of a layer in one call, for decode-sized batches.
 *
 * out[t] = sum_k w[t, k] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = ids[t, k]
 *
 * Assignments are counting-sorted by expert; for each expert the rows of its tables are read once per block of 4
 * rows and applied to every token routed to it (the rows stay in L1 while the tokens go by), two tokens at a time.
 * Each (row, token) dot product runs the same sequence of 8-wide multiply-adds whatever the other tokens of the batch
 * are, and each token sums its experts in ascending expert order, so a token's result does not depend on the batch.
 *
 * kernels/native.py builds and loads it; kernels/fused_moe.py dispatches.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* out[r] (r < 4, rows w + r*ld) . x, for two tokens x0 and x1 (n elements each): per (row, token) the same
 * arithmetic as vdot4 and vdot (vec.h), which take the odd token and the rows past a multiple of 4. */
static inline void dot4x2(const float *w, int64_t ld, const float *x0, const float *x1, int64_t n, float *o0,
                          float *o1) {
    v8f a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
    int64_t h = 0;
    for (; h + 8 <= n; h += 8) {
        v8f y0 = load8(x0 + h), y1 = load8(x1 + h);
        v8f r0 = load8(w + h), r1 = load8(w + ld + h), r2 = load8(w + 2 * ld + h), r3 = load8(w + 3 * ld + h);
        a00 += r0 * y0; a01 += r0 * y1;
        a10 += r1 * y0; a11 += r1 * y1;
        a20 += r2 * y0; a21 += r2 * y1;
        a30 += r3 * y0; a31 += r3 * y1;
    }
    float s00 = hsum8(a00), s01 = hsum8(a01), s10 = hsum8(a10), s11 = hsum8(a11);
    float s20 = hsum8(a20), s21 = hsum8(a21), s30 = hsum8(a30), s31 = hsum8(a31);
    for (; h < n; h++) {
        s00 += w[h] * x0[h]; s01 += w[h] * x1[h];
        s10 += w[ld + h] * x0[h]; s11 += w[ld + h] * x1[h];
        s20 += w[2 * ld + h] * x0[h]; s21 += w[2 * ld + h] * x1[h];
        s30 += w[3 * ld + h] * x0[h]; s31 += w[3 * ld + h] * x1[h];
    }
    o0[0] = s00; o0[1] = s10; o0[2] = s20; o0[3] = s30;
    o1[0] = s01; o1[1] = s11; o1[2] = s21; o1[3] = s31;
}

/* y[p, r] = w[r] . x[p] for rows r < rows (stride ld) and the n_tok vectors x[p] (stride ldx), into y (stride ldy). */
static void gemv_rows(const float *w, int64_t rows, int64_t ld, const float *x, int64_t n_tok, int64_t ldx,
                      int64_t n, float *y, int64_t ldy) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const float *wr = w + r * ld;
        int64_t p = 0;
        for (; p + 2 <= n_tok; p += 2) dot4x2(wr, ld, x + p * ldx, x + (p + 1) * ldx, n, y + p * ldy + r,
                                              y + (p + 1) * ldy + r);
        for (; p < n_tok; p++) vdot4(wr, ld, x + p * ldx, n, y + p * ldy + r);
    }
    for (; r < rows; r++)
        for (int64_t p = 0; p < n_tok; p++) y[p * ldy + r] = vdot(w + r * ld, x + p * ldx, n);
}

/* h[i] = silu(g[i]) * u[i] for n elements. */
static void silu_mul(const float *g, const float *u, float *h, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f gv = load8(g + i);
        store8(h + i, gv / (1.0f + vexp(-gv)) * load8(u + i));
    }
    for (; i < n; i++) {
        float tail[8] = {0};
        tail[0] = -g[i];
        float e = vexp(load8(tail))[0];
        h[i] = g[i] / (1.0f + e) * u[i];
    }
}

/* Returns 0, -1 for an expert id outside [0, rows), -2 when memory runs out. */
int moeserve_fused_moe_f32(const float *x, int64_t num_tokens, int64_t hidden, const float *w13, const float *w2,
                           int64_t rows, int64_t inter, const float *topk_weights, const int64_t *topk_ids,
                           int64_t top_k, float *out) {
    const int64_t n_assign = num_tokens * top_k;
    memset(out, 0, (size_t)(num_tokens * hidden) * sizeof(float));
    if (n_assign == 0) return 0;
    int64_t *starts = calloc((size_t)rows + 1, sizeof(int64_t)); /* [R + 1] */
    int64_t *order = malloc((size_t)n_assign * sizeof(int64_t)); /* [T*K] assignments by expert */
    if (!starts || !order) {
        free(starts);
        free(order);
        return -2;
    }
    for (int64_t a = 0; a < n_assign; a++) {
        int64_t e = topk_ids[a];
        if (e < 0 || e >= rows) {
            free(starts);
            free(order);
            return -1;
        }
        starts[e + 1]++;
    }
    int64_t max_count = 0;
    for (int64_t e = 0; e < rows; e++) {
        if (starts[e + 1] > max_count) max_count = starts[e + 1];
        starts[e + 1] += starts[e];
    }
    int64_t *fill = malloc((size_t)rows * sizeof(int64_t));
    /* per expert: its tokens' inputs [n, H], gate/up [n, 2I], activations [n, I], outputs [n, H] */
    float *xs = malloc((size_t)(max_count * (2 * hidden + 3 * inter)) * sizeof(float));
    if (!fill || !xs) {
        free(starts);
        free(order);
        free(fill);
        free(xs);
        return -2;
    }
    memcpy(fill, starts, (size_t)rows * sizeof(int64_t));
    for (int64_t a = 0; a < n_assign; a++) order[fill[topk_ids[a]]++] = a; /* stable: ascending token per expert */
    float *gu = xs + max_count * hidden, *act = gu + max_count * 2 * inter, *ys = act + max_count * inter;
    for (int64_t e = 0; e < rows; e++) {
        const int64_t first = starts[e], n = starts[e + 1] - first;
        if (n == 0) continue;
        for (int64_t p = 0; p < n; p++)
            memcpy(xs + p * hidden, x + (order[first + p] / top_k) * hidden, (size_t)hidden * sizeof(float));
        gemv_rows(w13 + e * 2 * inter * hidden, 2 * inter, hidden, xs, n, hidden, hidden, gu, 2 * inter);
        for (int64_t p = 0; p < n; p++) silu_mul(gu + p * 2 * inter, gu + p * 2 * inter + inter, act + p * inter, inter);
        gemv_rows(w2 + e * hidden * inter, hidden, inter, act, n, inter, inter, ys, hidden);
        for (int64_t p = 0; p < n; p++) {
            const int64_t a = order[first + p];
            const float wt = topk_weights[a];
            float *o = out + (a / top_k) * hidden;
            const float *y = ys + p * hidden;
            for (int64_t c = 0; c < hidden; c++) o[c] += wt * y[c];
        }
    }
    free(starts);
    free(order);
    free(fill);
    free(xs);
    return 0;
}
