/* bfloat16 dot products on AVX512-BF16 (vdpbf16ps: 32 bf16 products a vector instruction, summed in pairs into 16
 * float lanes), for the fused MoE's bf16 path on CPUs that have it (Zen 4, Cooper Lake, Sapphire Rapids and later).
 * Rows and vectors are both bf16: each lane sums its pairs' exact products into float, rounding to nearest even
 * (denormals flushed, as the instruction does). Per (row, vector) the sequence of instructions is the same whatever
 * block of rows or vectors it is computed in, and the lanes are summed in one fixed order, so a token's result does
 * not depend on its batch. MOESERVE_DPBF16 is defined where the instruction is available. */
#ifndef MOESERVE_DPBF16_H
#define MOESERVE_DPBF16_H

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define MOESERVE_DPBF16 1
#include <immintrin.h>
#include <stdint.h>

/* y[p * ldy + r] = w[r] . x[p] over n elements for nr <= 4 rows (stride ld) and nt <= 4 vectors (stride ldx), all
 * bf16 (raw bits); called with constant nr and nt, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void dp_block(const uint16_t *w, int64_t ld, const uint16_t *x,
                                                           int64_t ldx, int64_t n, float *y, int64_t ldy,
                                                           const int nr, const int nt) {
    __m512 acc[4][4];
    for (int r = 0; r < nr; r++)
        for (int p = 0; p < nt; p++) acc[r][p] = _mm512_setzero_ps();
    int64_t h = 0;
    for (; h + 32 <= n; h += 32) {
        __m512i wv[4], xv[4];
        for (int r = 0; r < nr; r++) wv[r] = _mm512_loadu_si512(w + r * ld + h);
        for (int p = 0; p < nt; p++) xv[p] = _mm512_loadu_si512(x + p * ldx + h);
        for (int r = 0; r < nr; r++)
            for (int p = 0; p < nt; p++) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], (__m512bh)wv[r], (__m512bh)xv[p]);
    }
    if (h < n) { /* the last n - h < 32 elements, the rest of the vector zero */
        const __mmask32 m = (__mmask32)((1ull << (n - h)) - 1);
        __m512i wv[4], xv[4];
        for (int r = 0; r < nr; r++) wv[r] = _mm512_maskz_loadu_epi16(m, w + r * ld + h);
        for (int p = 0; p < nt; p++) xv[p] = _mm512_maskz_loadu_epi16(m, x + p * ldx + h);
        for (int r = 0; r < nr; r++)
            for (int p = 0; p < nt; p++) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], (__m512bh)wv[r], (__m512bh)xv[p]);
    }
    for (int r = 0; r < nr; r++)
        for (int p = 0; p < nt; p++) y[p * ldy + r] = _mm512_reduce_add_ps(acc[r][p]);
}

/* y[p, r] = w[r] . x[p] for rows r < rows (stride ld) and n_tok vectors (stride ldx), bf16, into y (stride ldy):
 * blocks of 4 rows x 4 vectors, then the odd vectors and rows one at a time. */
static inline void vgemm_rows_dpbf16(const uint16_t *w, int64_t rows, int64_t ld, const uint16_t *x, int64_t n_tok,
                                     int64_t ldx, int64_t n, float *y, int64_t ldy) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        int64_t p = 0;
        for (; p + 4 <= n_tok; p += 4) dp_block(w + r * ld, ld, x + p * ldx, ldx, n, y + p * ldy + r, ldy, 4, 4);
        for (; p < n_tok; p++) dp_block(w + r * ld, ld, x + p * ldx, ldx, n, y + p * ldy + r, ldy, 4, 1);
    }
    for (; r < rows; r++) {
        int64_t p = 0;
        for (; p + 4 <= n_tok; p += 4) dp_block(w + r * ld, ld, x + p * ldx, ldx, n, y + p * ldy + r, ldy, 1, 4);
        for (; p < n_tok; p++) dp_block(w + r * ld, ld, x + p * ldx, ldx, n, y + p * ldy + r, ldy, 1, 1);
    }
}
#endif

#endif
