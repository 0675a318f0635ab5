/* A token's gates over an adapter's experts, from its router logits: shared by the native LoRA-expert and IA3-expert
 * kernels, with the semantics of moeserve/adapters (softmax over the adapter's own experts in fp32, then its top k,
 * renormalised where it says; k equal to its expert count is soft routing, every expert in order). */
#ifndef MOESERVE_ROUTING_H
#define MOESERVE_ROUTING_H

#include <math.h>
#include <stdint.h>

#include "vec.h"

/* probs [own]: the logits in, the softmax out. Writes the gated experts' ids and gates (the first `used` of each,
 * largest first for top-k, ties to the lower id) and returns used. */
static inline int64_t route_gates(float *probs, int64_t own, int64_t k, int renorm, float *gate, int64_t *gate_ids) {
    float max = -INFINITY;
    for (int64_t e = 0; e < own; e++) max = probs[e] > max ? probs[e] : max;
    const float sum = vexp_shifted(probs, own, max);
    for (int64_t e = 0; e < own; e++) probs[e] /= sum;
    if (k >= own) {
        for (int64_t e = 0; e < own; e++) gate_ids[e] = e, gate[e] = probs[e];
        return own;
    }
    float total = 0.0f;
    for (int64_t i = 0; i < k; i++) {
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
    if (renorm)
        for (int64_t i = 0; i < k; i++) gate[i] /= total;
    return k;
}

#endif
