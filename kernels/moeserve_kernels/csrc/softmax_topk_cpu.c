/* The MoE router's choice on CPU, float32, one thread: per token the softmax of its expert logits, its top k experts
 * (largest first, ties to the lower id) and their weights, renormalised where asked: one call instead of torch's
 * softmax, topk, gather and division. A token's result depends on that token only.
 *
 * native.py builds and loads it; softmax_topk.py dispatches.
 */
#include <stdint.h>
#include <string.h>

#include "routing.h"

/* logits [T, E] in, scores [T, E] (the softmax), ids [T, K] int64 and weights [T, K] out; 1 <= k < E. */
int moeserve_softmax_topk_f32(const float *logits, int64_t num_tokens, int64_t experts, int64_t k, int32_t renorm,
                              float *scores, int64_t *ids, float *weights) {
    if (k < 1 || k >= experts) return -1;
    for (int64_t t = 0; t < num_tokens; t++) {
        float *probs = scores + t * experts;
        memcpy(probs, logits + t * experts, (size_t)experts * sizeof(float));
        route_gates(probs, experts, k, renorm, weights + t * k, ids + t * k);
    }
    return 0;
}
