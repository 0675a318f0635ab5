/* Paged decode attention on CPU, float32 or bfloat16, over the caller's threads: one query token per sequence, keys
 * and values read in place from the paged cache through each sequence's block table (no gather into a padded batch).
 *
 * For sequence b with L = context_lens[b] and key/value head h, the G query heads of h (query head h * G + g) take
 * their scores over positions [max(0, L - window), L) in one pass over the keys, the softmax, and one pass over the
 * values. The (sequence, key/value head) pairs are the work items of a parallel_for (parallel.h); each result depends
 * only on its own query and cache rows, whatever the batch or the thread count. bfloat16 (q, caches and out): rows
 * widened to float in a per-thread buffer, float arithmetic, out rounded once. native.py builds and loads it;
 * paged_decode_attention.py dispatches.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "parallel.h"
#include "vec.h"

typedef struct {
    const void *q, *k_cache, *v_cache;
    void *out;
    const int32_t *block_tables, *context_lens;
    int64_t q_heads, kv_heads, group, head_dim, v_dim, block_size, bt_stride, k_sn, k_ss, k_sh, v_sn, v_ss, v_sh;
    int64_t window, max_len, stride;
    float scale;
    int bf16;
    float *scratch; /* per thread: scores [G, max_len], acc [G, Dv], query [G, D], 8 widened rows [8, max(D, Dv)] */
} attn_job;

/* The cache row of position pos of a sequence (head h, dim elements) as float: in place, or widened into buf when
 * the cache is bf16. */
static const float *cache_row(const attn_job *j, const void *cache, const int32_t *table, int64_t pos, int64_t sn,
                              int64_t ss, int64_t sh, int64_t h, int64_t dim, float *buf) {
    const int64_t off = table[pos / j->block_size] * sn + (pos % j->block_size) * ss + h * sh;
    if (!j->bf16) return (const float *)cache + off;
    widen_bf16((const uint16_t *)cache + off, buf, dim);
    return buf;
}

static void attn_item(void *ctx, int64_t item, int thread) {
    const attn_job *j = ctx;
    const int64_t b = item / j->kv_heads, h = item % j->kv_heads, G = j->group, D = j->head_dim, Dv = j->v_dim;
    const int64_t len = j->context_lens[b], max_len = j->max_len;
    const int64_t start = (j->window > 0 && len > j->window) ? len - j->window : 0, n = len - start;
    const int32_t *table = j->block_tables + b * j->bt_stride;
    float *scores = j->scratch + thread * j->stride, *acc = scores + G * max_len, *qh = acc + G * Dv;
    float *rowbuf = qh + G * D;
    const int64_t q0 = (b * j->q_heads + h * G) * D; /* the group's G query heads, adjacent */
    if (j->bf16) widen_bf16((const uint16_t *)j->q + q0, qh, G * D);
    else memcpy(qh, (const float *)j->q + q0, (size_t)(G * D) * sizeof(float));
    const float *rows[8];
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) { /* eight keys at a time: one transposed reduction of their dot products */
        for (int r = 0; r < 8; r++)
            rows[r] = cache_row(j, j->k_cache, table, start + i + r, j->k_sn, j->k_ss, j->k_sh, h, D, rowbuf + r * D);
        for (int64_t g = 0; g < G; g++) {
            float *sc = scores + g * max_len + i;
            vdot8rows(rows, qh + g * D, D, sc);
            for (int r = 0; r < 8; r++) sc[r] *= j->scale;
        }
    }
    for (; i < n; i++) { /* the last keys, one at a time */
        const float *k = cache_row(j, j->k_cache, table, start + i, j->k_sn, j->k_ss, j->k_sh, h, D, rowbuf);
        for (int64_t g = 0; g < G; g++) scores[g * max_len + i] = vdot(qh + g * D, k, D) * j->scale;
    }
    for (int64_t g = 0; g < G; g++) {
        float *p = scores + g * max_len, max = -INFINITY;
        for (int64_t t = 0; t < n; t++) max = p[t] > max ? p[t] : max;
        const float inv = 1.0f / vexp_shifted(p, n, max);
        for (int64_t t = 0; t < n; t++) p[t] *= inv;
    }
    memset(acc, 0, (size_t)(G * Dv) * sizeof(float));
    for (i = 0; i + 8 <= n; i += 8) { /* eight values per pass over each head's accumulator, in key order */
        for (int r = 0; r < 8; r++)
            rows[r] = cache_row(j, j->v_cache, table, start + i + r, j->v_sn, j->v_ss, j->v_sh, h, Dv, rowbuf + r * Dv);
        for (int64_t g = 0; g < G; g++) vaxpy8rows(rows, scores + g * max_len + i, acc + g * Dv, Dv);
    }
    for (; i < n; i++) {
        const float *v = cache_row(j, j->v_cache, table, start + i, j->v_sn, j->v_ss, j->v_sh, h, Dv, rowbuf);
        for (int64_t g = 0; g < G; g++) {
            const float p = scores[g * max_len + i];
            float *a = acc + g * Dv;
            for (int64_t d = 0; d < Dv; d++) a[d] += p * v[d];
        }
    }
    const int64_t o0 = (b * j->q_heads + h * G) * Dv;
    if (j->bf16) {
        for (int64_t d = 0; d < G * Dv; d++) ((uint16_t *)j->out)[o0 + d] = f32_to_bf16(acc[d]);
    } else {
        memcpy((float *)j->out + o0, acc, (size_t)(G * Dv) * sizeof(float));
    }
}

/* q [B, Hq, D] contiguous; k_cache / v_cache addressed by (block, slot, head) strides in elements, last dim
 * contiguous; block_tables [B, M] int32 (row stride bt_stride); out [B, Hq, Dv] contiguous; q, the caches and out
 * float32, or bfloat16 (raw bits) where bf16 is nonzero. window <= 0: none.
 * Returns 0, -1 for a context length outside [1, M * S] or a block id outside [0, num_blocks), -2 when memory runs
 * out. */
int moeserve_paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                                    const int32_t *block_tables, const int32_t *context_lens, int64_t num_seqs,
                                    int64_t q_heads, int64_t kv_heads, int64_t head_dim, int64_t v_dim,
                                    int64_t num_blocks, int64_t block_size, int64_t max_blocks, int64_t bt_stride,
                                    int64_t k_sn, int64_t k_ss, int64_t k_sh, int64_t v_sn, int64_t v_ss, int64_t v_sh,
                                    float scale, int64_t window, int32_t bf16, void *out) {
    int64_t max_len = 0;
    double work = 0;
    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t len = context_lens[b];
        if (len < 1 || len > max_blocks * block_size) return -1;
        if (len > max_len) max_len = len;
        work += (double)len * q_heads * (head_dim + v_dim);
        for (int64_t j = 0; j < (len + block_size - 1) / block_size; j++) {
            const int32_t block = block_tables[b * bt_stride + j];
            if (block < 0 || block >= num_blocks) return -1;
        }
    }
    if (num_seqs == 0) return 0;
    const int64_t group = q_heads / kv_heads, widest = head_dim > v_dim ? head_dim : v_dim;
    attn_job j = {.q = q, .k_cache = k_cache, .v_cache = v_cache, .out = out, .block_tables = block_tables,
                  .context_lens = context_lens, .q_heads = q_heads, .kv_heads = kv_heads, .group = group,
                  .head_dim = head_dim, .v_dim = v_dim, .block_size = block_size, .bt_stride = bt_stride,
                  .k_sn = k_sn, .k_ss = k_ss, .k_sh = k_sh, .v_sn = v_sn, .v_ss = v_ss, .v_sh = v_sh,
                  .window = window, .max_len = max_len, .scale = scale, .bf16 = bf16 != 0};
    j.stride = group * (max_len + v_dim + head_dim) + 8 * widest;
    j.scratch = malloc((size_t)(max_threads() * j.stride) * sizeof(float));
    if (!j.scratch) return -2;
    parallel_for(num_seqs * kv_heads, work, attn_item, &j);
    free(j.scratch);
    return 0;
}
