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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
            const int64_t own = own_experts[p], k = top_k[p];
            float max = -INFINITY, sum = 0.0f;
            vgemv(w, own, in_dim, xt, in_dim, probs);
            for (int64_t e = 0; e < own; e++) max = probs[e] > max ? probs[e] : max;
            for (int64_t e = 0; e < own; e++) sum += (probs[e] = expf(probs[e] - max));
            for (int64_t e = 0; e < own; e++) probs[e] /= sum;
            a_rows = w + experts * in_dim;
            if (k >= own) { /* soft: every expert in order */
                used = own;
                for (int64_t e = 0; e < own; e++) gate_ids[e] = e, gate[e] = probs[e];
            } else { /* top-k: the largest first, ties to the lower id */
                used = k;
                float total = 0.0f;
                for (int64_t i = 0; i < used; i++) {
                    int64_t best = -1;
                    for (int64_t e = 0; e < own; e++) {
                        int taken = 0;
                        for (int64_t j = 0; j < i; j++) taken |= gate_ids[j] == e;
                        if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
                    }
                    gate_ids[i] = best;
                    gate[i] = probs[best];
                    total += probs[best];
                }
                if (renorm[p])
                    for (int64_t i = 0; i < used; i++) gate[i] /= total;
            }
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
