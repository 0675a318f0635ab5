/* Dot products of rows of weights (VG_T: float, or bfloat16's raw bits) with float vectors, for vec.h, which
 * includes this once per weight type after defining VG_T, VG_LOAD8 (8 weights as v8f), VG_TOF (one weight as float)
 * and VG_NAME (the function names of that type); the definitions are undone at the end. bf16 weights are widened
 * exactly, so each function does on them the arithmetic of its float twin on the widened rows. */

/* w . x over n elements (w of VG_T): per element the same arithmetic as vdot. */
static inline float VG_NAME(vdot_w)(const VG_T *w, const float *x, int64_t n) {
    v8f acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc += VG_LOAD8(w + i) * load8(x + i);
    float s = hsum8(acc);
    for (; i < n; i++) s += VG_TOF(w[i]) * x[i];
    return s;
}

/* o0[r] = (row r of w, stride ld) . x0 for r < 4: per row the same arithmetic as vdot, four chains at once. */
static inline void VG_NAME(vdot4)(const VG_T *w, int64_t ld, const float *x0, int64_t n, float *o0) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t h = 0;
    for (; h + 8 <= n; h += 8) {
        v8f y0 = load8(x0 + h);
        a0 += VG_LOAD8(w + h) * y0;
        a1 += VG_LOAD8(w + ld + h) * y0;
        a2 += VG_LOAD8(w + 2 * ld + h) * y0;
        a3 += VG_LOAD8(w + 3 * ld + h) * y0;
    }
    const v8f s = hsum8x8(a0, a1, a2, a3, a0, a1, a2, a3);
    float s0 = s[0], s1 = s[1], s2 = s[2], s3 = s[3];
    for (; h < n; h++) {
        s0 += VG_TOF(w[h]) * x0[h];
        s1 += VG_TOF(w[ld + h]) * x0[h];
        s2 += VG_TOF(w[2 * ld + h]) * x0[h];
        s3 += VG_TOF(w[3 * ld + h]) * x0[h];
    }
    o0[0] = s0; o0[1] = s1; o0[2] = s2; o0[3] = s3;
}

/* vdot of one row with two tokens at once (two chains): per token the same arithmetic as vdot. */
static inline void VG_NAME(vdot1x2)(const VG_T *w, const float *x0, const float *x1, int64_t n, float *o0, float *o1) {
    v8f a0 = {0}, a1 = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f r = VG_LOAD8(w + i);
        a0 += r * load8(x0 + i);
        a1 += r * load8(x1 + i);
    }
    float s0 = hsum8(a0), s1 = hsum8(a1);
    for (; i < n; i++) {
        s0 += VG_TOF(w[i]) * x0[i];
        s1 += VG_TOF(w[i]) * x1[i];
    }
    *o0 = s0;
    *o1 = s1;
}

/* out[r] (r < 4, rows w + r*ld) . x, for two tokens x0 and x1 (n elements each): per (row, token) the same
 * arithmetic as vdot4 and vdot, which take the odd token and the rows past a multiple of 4. */
static inline void VG_NAME(vdot4x2)(const VG_T *w, int64_t ld, const float *x0, const float *x1, int64_t n, float *o0,
                          float *o1) {
    v8f a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
    int64_t h = 0;
    for (; h + 8 <= n; h += 8) {
        v8f y0 = load8(x0 + h), y1 = load8(x1 + h);
        v8f r0 = VG_LOAD8(w + h), r1 = VG_LOAD8(w + ld + h);
        v8f r2 = VG_LOAD8(w + 2 * ld + h), r3 = VG_LOAD8(w + 3 * ld + h);
        a00 += r0 * y0; a01 += r0 * y1;
        a10 += r1 * y0; a11 += r1 * y1;
        a20 += r2 * y0; a21 += r2 * y1;
        a30 += r3 * y0; a31 += r3 * y1;
    }
    const v8f s = hsum8x8(a00, a10, a20, a30, a01, a11, a21, a31);
    float s00 = s[0], s10 = s[1], s20 = s[2], s30 = s[3], s01 = s[4], s11 = s[5], s21 = s[6], s31 = s[7];
    for (; h < n; h++) {
        s00 += VG_TOF(w[h]) * x0[h]; s01 += VG_TOF(w[h]) * x1[h];
        s10 += VG_TOF(w[ld + h]) * x0[h]; s11 += VG_TOF(w[ld + h]) * x1[h];
        s20 += VG_TOF(w[2 * ld + h]) * x0[h]; s21 += VG_TOF(w[2 * ld + h]) * x1[h];
        s30 += VG_TOF(w[3 * ld + h]) * x0[h]; s31 += VG_TOF(w[3 * ld + h]) * x1[h];
    }
    o0[0] = s00; o0[1] = s10; o0[2] = s20; o0[3] = s30;
    o1[0] = s01; o1[1] = s11; o1[2] = s21; o1[3] = s31;
}

#ifdef MOESERVE_AVX512
/* vdot4x2 for four tokens (16 accumulators, in 32 registers: half the reads of the rows), per (row, token) the same
 * arithmetic. */
static inline void VG_NAME(vdot4x4)(const VG_T *w, int64_t ld, const float *x, int64_t ldx, int64_t n, float *y,
                                    int64_t ldy) {
    const float *x0 = x, *x1 = x + ldx, *x2 = x + 2 * ldx, *x3 = x + 3 * ldx;
    v8f a00 = {0}, a01 = {0}, a02 = {0}, a03 = {0}, a10 = {0}, a11 = {0}, a12 = {0}, a13 = {0};
    v8f a20 = {0}, a21 = {0}, a22 = {0}, a23 = {0}, a30 = {0}, a31 = {0}, a32 = {0}, a33 = {0};
    int64_t h = 0;
    for (; h + 8 <= n; h += 8) {
        v8f y0 = load8(x0 + h), y1 = load8(x1 + h), y2 = load8(x2 + h), y3 = load8(x3 + h);
        v8f r0 = VG_LOAD8(w + h), r1 = VG_LOAD8(w + ld + h);
        v8f r2 = VG_LOAD8(w + 2 * ld + h), r3 = VG_LOAD8(w + 3 * ld + h);
        a00 += r0 * y0; a01 += r0 * y1; a02 += r0 * y2; a03 += r0 * y3;
        a10 += r1 * y0; a11 += r1 * y1; a12 += r1 * y2; a13 += r1 * y3;
        a20 += r2 * y0; a21 += r2 * y1; a22 += r2 * y2; a23 += r2 * y3;
        a30 += r3 * y0; a31 += r3 * y1; a32 += r3 * y2; a33 += r3 * y3;
    }
    const v8f s01 = hsum8x8(a00, a10, a20, a30, a01, a11, a21, a31);
    const v8f s23 = hsum8x8(a02, a12, a22, a32, a03, a13, a23, a33);
    float s[4][4]; /* [token][row] */
    for (int r = 0; r < 4; r++) s[0][r] = s01[r], s[1][r] = s01[4 + r], s[2][r] = s23[r], s[3][r] = s23[4 + r];
    for (; h < n; h++)
        for (int p = 0; p < 4; p++)
            for (int r = 0; r < 4; r++) s[p][r] += VG_TOF(w[r * ld + h]) * x[p * ldx + h];
    for (int p = 0; p < 4; p++)
        for (int r = 0; r < 4; r++) y[p * ldy + r] = s[p][r];
}
#endif

/* y[p, r] = w[r] . x[p] for rows r < rows (stride ld) and the n_tok vectors x[p] (stride ldx), into y (stride
 * ldy). */
static inline void VG_NAME(vgemm_rows)(const VG_T *w, int64_t rows, int64_t ld, const float *x, int64_t n_tok,
                                       int64_t ldx, int64_t n, float *y, int64_t ldy) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) {
        const VG_T *wr = w + r * ld;
        int64_t p = 0;
#ifdef MOESERVE_AVX512
        for (; p + 4 <= n_tok; p += 4) VG_NAME(vdot4x4)(wr, ld, x + p * ldx, ldx, n, y + p * ldy + r, ldy);
#endif
        for (; p + 2 <= n_tok; p += 2) VG_NAME(vdot4x2)(wr, ld, x + p * ldx, x + (p + 1) * ldx, n, y + p * ldy + r,
                                              y + (p + 1) * ldy + r);
        for (; p < n_tok; p++) VG_NAME(vdot4)(wr, ld, x + p * ldx, n, y + p * ldy + r);
    }
    for (; r < rows; r++) {
        const VG_T *wr = w + r * ld;
        int64_t p = 0;
        for (; p + 2 <= n_tok; p += 2)
            VG_NAME(vdot1x2)(wr, x + p * ldx, x + (p + 1) * ldx, n, y + p * ldy + r, y + (p + 1) * ldy + r);
        for (; p < n_tok; p++) y[p * ldy + r] = VG_NAME(vdot_w)(wr, x + p * ldx, n);
    }
}

/* y[r] = (row r of w, stride ld) . x for r < rows: four rows at a time, then one. */
static inline void VG_NAME(vgemv)(const VG_T *w, int64_t rows, int64_t ld, const float *x, int64_t n, float *y) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) VG_NAME(vdot4)(w + r * ld, ld, x, n, y + r);
    for (; r < rows; r++) y[r] = VG_NAME(vdot_w)(w + r * ld, x, n);
}


#undef VG_T
#undef VG_LOAD8
#undef VG_TOF
#undef VG_NAME
