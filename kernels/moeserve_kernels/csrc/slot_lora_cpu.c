/* LoRA-expert deltas of a step's adapters on CPU, float32, over the caller's threads: every token's routed (or plain)
 * LoRA on one linear layer, in one call, with no padding and no per-adapter loop on the Python side.
 *
 * The tables are slot_batched_lora's SlotTables (moeserve/adapters/slot_batched_lora.py), one row p per adapter of
 * the step: w_in [P, E + E*r, in] (router rows, then A's E*r rows; just A's r rows when no adapter routes), lora_b
 * [P, E*r, out] (B^T, pre-scaled), each adapter's experts zero-padded to the tables' rank r past its own rank
 * ranks[p] (skipped). w_in_t [P, in, cols] holds each adapter's w_in rows as columns, zero-padded to cols: where an
 * adapter's rows are one block (soft or plain routing at the tables' size), its router logits and A x are sums over
 * the inputs kept in registers, with no horizontal reductions. For token t of adapter row p = token_row[t] (-1: no
 * LoRA here; token_row NULL: every token row 0's, the step of one adapter):
 *
 *     probs = softmax over the adapter's own experts of (router x)    (routed tables; else one expert, weight 1)
 *     gate  = its top_k[p] probabilities, renormalised where renorm[p] (top_k[p] = its expert count: soft)
 *     y[t] += sum over the gated experts e, ranks j of gate[e] * (A[e, j] . x) * B[e, j, :]
 *
 * Each token's delta is summed in fp32 and added to y once; it depends only on the token and its adapter. The work
 * items of the parallel_for (parallel.h) are chunks of up to CHUNK tokens of one adapter row, so the result is the
 * same at any thread count.
 * native.py builds and loads it; moeserve/adapters/slot_batched_lora.py dispatches.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "counting_sort.h"
#include "parallel.h"
#include "routing.h"
#include "vec.h"

enum { CHUNK = 16 };

typedef struct {
    const float *x, *w_in, *lora_b, *w_in_t;
    const int32_t *token_row, *own_experts, *top_k, *renorm, *ranks;
    const int64_t *starts, *order, *item_row, *item_first;
    int64_t in_dim, experts, rank, routed, out_dim, cols, in_rows, er, hs;
    float *y, *scratch; /* per thread: inputs [C, in], logits and A x [C, hs], gates [C, E], deltas [C, out] */
    int64_t *gate_scratch; /* per thread: gate ids [C, E] */
    int64_t stride;
} lora_job;

static void lora_item(void *ctx, int64_t item, int thread) {
    const lora_job *J = ctx;
    const int64_t p = J->item_row[item], first = J->item_first[item];
    const int64_t n = J->starts[p + 1] - first < CHUNK ? J->starts[p + 1] - first : CHUNK;
    const int64_t in_dim = J->in_dim, experts = J->experts, rank = J->rank, routed = J->routed, hs = J->hs;
    const int64_t out_dim = J->out_dim, cols = J->cols;
    float *copy = J->scratch + thread * J->stride, *hw = copy + CHUNK * in_dim, *gate = hw + CHUNK * hs;
    float *delta = gate + CHUNK * experts;
    int64_t *gate_ids = J->gate_scratch + thread * CHUNK * experts;
    float *h = hw + experts; /* token i's A x at h + i * hs, its logits at hw + i * hs */
    const float *xs = J->x + first * in_dim; /* the chunk's inputs [n, in]: x itself when every token is row 0's */
    if (J->token_row != NULL) {
        for (int64_t i = 0; i < n; i++)
            memcpy(copy + i * in_dim, J->x + J->order[first + i] * in_dim, (size_t)in_dim * sizeof(float));
        xs = copy;
    }
    const float *w = J->w_in + p * J->in_rows * in_dim, *b = J->lora_b + p * J->er * out_dim;
    const float *a_rows = routed ? w + experts * in_dim : w;
    const int64_t rp = J->ranks[p]; /* the adapter's own rank: its experts' rows past it are the tables' padding */
    const int64_t own = routed ? J->own_experts[p] : 1, soft = !routed || J->top_k[p] >= own;
    const int full = rp == rank && own == experts; /* no padding: the rows needed are one block */
    int64_t used = own; /* experts gated per token: gate_ids[i * E + 0 .. used) */
    const int outer = soft && full; /* router and A x from the transposed rows, no reductions */
    if (outer) {
        /* hw[i, :cols] = x_i . w_in_t (routed: logits, then A x; plain: A x, at h), summed over the inputs */
        memset(hw, 0, (size_t)(n * hs) * sizeof(float));
        vouter_tokens(J->w_in_t + p * in_dim * cols, in_dim, cols, xs, in_dim, routed ? hw : h, hs, cols, n);
    } else if (routed) {
        vgemm_rows(w, own, in_dim, xs, n, in_dim, in_dim, hw, hs); /* the router's logits */
    }
    if (!routed) {
        for (int64_t i = 0; i < n; i++) gate[i * experts] = 1.0f, gate_ids[i * experts] = 0;
    } else {
        for (int64_t i = 0; i < n; i++)
            used = route_gates(hw + i * hs, own, J->top_k[p], J->renorm[p], gate + i * experts,
                               gate_ids + i * experts);
    }
    memset(delta, 0, (size_t)(n * out_dim) * sizeof(float));
    if (soft) {
        /* soft or plain: every token takes experts 0..used in order, so A x and B h run over the tokens at once
         * (as one block of rows when the adapter fills the tables' rank, else expert by expert) */
        const int64_t blocks = rp == rank ? 1 : used, rows = rp == rank ? used * rank : rp;
        if (!outer)
            for (int64_t e = 0; e < blocks; e++)
                vgemm_rows(a_rows + e * rank * in_dim, rows, in_dim, xs, n, in_dim, in_dim, h + e * rank, hs);
        for (int64_t i = 0; i < n; i++)
            for (int64_t e = 0; e < used; e++)
                for (int64_t j = 0; j < rp; j++) h[i * hs + e * rank + j] *= gate[i * experts + e];
        for (int64_t e = 0; e < blocks; e++)
            vouter_tokens(b + e * rank * out_dim, rows, out_dim, h + e * rank, hs, delta, out_dim, out_dim, n);
    } else {
        /* top-k: each token its own experts; h = gate * (A x) per gated expert, then delta = sum h B */
        for (int64_t i = 0; i < n; i++) {
            const int64_t *ids = gate_ids + i * experts;
            float *hi = h + i * hs, *di = delta + i * out_dim;
            for (int64_t k = 0; k < used; k++) {
                vgemv(a_rows + ids[k] * rank * in_dim, rp, in_dim, xs + i * in_dim, in_dim, hi + k * rank);
                for (int64_t j = 0; j < rp; j++) hi[k * rank + j] *= gate[i * experts + k];
            }
            for (int64_t k = 0; k < used; k++)
                vaxpy_rows(b + ids[k] * rank * out_dim, rp, out_dim, hi + k * rank, di, out_dim);
        }
    }
    for (int64_t i = 0; i < n; i++) {
        float *yt = J->y + J->order[first + i] * out_dim;
        const float *di = delta + i * out_dim;
        for (int64_t c = 0; c < out_dim; c++) yt[c] += di[c];
    }
}

/* Returns 0, -1 for an adapter row outside [-1, P) or expert counts and k outside the tables, -2 when memory runs
 * out. */
int moeserve_slot_lora_f32(const float *x, int64_t num_tokens, int64_t in_dim, const int32_t *token_row,
                           const float *w_in, int64_t num_rows, int64_t experts, int64_t rank, int64_t routed,
                           const float *lora_b, int64_t out_dim, const int32_t *own_experts, const int32_t *top_k,
                           const int32_t *renorm, const int32_t *ranks, const float *w_in_t, int64_t cols,
                           float *y) {
    const int64_t in_rows = routed ? experts + experts * rank : rank;
    if (cols < in_rows) return -1;
    for (int64_t p = 0; p < num_rows; p++) {
        if (routed && (own_experts[p] < 1 || own_experts[p] > experts || top_k[p] < 1 || top_k[p] > own_experts[p]))
            return -1;
        if (ranks[p] < 0 || ranks[p] > rank) return -1;
    }
    if (token_row == NULL && num_rows < 1) return -1;
    for (int64_t t = 0; token_row != NULL && t < num_tokens; t++)
        if (token_row[t] < -1 || token_row[t] >= num_rows) return -1;
    /* hs, the row stride of the logits-and-A-x buffer, has room for all of w_in_t's columns (written whole) */
    const int64_t hs = routed ? cols : experts + cols, threads = max_threads();
    lora_job J = {.x = x, .w_in = w_in, .lora_b = lora_b, .w_in_t = w_in_t, .token_row = token_row,
                  .own_experts = own_experts, .top_k = top_k, .renorm = renorm, .ranks = ranks, .in_dim = in_dim,
                  .experts = experts, .rank = rank, .routed = routed, .out_dim = out_dim, .cols = cols,
                  .in_rows = in_rows, .er = experts * rank, .hs = hs, .y = y,
                  .stride = CHUNK * (in_dim + hs + experts + out_dim)};
    /* the tokens grouped by adapter row: starts [P + 2], order [T]; the work items: chunks [T + P] */
    int64_t *starts = calloc((size_t)num_rows + 2, sizeof(int64_t));
    int64_t *order = malloc((size_t)(num_tokens + 1) * sizeof(int64_t));
    int64_t *items = malloc((size_t)(2 * (num_tokens + num_rows + 1)) * sizeof(int64_t));
    J.gate_scratch = malloc((size_t)(threads * CHUNK * experts + 1) * sizeof(int64_t));
    J.scratch = malloc((size_t)(threads * J.stride) * sizeof(float));
    int code = 0;
    if (!starts || !order || !items || !J.gate_scratch || !J.scratch) {
        code = -2;
        goto done;
    }
    if (token_row != NULL) {
        COUNTING_SORT(token_row, num_tokens, num_rows, starts, order); /* tokens without LoRA (-1) left out */
    } else { /* every token is row 0's */
        for (int64_t t = 0; t < num_tokens; t++) order[t] = t;
        for (int64_t p = 1; p <= num_rows; p++) starts[p] = num_tokens;
    }
    int64_t n_items = 0, *item_row = items, *item_first = items + num_tokens + num_rows + 1;
    for (int64_t p = 0; p < num_rows; p++)
        for (int64_t first = starts[p]; first < starts[p + 1]; first += CHUNK)
            item_row[n_items] = p, item_first[n_items++] = first;
    J.starts = starts, J.order = order, J.item_row = item_row, J.item_first = item_first;
    parallel_for(n_items, (double)num_tokens * (in_rows * in_dim + experts * rank * out_dim), lora_item, &J);
done:
    free(starts);
    free(order);
    free(items);
    free(J.gate_scratch);
    free(J.scratch);
    return code;
}
