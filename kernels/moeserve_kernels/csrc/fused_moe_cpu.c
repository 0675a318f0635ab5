/* Fused MoE on CPU, float32, one thread: the routed experts of a layer in one call, for decode-sized batches.
 *
 * out[t] = sum_k w[t, k] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = ids[t, k]
 *
 * Assignments are counting-sorted by expert; for each expert the rows of its tables are read once per block of 4
 * rows and applied to every token routed to it (the rows stay in L1 while the tokens go by), four tokens at a time
 * where the machine has AVX-512's 32 vector registers, else two.
 * Each (row, token) dot product runs the same sequence of 8-wide multiply-adds whatever the other tokens of the batch
 * are, and each token sums its experts in ascending expert order, so a token's result does not depend on the batch.
 *
 * native.py builds and loads it; fused_moe.py dispatches.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "counting_sort.h"
#include "vec.h"

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
    for (int64_t a = 0; a < n_assign; a++)
        if (topk_ids[a] < 0 || topk_ids[a] >= rows) return -1;
    int64_t *starts = calloc((size_t)rows + 2, sizeof(int64_t)); /* [R + 2] */
    int64_t *order = malloc((size_t)n_assign * sizeof(int64_t)); /* [T*K] assignments by expert */
    float *xs = NULL;
    int code = 0;
    if (!starts || !order) {
        code = -2;
        goto done;
    }
    COUNTING_SORT(topk_ids, n_assign, rows, starts, order); /* stable: ascending token per expert */
    int64_t max_count = 0;
    for (int64_t e = 0; e < rows; e++)
        if (starts[e + 1] - starts[e] > max_count) max_count = starts[e + 1] - starts[e];
    /* per expert: its tokens' inputs [n, H], gate/up [n, 2I], activations [n, I], outputs [n, H] */
    xs = malloc((size_t)(max_count * (2 * hidden + 3 * inter)) * sizeof(float));
    if (!xs) {
        code = -2;
        goto done;
    }
    float *gu = xs + max_count * hidden, *act = gu + max_count * 2 * inter, *ys = act + max_count * inter;
    for (int64_t e = 0; e < rows; e++) {
        const int64_t first = starts[e], n = starts[e + 1] - first;
        if (n == 0) continue;
        for (int64_t p = 0; p < n; p++)
            memcpy(xs + p * hidden, x + (order[first + p] / top_k) * hidden, (size_t)hidden * sizeof(float));
        vgemm_rows(w13 + e * 2 * inter * hidden, 2 * inter, hidden, xs, n, hidden, hidden, gu, 2 * inter);
        for (int64_t p = 0; p < n; p++) silu_mul(gu + p * 2 * inter, gu + p * 2 * inter + inter, act + p * inter, inter);
        vgemm_rows(w2 + e * hidden * inter, hidden, inter, act, n, inter, inter, ys, hidden);
        for (int64_t p = 0; p < n; p++) {
            const int64_t a = order[first + p];
            const float wt = topk_weights[a];
            float *o = out + (a / top_k) * hidden;
            const float *y = ys + p * hidden;
            for (int64_t c = 0; c < hidden; c++) o[c] += wt * y[c];
        }
    }
done:
    free(starts);
    free(order);
    free(xs);
    return code;
}
