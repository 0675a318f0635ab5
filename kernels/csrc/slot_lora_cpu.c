/* LoRA-expert deltas of a step's adapters on CPU, float32, one thread: every token's routed (or plain) LoRA on one
 * linear layer, in one call, with no padding and no per-adapter loop on the Python side.
 *
 * The tables are slot_batched_lora's SlotTables (moeserve/adapters/slot_batched_lora.py), one row p per adapter of
 * the step: w_in [P, E + E*r, in] (router rows, then A's E*r rows; just A's r rows when no adapter routes), lora_b
 * [P, E*r, out] (B^T, pre-scaled). For token t of adapter row p = token_row[t] (-1: no LoRA here):
 *
 *     probs = softmax over the adapter's own experts of (router x)    (routed tables; else one expert, weight 1)
 *     gate  = its top_k[p] probabilities, renormalised where renorm[p] (top_k[p] = its expert count: soft)
 *     y[t] += sum over the gated experts e, ranks j of gate[e] * (A[e, j] . x) * B[e, j, :]
 *
 * Each token's delta is summed in fp32 and added to y once; it depends only on the token and its adapter.
 * kernels/native.py builds and loads it; moeserve/adapters/slot_batched_lora.py dispatches.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "routing.h"
#include "vec.h"

/* Returns 0, -1 for an adapter row outside [-1, P) or expert counts and k outside the tables, -2 when memory runs
 * out. */
int moeserve_slot_lora_f32(const float *x, int64_t num_tokens, int64_t in_dim, const int32_t *token_row,
                           const float *w_in, int64_t num_rows, int64_t experts, int64_t rank, int64_t routed,
                           const float *lora_b, int64_t out_dim, const int32_t *own_experts, const int32_t *top_k,
                           const int32_t *renorm, float *y) {
    const int64_t in_rows = routed ? experts + experts * rank : rank;
    for (int64_t p = 0; p < num_rows; p++) {
        if (routed && (own_experts[p] < 1 || own_experts[p] > experts || top_k[p] < 1 || top_k[p] > own_experts[p]))
            return -1;
    }
    float *buf = malloc((size_t)(2 * experts + experts * rank + out_dim) * sizeof(float));
    int64_t *gate_ids = malloc((size_t)experts * sizeof(int64_t)); /* the gated experts, the first `used` */
    if (!buf || !gate_ids) {
        free(buf);
        free(gate_ids);
        return -2;
    }
    float *probs = buf, *gate = buf + experts, *h = gate + experts, *delta = h + experts * rank;
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t p = token_row[t];
        if (p < 0) continue;
        if (p >= num_rows) {
            free(buf);
            free(gate_ids);
            return -1;
        }
        const float *xt = x + t * in_dim, *w = w_in + p * in_rows * in_dim, *b = lora_b + p * experts * rank * out_dim;
        int64_t used = 1; /* experts of this adapter with a gate: the first `used` of gate_ids */
        const float *a_rows = w;
        if (!routed) {
            gate[0] = 1.0f;
            gate_ids[0] = 0;
        } else {
            vgemv(w, own_experts[p], in_dim, xt, in_dim, probs); /* the router's logits */
            used = route_gates(probs, own_experts[p], top_k[p], renorm[p], gate, gate_ids);
            a_rows = w + experts * in_dim;
        }
        /* h = gate * (A x) per gated expert (its r rows of A are contiguous), then delta = sum h B */
        for (int64_t i = 0; i < used; i++) {
            float *hi = h + i * rank;
            vgemv(a_rows + gate_ids[i] * rank * in_dim, rank, in_dim, xt, in_dim, hi);
            for (int64_t j = 0; j < rank; j++) hi[j] *= gate[i];
        }
        memset(delta, 0, (size_t)out_dim * sizeof(float));
        for (int64_t i = 0; i < used; i++)
            vaxpy_rows(b + gate_ids[i] * rank * out_dim, rank, out_dim, h + i * rank, delta, out_dim);
        float *yt = y + t * out_dim;
        for (int64_t c = 0; c < out_dim; c++) yt[c] += delta[c];
    }
    free(buf);
    free(gate_ids);
    return 0;
}
