/* How many threads the native kernels split their work over when called from this thread (parallel.h): torch's
 * count (torch.set_num_threads) when built with OpenMP, 0 when built without it (every kernel then runs on the
 * caller's thread). The tests read it to check that the library shares torch's OpenMP runtime. */
#include "parallel.h"

int moeserve_threads(void) {
#ifdef _OPENMP
    return max_threads();
#else
    return 0;
#endif
}
