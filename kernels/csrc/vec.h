/* 8-lane float vectors for the native CPU kernels, in GCC/Clang vector extensions: compiled with -march=native they
 * use the machine's vector FMA units (AVX2, AVX-512 or NEON) without intrinsics. */
#ifndef MOESERVE_VEC_H
#define MOESERVE_VEC_H

#include <stdint.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* a . b over n elements: 8-wide multiply-adds in order, one horizontal sum, then the tail. */
static inline float vdot(const float *a, const float *b, int64_t n) {
    v8f acc = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc += load8(a + i) * load8(b + i);
    float s = hsum8(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* o0[r] = (row r of w, stride ld) . x0 for r < 4: per row the same arithmetic as vdot, four chains at once. */
static inline void vdot4(const float *w, int64_t ld, const float *x0, int64_t n, float *o0) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
    int64_t h = 0;
    for (; h + 8 <= n; h += 8) {
        v8f y0 = load8(x0 + h);
        a0 += load8(w + h) * y0;
        a1 += load8(w + ld + h) * y0;
        a2 += load8(w + 2 * ld + h) * y0;
        a3 += load8(w + 3 * ld + h) * y0;
    }
    float s0 = hsum8(a0), s1 = hsum8(a1), s2 = hsum8(a2), s3 = hsum8(a3);
    for (; h < n; h++) {
        s0 += w[h] * x0[h];
        s1 += w[ld + h] * x0[h];
        s2 += w[2 * ld + h] * x0[h];
        s3 += w[3 * ld + h] * x0[h];
    }
    o0[0] = s0; o0[1] = s1; o0[2] = s2; o0[3] = s3;
}

/* y[r] = (row r of w, stride ld) . x for r < rows: four rows at a time, then one. */
static inline void vgemv(const float *w, int64_t rows, int64_t ld, const float *x, int64_t n, float *y) {
    int64_t r = 0;
    for (; r + 4 <= rows; r += 4) vdot4(w + r * ld, ld, x, n, y + r);
    for (; r < rows; r++) y[r] = vdot(w + r * ld, x, n);
}

/* y[c] += sum_j coef[j] * rows[j * ld + c] for c < n, j < n_rows: four rows per pass over y. */
static inline void vaxpy_rows(const float *rows, int64_t n_rows, int64_t ld, const float *coef, float *y, int64_t n) {
    int64_t j = 0;
    for (; j + 4 <= n_rows; j += 4) {
        const float *r0 = rows + j * ld, *r1 = r0 + ld, *r2 = r1 + ld, *r3 = r2 + ld;
        const float c0 = coef[j], c1 = coef[j + 1], c2 = coef[j + 2], c3 = coef[j + 3];
        int64_t c = 0;
        for (; c + 8 <= n; c += 8)
            store8(y + c, load8(y + c) + c0 * load8(r0 + c) + c1 * load8(r1 + c) + c2 * load8(r2 + c) +
                              c3 * load8(r3 + c));
        for (; c < n; c++) y[c] += c0 * r0[c] + c1 * r1[c] + c2 * r2[c] + c3 * r3[c];
    }
    for (; j < n_rows; j++) {
        const float *r0 = rows + j * ld, c0 = coef[j];
        for (int64_t c = 0; c < n; c++) y[c] += c0 * r0[c];
    }
}

/* exp on 8 lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial), ~1 ulp on [-87, 88]. */
static inline v8f vexp(v8f x) {
    const v8f hi = {88.3762626647949f, 88.3762626647949f, 88.3762626647949f, 88.3762626647949f,
                    88.3762626647949f, 88.3762626647949f, 88.3762626647949f, 88.3762626647949f};
    v8i over = x > hi, under = x < -hi;
    x = (v8f)((over & (v8i)hi) | (under & (v8i)(-hi)) | (~(over | under) & (v8i)x));
    const v8f magic = (v8f){0} + 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    v8f shifted = x * 1.44269504088896341f + magic;
    v8f n = shifted - magic;
    v8f r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    v8f p = (v8f){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    v8f e = p * (r * r) + r + 1.0f;
    v8i k = (v8i)shifted - (v8i)magic; /* the integer n in the low bits */
    v8i scale = (k + 127) << 23;
    return e * (v8f)scale;
}

#endif
