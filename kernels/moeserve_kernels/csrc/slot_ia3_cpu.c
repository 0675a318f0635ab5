/* IA3-expert rescaling of a step's adapters on CPU, float32, one thread (MoV): every token's activations on one
 * linear layer multiplied, in place, by its adapter's gated mix of IA3 vectors, in one call.
 *
 * The tables are AdaptedLinear's own, indexed by adapter slot: vectors [S+1, E, dim], router [S+1, E, dim] (NULL when
 * no resident IA3 adapter routes). For token t of slot s = token_slot[t] (-1: leave it):
 *
 *     probs = softmax over the slot's own experts of (router[s] act[t])   (a slot without a router: vector 0)
 *     gate  = its top_k[s] probabilities, renormalised where renorm[s] (top_k[s] = its expert count: soft)
 *     act[t] *= sum over the gated experts e of gate[e] * vectors[s, e]
 *
 * A token's result depends only on itself and its adapter. native.py builds and loads it;
 * moeserve/adapters/lora_slots.py dispatches.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "routing.h"
#include "vec.h"

/* Returns 0, -1 for a slot outside [-1, S] or expert counts and k outside the tables, -2 when memory runs out. */
int moeserve_slot_ia3_f32(float *act, int64_t num_tokens, int64_t dim, const int32_t *token_slot,
                          const float *router, const float *vectors, int64_t num_slots, int64_t experts,
                          const int32_t *has_router, const int32_t *own_experts, const int32_t *top_k,
                          const int32_t *renorm) {
    float *buf = malloc((size_t)(2 * experts + dim) * sizeof(float));
    int64_t *gate_ids = malloc((size_t)experts * sizeof(int64_t));
    int code = 0;
    if (!buf || !gate_ids) {
        code = -2;
        goto done;
    }
    float *probs = buf, *gate = buf + experts, *scale = gate + experts;
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t s = token_slot[t];
        if (s < 0) continue;
        if (s >= num_slots || own_experts[s] < 1 || own_experts[s] > experts || top_k[s] < 1 ||
            top_k[s] > own_experts[s] || (has_router[s] && !router)) {
            code = -1;
            goto done;
        }
        float *at = act + t * dim;
        const float *vec = vectors + s * experts * dim;
        if (!has_router[s]) {
            memcpy(scale, vec, (size_t)dim * sizeof(float));
        } else {
            vgemv(router + s * experts * dim, own_experts[s], dim, at, dim, probs);
            const int64_t used = route_gates(probs, own_experts[s], top_k[s], renorm[s], gate, gate_ids);
            memset(scale, 0, (size_t)dim * sizeof(float));
            if (used == own_experts[s]) /* soft: every expert in order, their vectors contiguous */
                vaxpy_rows(vec, used, dim, gate, scale, dim);
            else
                for (int64_t i = 0; i < used; i++) vaxpy_rows(vec + gate_ids[i] * dim, 1, dim, gate + i, scale, dim);
        }
        for (int64_t d = 0; d < dim; d++) at[d] *= scale[d];
    }
done:
    free(buf);
    free(gate_ids);
    return code;
}
