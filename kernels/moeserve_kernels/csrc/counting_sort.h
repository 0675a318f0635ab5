/* Grouping items by a small integer key, stable (ascending index within a key), for the native CPU kernels: the
 * fused MoE groups its (token, expert) assignments by expert, the LoRA kernel a step's tokens by adapter row. */
#ifndef MOESERVE_COUNTING_SORT_H
#define MOESERVE_COUNTING_SORT_H

#include <stdint.h>

/* keys [n] (any integer type; items whose key is outside [0, num_keys) are left out), starts [num_keys + 2] zeroed,
 * order [n]. Afterwards key k's items are order[starts[k] .. starts[k + 1]). */
#define COUNTING_SORT(keys, n, num_keys, starts, order)                                                              \
    do {                                                                                                             \
        for (int64_t i_ = 0; i_ < (n); i_++)                                                                         \
            if ((keys)[i_] >= 0 && (keys)[i_] < (num_keys)) (starts)[(keys)[i_] + 2]++;                              \
        for (int64_t k_ = 0; k_ < (num_keys); k_++) (starts)[k_ + 2] += (starts)[k_ + 1];                           \
        for (int64_t i_ = 0; i_ < (n); i_++) /* starts[k + 1] runs over key k's places, ending at its end */         \
            if ((keys)[i_] >= 0 && (keys)[i_] < (num_keys)) (order)[(starts)[(keys)[i_] + 1]++] = i_;               \
    } while (0)

#endif
