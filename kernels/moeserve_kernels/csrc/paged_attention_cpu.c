/* Paged decode attention on CPU, float32, one thread: one query token per sequence, keys and values read in place
 * from the paged cache through each sequence's block table (no gather into a padded batch).
 *
 * For sequence b with L = context_lens[b] and key/value head h, the G query heads of h (query head h * G + g) take
 * their scores over positions [max(0, L - window), L) in one pass over the keys, the softmax, and one pass over the
 * values. Each sequence's result depends only on its own query and cache rows. native.py builds and loads it;
 * paged_decode_attention.py dispatches.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vec.h"

/* The cache row of position pos of a sequence (its block table), before the head offset. */
static inline const float *cache_row(const float *cache, const int32_t *table, int64_t pos, int64_t block_size,
                                     int64_t block_stride, int64_t slot_stride) {
    return cache + table[pos / block_size] * block_stride + (pos % block_size) * slot_stride;
}

/* q [B, Hq, D] contiguous; k_cache / v_cache addressed by (block, slot, head) strides in elements, last dim
 * contiguous; block_tables [B, M] int32 (row stride bt_stride); out [B, Hq, Dv] contiguous. window <= 0: none.
 * Returns 0, -1 for a context length outside [1, M * S] or a block id outside [0, num_blocks), -2 when memory runs
 * out. */
int moeserve_paged_decode_attention_f32(const float *q, const float *k_cache, const float *v_cache,
                                        const int32_t *block_tables, const int32_t *context_lens, int64_t num_seqs,
                                        int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t v_dim,
                                        int64_t num_blocks, int64_t block_size, int64_t max_blocks,
                                        int64_t bt_stride, int64_t k_sn, int64_t k_ss, int64_t k_sh, int64_t v_sn,
                                        int64_t v_ss, int64_t v_sh,
                                        float scale, int64_t window, float *out) {
    const int64_t group = q_heads / kv_heads;
    int64_t max_len = 0;
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t len = context_lens[b];
        if (len < 1 || len > max_blocks * block_size) return -1;
        if (len > max_len) max_len = len;
        for (int64_t j = 0; j < (len + block_size - 1) / block_size; j++) {
            const int32_t block = block_tables[b * bt_stride + j];
            if (block < 0 || block >= num_blocks) return -1;
        }
    }
    float *scores = malloc((size_t)(group * max_len + group * v_dim) * sizeof(float)); /* [G, L] and [G, Dv] */
    if (!scores && num_seqs > 0) return -2;
    float *acc = scores + group * max_len;
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t len = context_lens[b];
        const int64_t start = (window > 0 && len > window) ? len - window : 0, n = len - start;
        const int32_t *table = block_tables + b * bt_stride;
        for (int64_t h = 0; h < kv_heads; h++) {
            const float *qh = q + (b * q_heads + h * group) * head_dim; /* the group's G query heads, adjacent */
            int64_t i = 0;
            for (; i + 8 <= n; i += 8) { /* eight keys at a time: one transposed reduction of their dot products */
                const float *k[8];
                for (int j = 0; j < 8; j++)
                    k[j] = cache_row(k_cache, table, start + i + j, block_size, k_sn, k_ss) + h * k_sh;
                for (int64_t g = 0; g < group; g++) {
                    float *sc = scores + g * max_len + i;
                    vdot8rows(k, qh + g * head_dim, head_dim, sc);
                    for (int j = 0; j < 8; j++) sc[j] *= scale;
                }
            }
            for (; i < n; i++) {
                const float *k = cache_row(k_cache, table, start + i, block_size, k_sn, k_ss) + h * k_sh;
                for (int64_t g = 0; g < group; g++) scores[g * max_len + i] = vdot(qh + g * head_dim, k, head_dim) * scale;
            }
            for (int64_t g = 0; g < group; g++) {
                float *p = scores + g * max_len, max = -INFINITY;
                for (int64_t i = 0; i < n; i++) max = p[i] > max ? p[i] : max;
                const float inv = 1.0f / vexp_shifted(p, n, max);
                for (int64_t i = 0; i < n; i++) p[i] *= inv;
            }
            memset(acc, 0, (size_t)(group * v_dim) * sizeof(float));
            for (i = 0; i + 8 <= n; i += 8) { /* eight values per pass over each head's accumulator, in key order */
                const float *v[8];
                for (int j = 0; j < 8; j++)
                    v[j] = cache_row(v_cache, table, start + i + j, block_size, v_sn, v_ss) + h * v_sh;
                for (int64_t g = 0; g < group; g++) vaxpy8rows(v, scores + g * max_len + i, acc + g * v_dim, v_dim);
            }
            for (; i < n; i++) {
                const float *v = cache_row(v_cache, table, start + i, block_size, v_sn, v_ss) + h * v_sh;
                for (int64_t g = 0; g < group; g++) {
                    const float p = scores[g * max_len + i];
                    float *a = acc + g * v_dim;
                    for (int64_t d = 0; d < v_dim; d++) a[d] += p * v[d];
                }
            }
            memcpy(out + (b * q_heads + h * group) * v_dim, acc, (size_t)(group * v_dim) * sizeof(float));
        }
    }
    free(scores);
    return 0;
}
