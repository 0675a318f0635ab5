/* Fused MoE on CPU, float32 or bfloat16, over the caller's threads: the routed experts of a layer in one call, for
 * decode-sized batches.
 *
 * out[t] = sum_k w[t, k] * w2[e] @ (silu(w13[e, :I] @ x[t]) * (w13[e, I:] @ x[t])),  e = ids[t, k]
 *
 * Assignments are counting-sorted by expert; each expert's rows are read once per block of 4 rows and applied to
 * every token routed to it (the rows stay in L1 while the tokens go by), four tokens at a time where the machine has
 * AVX-512's 32 vector registers, else two. Four phases, each a parallel_for over items that write disjoint outputs:
 *   gather   the assignments' inputs, by expert                        items: blocks of assignments
 *   up       h = silu(gate x) * (up x) for a block of JB intermediate rows of one expert, all its tokens
 *   down     y = w2 h for a block of HB output rows of one expert, all its tokens
 *   combine  out[t] = sum of w * y over t's experts in ascending expert order, for a block of CB columns of one token
 * Each (row, token) dot product runs the same sequence of 8-wide multiply-adds whatever the other tokens of the
 * batch, the blocks or the threads are, so a token's result depends on nothing else (bitwise, at any thread count).
 *
 * bfloat16 (x, w13, w2 and out all bf16): on CPUs with AVX512-BF16 the dot products are vdpbf16ps over bf16 rows and
 * bf16 inputs (dpbf16.h; the activations rounded to bf16 between the projections, as in a bf16 model), else the
 * inputs and weights are widened to float (the weights in registers) for the float32 call's arithmetic on the widened
 * tensors; either way every sum is float and out is rounded once. moeserve_fused_moe_bf16_products says which.
 * native.py builds and loads it; fused_moe.py dispatches.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "counting_sort.h"
#include "dpbf16.h"
#include "parallel.h"
#include "vec.h"

enum { JB = 32, HB = 64, CB = 512, GATHER_BLOCK = 16 };

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

/* vgemm_rows over weights of either type (bf16 rows widened in registers: the same arithmetic as on float rows). */
static void gemm_rows_any(const void *w, int bf16, int64_t rows, int64_t ld, const float *x, int64_t n_tok,
                          int64_t ldx, int64_t n, float *y, int64_t ldy) {
    if (bf16) vgemm_rows_bf16((const uint16_t *)w, rows, ld, x, n_tok, ldx, n, y, ldy);
    else vgemm_rows((const float *)w, rows, ld, x, n_tok, ldx, n, y, ldy);
}

/* 1 where bf16 calls use vdpbf16ps (bf16 products, activations rounded to bf16), 0 where they widen to float. */
int moeserve_fused_moe_bf16_products(void) {
#ifdef MOESERVE_DPBF16
    return 1;
#else
    return 0;
#endif
}

typedef struct {
    const void *x, *w13, *w2;
    void *out;
    const float *topk_weights;
    const int64_t *topk_ids, *starts, *order, *pos_of, *used;
    int64_t hidden, inter, top_k, n_assign, max_count;
    int bf16, dp; /* dp: bf16 through vdpbf16ps, xs and act then hold bf16 */
    float *xs;      /* [A, H] inputs by sorted assignment */
    float *act;     /* [A, I] */
    float *ys;      /* [A, H] expert outputs, unweighted */
    float *scratch; /* per thread: gate and up [2, max_count, JB] */
    int64_t scratch_stride;
} moe_job;

static void gather_item(void *ctx, int64_t item, int thread) {
    const moe_job *j = ctx;
    (void)thread;
    const int64_t end = (item + 1) * GATHER_BLOCK < j->n_assign ? (item + 1) * GATHER_BLOCK : j->n_assign;
    for (int64_t pos = item * GATHER_BLOCK; pos < end; pos++) {
        const int64_t t = j->order[pos] / j->top_k;
        float *dst = j->xs + pos * j->hidden;
        if (j->dp) memcpy((uint16_t *)j->xs + pos * j->hidden, (const uint16_t *)j->x + t * j->hidden,
                          (size_t)j->hidden * sizeof(uint16_t));
        else if (j->bf16) widen_bf16((const uint16_t *)j->x + t * j->hidden, dst, j->hidden);
        else memcpy(dst, (const float *)j->x + t * j->hidden, (size_t)j->hidden * sizeof(float));
    }
}

static void up_item(void *ctx, int64_t item, int thread) {
    const moe_job *j = ctx;
    const int64_t blocks = (j->inter + JB - 1) / JB, e = j->used[item / blocks], j0 = (item % blocks) * JB;
    const int64_t jb = j->inter - j0 < JB ? j->inter - j0 : JB, H = j->hidden, I = j->inter;
    const int64_t first = j->starts[e], n = j->starts[e + 1] - first;
    float *g = j->scratch + thread * j->scratch_stride, *u = g + j->max_count * JB;
    const size_t es = j->bf16 ? 2 : 4;
    const char *w = (const char *)j->w13 + (size_t)(e * 2 * I * H) * es;
#ifdef MOESERVE_DPBF16
    if (j->dp) {
        const uint16_t *xs = (const uint16_t *)j->xs + first * H, *wh = (const uint16_t *)w;
        vgemm_rows_dpbf16(wh + j0 * H, jb, H, xs, n, H, H, g, JB);
        vgemm_rows_dpbf16(wh + (I + j0) * H, jb, H, xs, n, H, H, u, JB);
        for (int64_t p = 0; p < n; p++) {
            silu_mul(g + p * JB, u + p * JB, g + p * JB, jb);
            uint16_t *a = (uint16_t *)j->act + (first + p) * I + j0;
            for (int64_t c = 0; c < jb; c++) a[c] = f32_to_bf16(g[p * JB + c]);
        }
        return;
    }
#endif
    const float *xs = j->xs + first * H;
    gemm_rows_any(w + (size_t)(j0 * H) * es, j->bf16, jb, H, xs, n, H, H, g, JB);
    gemm_rows_any(w + (size_t)((I + j0) * H) * es, j->bf16, jb, H, xs, n, H, H, u, JB);
    for (int64_t p = 0; p < n; p++) silu_mul(g + p * JB, u + p * JB, j->act + (first + p) * I + j0, jb);
}

static void down_item(void *ctx, int64_t item, int thread) {
    const moe_job *j = ctx;
    const int64_t blocks = (j->hidden + HB - 1) / HB, e = j->used[item / blocks], h0 = (item % blocks) * HB;
    const int64_t hb = j->hidden - h0 < HB ? j->hidden - h0 : HB, H = j->hidden, I = j->inter;
    const int64_t first = j->starts[e], n = j->starts[e + 1] - first;
    (void)thread;
    const size_t es = j->bf16 ? 2 : 4;
    const char *w = (const char *)j->w2 + (size_t)(e * H * I + h0 * I) * es;
#ifdef MOESERVE_DPBF16
    if (j->dp) {
        vgemm_rows_dpbf16((const uint16_t *)w, hb, I, (const uint16_t *)j->act + first * I, n, I, I,
                          j->ys + first * H + h0, H);
        return;
    }
#endif
    gemm_rows_any(w, j->bf16, hb, I, j->act + first * I, n, I, I, j->ys + first * H + h0, H);
}

static void combine_item(void *ctx, int64_t item, int thread) {
    const moe_job *j = ctx;
    (void)thread;
    const int64_t blocks = (j->hidden + CB - 1) / CB, t = item / blocks, c0 = (item % blocks) * CB;
    const int64_t cb = j->hidden - c0 < CB ? j->hidden - c0 : CB, K = j->top_k;
    int64_t ks[64]; /* the token's assignments in (expert, assignment) order: insertion sort, K is small */
    for (int64_t k = 0; k < K; k++) {
        int64_t i = k;
        const int64_t a = t * K + k;
        while (i > 0 && j->topk_ids[ks[i - 1]] > j->topk_ids[a]) ks[i] = ks[i - 1], i--;
        ks[i] = a;
    }
    float acc[CB];
    memset(acc, 0, sizeof acc);
    for (int64_t k = 0; k < K; k++) {
        const float wt = j->topk_weights[ks[k]];
        const float *y = j->ys + j->pos_of[ks[k]] * j->hidden + c0;
        for (int64_t c = 0; c < cb; c++) acc[c] += wt * y[c];
    }
    if (j->bf16) {
        uint16_t *o = (uint16_t *)j->out + t * j->hidden + c0;
        for (int64_t c = 0; c < cb; c++) o[c] = f32_to_bf16(acc[c]);
    } else {
        memcpy((float *)j->out + t * j->hidden + c0, acc, (size_t)cb * sizeof(float));
    }
}

/* x [T, H], w13 [R, 2I, H], w2 [R, H, I], out [T, H]: float32, or bfloat16 (raw bits) where bf16 is nonzero;
 * topk_weights [T, K] float32, topk_ids [T, K] int64. Returns 0, -1 for an expert id outside [0, rows) or K > 64,
 * -2 when memory runs out. */
int moeserve_fused_moe(const void *x, int64_t num_tokens, int64_t hidden, const void *w13, const void *w2,
                       int64_t rows, int64_t inter, const float *topk_weights, const int64_t *topk_ids, int64_t top_k,
                       int32_t bf16, void *out) {
    const int64_t n_assign = num_tokens * top_k;
    if (top_k > 64) return -1;
    if (n_assign == 0) {
        memset(out, 0, (size_t)(num_tokens * hidden) * (bf16 ? 2 : 4));
        return 0;
    }
    for (int64_t a = 0; a < n_assign; a++)
        if (topk_ids[a] < 0 || topk_ids[a] >= rows) return -1;
    moe_job j = {.x = x, .w13 = w13, .w2 = w2, .out = out, .topk_weights = topk_weights, .topk_ids = topk_ids,
                 .hidden = hidden, .inter = inter, .top_k = top_k, .n_assign = n_assign, .bf16 = bf16 != 0,
                 .dp = bf16 != 0 && moeserve_fused_moe_bf16_products()};
    int64_t *starts = calloc((size_t)rows + 2, sizeof(int64_t));      /* [R + 2] */
    int64_t *order = malloc((size_t)n_assign * 2 * sizeof(int64_t)); /* [A] by expert, then pos_of [A] */
    int64_t *used = malloc((size_t)rows * sizeof(int64_t));          /* the experts with assignments */
    const int threads = max_threads();
    float *buf = NULL;
    int code = 0;
    if (!starts || !order || !used) {
        code = -2;
        goto done;
    }
    COUNTING_SORT(topk_ids, n_assign, rows, starts, order); /* stable: ascending token per expert */
    int64_t *pos_of = order + n_assign, n_used = 0;
    for (int64_t pos = 0; pos < n_assign; pos++) pos_of[order[pos]] = pos;
    for (int64_t e = 0; e < rows; e++) {
        const int64_t n = starts[e + 1] - starts[e];
        if (n > j.max_count) j.max_count = n;
        if (n > 0) used[n_used++] = e;
    }
    j.starts = starts, j.order = order, j.pos_of = pos_of, j.used = used;
    j.scratch_stride = 2 * j.max_count * JB;
    buf = malloc((size_t)(n_assign * (2 * hidden + inter) + threads * j.scratch_stride) * sizeof(float));
    if (!buf) {
        code = -2;
        goto done;
    }
    j.xs = buf, j.act = buf + n_assign * hidden, j.ys = j.act + n_assign * inter, j.scratch = j.ys + n_assign * hidden;
    const double macs = (double)n_assign * 3 * inter * hidden;
    parallel_for((n_assign + GATHER_BLOCK - 1) / GATHER_BLOCK, (double)n_assign * hidden, gather_item, &j);
    parallel_for(n_used * ((inter + JB - 1) / JB), macs, up_item, &j);
    parallel_for(n_used * ((hidden + HB - 1) / HB), macs, down_item, &j);
    parallel_for(num_tokens * ((hidden + CB - 1) / CB), (double)n_assign * hidden, combine_item, &j);
done:
    free(starts);
    free(order);
    free(used);
    free(buf);
    return code;
}
