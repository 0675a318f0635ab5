/* Writing a step's keys or values into the paged cache on CPU, float32: cache row slot_mapping[t] = values[t], one
 * call instead of an index_put. The slots are checked before anything is written.
 *
 * native.py builds and loads it; varlen_attention.py (store_kv) dispatches.
 */
#include <stdint.h>
#include <string.h>

/* cache [num_slots, row] and values [T, row] contiguous; returns -1 (nothing written) for a slot outside the cache. */
int moeserve_store_kv_f32(float *cache, int64_t num_slots, const float *values, int64_t num_tokens, int64_t row,
                          const int64_t *slot_mapping) {
    for (int64_t t = 0; t < num_tokens; t++)
        if (slot_mapping[t] < 0 || slot_mapping[t] >= num_slots) return -1;
    for (int64_t t = 0; t < num_tokens; t++)
        memcpy(cache + slot_mapping[t] * row, values + t * row, (size_t)row * sizeof(float));
    return 0;
}
