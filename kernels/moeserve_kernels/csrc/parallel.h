/* Work items over threads for the native CPU kernels: the caller's OpenMP threads, which are torch's own.
 *
 * native.py compiles with -fopenmp where the compiler has it and loads the library after torch, so the library's
 * libgomp.so.1 is the one torch already loaded (same soname): one pool of threads for torch's ops and these kernels,
 * sized as torch's (omp_get_max_threads() in the calling thread, what torch.set_num_threads set). Without OpenMP the
 * items run in order on the caller's thread.
 *
 * parallel_for hands items out one at a time from a shared counter (the threads that finish early take more), and
 * each item writes its own outputs: which thread runs an item never changes what it computes, so a kernel's results
 * are bitwise the same at any thread count. Only the (small) per-thread workspaces are indexed by thread.
 */
#ifndef MOESERVE_PARALLEL_H
#define MOESERVE_PARALLEL_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Below this much work (multiply-adds, or elements moved) a call stays on one thread: waking the pool costs a few
 * microseconds. */
#define PARALLEL_MIN_WORK (1 << 17)

/* fn(ctx, item, thread) for item in [0, n_items); thread in [0, max_threads()). */
typedef void (*work_fn)(void *ctx, int64_t item, int thread);

/* How many threads parallel_for may use from this thread: the workspaces to allocate. */
static inline int max_threads(void) {
#ifdef _OPENMP
    const int n = omp_get_max_threads();
    return n > 0 ? n : 1;
#else
    return 1;
#endif
}

/* Runs every item once; `work` (the call's total, in multiply-adds or so) below PARALLEL_MIN_WORK, one item, or one
 * thread: on the caller's thread, in order. */
static inline void parallel_for(int64_t n_items, double work, work_fn fn, void *ctx) {
#ifdef _OPENMP
    const int threads = max_threads();
    if (threads > 1 && n_items > 1 && work >= PARALLEL_MIN_WORK) {
        int64_t next = 0;
        const int used = n_items < threads ? (int)n_items : threads;
#pragma omp parallel num_threads(used)
        {
            const int thread = omp_get_thread_num();
            for (;;) {
                const int64_t item = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
                if (item >= n_items) break;
                fn(ctx, item, thread);
            }
        }
        return;
    }
#else
    (void)work;
#endif
    for (int64_t item = 0; item < n_items; item++) fn(ctx, item, 0);
}

#endif
