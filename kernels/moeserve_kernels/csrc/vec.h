/* 8-lane float vectors for the native CPU kernels, in GCC/Clang vector extensions: compiled with -march=native they
 * use the machine's vector FMA units (AVX2, AVX-512 or NEON) without intrinsics. */
#ifndef MOESERVE_VEC_H
#define MOESERVE_VEC_H

#include <stdint.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

/* bfloat16 (its raw bits, uint16_t) to float and back: widening is exact (the bits moved up 16), narrowing rounds to
 * nearest even as torch does (NaN -> 0x7fc0). The kernels read bf16 operands widened to float and compute in float,
 * so a bf16 call does the same arithmetic as the float32 call on the widened tensors. */
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));

static inline v8f load8_bf16(const uint16_t *p) {
#if defined(__AVX2__)
    /* one zero-extending load and a shift (GCC splits the generic conversion into halves and inserts) */
    return (v8f)_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
#else
    v8h h;
    memcpy(&h, p, sizeof h);
    return (v8f)(__builtin_convertvector(h, v8u) << 16);
#endif
}

static inline float bf16_to_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* dst[i] = src[i] widened, for n elements. */
static inline void widen_bf16(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) store8(dst + i, load8_bf16(src + i));
    for (; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

static inline float hsum8(v8f v) {
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

#if defined(__AVX512F__)
/* 32 vector registers and 16-lane FMA: vouter runs 16 columns at a time (each element's arithmetic is the same at any
 * width), and vgemm_rows takes four tokens per block of rows. */
#define MOESERVE_AVX512 1
typedef float v16f __attribute__((vector_size(64)));

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store16(float *p, v16f v) { memcpy(p, &v, sizeof v); }
#endif

#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

/* [hsum8(a0), ..., hsum8(a7)] with the same additions per vector as hsum8 (so bit for bit the same sums), in 12
 * vector shuffles and 7 adds instead of eight separate horizontal sums: lanes j and j + 4 first, then pairs of those,
 * then the two halves. */
static inline v8f hsum8x8(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
    const v8f t01 = SHUFFLE8(a0, a1, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(a0, a1, 4, 5, 6, 7, 12, 13, 14, 15);
    const v8f t23 = SHUFFLE8(a2, a3, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(a2, a3, 4, 5, 6, 7, 12, 13, 14, 15);
    const v8f t45 = SHUFFLE8(a4, a5, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(a4, a5, 4, 5, 6, 7, 12, 13, 14, 15);
    const v8f t67 = SHUFFLE8(a6, a7, 0, 1, 2, 3, 8, 9, 10, 11) + SHUFFLE8(a6, a7, 4, 5, 6, 7, 12, 13, 14, 15);
    /* per vector i: (v0 + v4) + (v1 + v5), then (v2 + v6) + (v3 + v7), interleaved */
    const v8f u03 = SHUFFLE8(t01, t23, 0, 2, 4, 6, 8, 10, 12, 14) + SHUFFLE8(t01, t23, 1, 3, 5, 7, 9, 11, 13, 15);
    const v8f u47 = SHUFFLE8(t45, t67, 0, 2, 4, 6, 8, 10, 12, 14) + SHUFFLE8(t45, t67, 1, 3, 5, 7, 9, 11, 13, 15);
    return SHUFFLE8(u03, u47, 0, 2, 4, 6, 8, 10, 12, 14) + SHUFFLE8(u03, u47, 1, 3, 5, 7, 9, 11, 13, 15);
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

/* The dot-product kernels (vdot, vdot4, ..., vgemm_rows, vgemv) over rows of float, and the same over rows of
 * bfloat16 (suffix _bf16: the rows widened in registers, so the same arithmetic as on the widened rows). */
#define VG_T float
#define VG_LOAD8 load8
#define VG_TOF(v) (v)
#define VG_NAME(name) name
#include "vgemm.h"
#define VG_T uint16_t
#define VG_LOAD8 load8_bf16
#define VG_TOF(v) bf16_to_f32(v)
#define VG_NAME(name) name##_bf16
#include "vgemm.h"

/* out[j] = rows[j] . x over n elements for eight rows anywhere in memory: per row the same arithmetic as vdot. */
static inline void vdot8rows(const float *const rows[8], const float *x, int64_t n, float *out) {
    v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
    int64_t h = 0;
    for (; h + 8 <= n; h += 8) {
        const v8f y = load8(x + h);
        a0 += load8(rows[0] + h) * y; a1 += load8(rows[1] + h) * y;
        a2 += load8(rows[2] + h) * y; a3 += load8(rows[3] + h) * y;
        a4 += load8(rows[4] + h) * y; a5 += load8(rows[5] + h) * y;
        a6 += load8(rows[6] + h) * y; a7 += load8(rows[7] + h) * y;
    }
    const v8f s = hsum8x8(a0, a1, a2, a3, a4, a5, a6, a7);
    for (int j = 0; j < 8; j++) {
        float t = s[j];
        for (int64_t i = h; i < n; i++) t += x[i] * rows[j][i];
        out[j] = t;
    }
}

/* y[c] += sum_j coef[j] * rows[j * ld + c] for c < n, j < n_rows: eight rows per pass over y, then four, then one.
 * (vouter below does the same for several vectors, keeping them in registers.) */
#define AXPY_TERMS8(y, k)                                                                                         \
    ((((((((y) + k##0 * w0) + k##1 * w1) + k##2 * w2) + k##3 * w3) + k##4 * w4) + k##5 * w5) + k##6 * w6) + k##7 * w7
#define AXPY_TERMS4(y, k) (((((y) + k##0 * w0) + k##1 * w1) + k##2 * w2) + k##3 * w3)

static inline void vaxpy_rows(const float *rows, int64_t n_rows, int64_t ld, const float *coef, float *y, int64_t n) {
    int64_t j = 0;
    for (; j + 8 <= n_rows; j += 8) {
        const float *r = rows + j * ld, *k = coef + j;
        const float c0 = k[0], c1 = k[1], c2 = k[2], c3 = k[3], c4 = k[4], c5 = k[5], c6 = k[6], c7 = k[7];
        int64_t c = 0;
        for (; c + 8 <= n; c += 8) {
            const v8f w0 = load8(r + c), w1 = load8(r + ld + c), w2 = load8(r + 2 * ld + c), w3 = load8(r + 3 * ld + c);
            const v8f w4 = load8(r + 4 * ld + c), w5 = load8(r + 5 * ld + c), w6 = load8(r + 6 * ld + c),
                      w7 = load8(r + 7 * ld + c);
            store8(y + c, AXPY_TERMS8(load8(y + c), c));
        }
        for (; c < n; c++) {
            const float w0 = r[c], w1 = r[ld + c], w2 = r[2 * ld + c], w3 = r[3 * ld + c], w4 = r[4 * ld + c],
                        w5 = r[5 * ld + c], w6 = r[6 * ld + c], w7 = r[7 * ld + c];
            y[c] = AXPY_TERMS8(y[c], c);
        }
    }
    for (; j + 4 <= n_rows; j += 4) {
        const float *r = rows + j * ld, *k = coef + j;
        const float c0 = k[0], c1 = k[1], c2 = k[2], c3 = k[3];
        int64_t c = 0;
        for (; c + 8 <= n; c += 8) {
            const v8f w0 = load8(r + c), w1 = load8(r + ld + c), w2 = load8(r + 2 * ld + c), w3 = load8(r + 3 * ld + c);
            store8(y + c, AXPY_TERMS4(load8(y + c), c));
        }
        for (; c < n; c++) {
            const float w0 = r[c], w1 = r[ld + c], w2 = r[2 * ld + c], w3 = r[3 * ld + c];
            y[c] = AXPY_TERMS4(y[c], c);
        }
    }
    for (; j < n_rows; j++) {
        const float *r0 = rows + j * ld, c0 = coef[j];
        for (int64_t c = 0; c < n; c++) y[c] += c0 * r0[c];
    }
}

/* y[c] += sum_j coef[j] * rows[j][c] over eight rows anywhere in memory, in row order: per element the same
 * arithmetic as adding the rows one after the other. */
static inline void vaxpy8rows(const float *const rows[8], const float *coef, float *y, int64_t n) {
    const float c0 = coef[0], c1 = coef[1], c2 = coef[2], c3 = coef[3], c4 = coef[4], c5 = coef[5], c6 = coef[6],
                c7 = coef[7];
    int64_t c = 0;
    for (; c + 8 <= n; c += 8) {
        const v8f w0 = load8(rows[0] + c), w1 = load8(rows[1] + c), w2 = load8(rows[2] + c), w3 = load8(rows[3] + c);
        const v8f w4 = load8(rows[4] + c), w5 = load8(rows[5] + c), w6 = load8(rows[6] + c), w7 = load8(rows[7] + c);
        store8(y + c, AXPY_TERMS8(load8(y + c), c));
    }
    for (; c < n; c++) {
        const float w0 = rows[0][c], w1 = rows[1][c], w2 = rows[2][c], w3 = rows[3][c], w4 = rows[4][c],
                    w5 = rows[5][c], w6 = rows[6][c], w7 = rows[7][c];
        y[c] = AXPY_TERMS8(y[c], c);
    }
}

/* y[p][c] += sum_j coef[p][j] * rows[j][c] for nt <= 4 vectors y + p * ldy (coefficients coef + p * ldc), the
 * rows' sum in row order per element (so each element gets the same operations as from vaxpy_rows), kept in
 * registers over all the rows: each row is read once per block of columns for all nt vectors, and y once. Called
 * with a constant nt, so the loops over p unroll. */
static inline __attribute__((always_inline)) void vouter(const float *rows, int64_t n_rows, int64_t ld,
                                                         const float *coef, int64_t ldc, float *y, int64_t ldy,
                                                         int64_t n, const int nt) {
    int64_t c = 0;
#ifdef MOESERVE_AVX512
    for (; c + 32 <= n; c += 32) {
        v16f a0[4], a1[4];
        for (int p = 0; p < nt; p++) a0[p] = load16(y + p * ldy + c), a1[p] = load16(y + p * ldy + c + 16);
        for (int64_t j = 0; j < n_rows; j++) {
            const v16f w0 = load16(rows + j * ld + c), w1 = load16(rows + j * ld + c + 16);
            for (int p = 0; p < nt; p++) {
                const float k = coef[p * ldc + j];
                a0[p] += k * w0;
                a1[p] += k * w1;
            }
        }
        for (int p = 0; p < nt; p++) store16(y + p * ldy + c, a0[p]), store16(y + p * ldy + c + 16, a1[p]);
    }
#endif
    for (; c + 16 <= n; c += 16) {
        v8f a0[4], a1[4];
        for (int p = 0; p < nt; p++) a0[p] = load8(y + p * ldy + c), a1[p] = load8(y + p * ldy + c + 8);
        for (int64_t j = 0; j < n_rows; j++) {
            const v8f w0 = load8(rows + j * ld + c), w1 = load8(rows + j * ld + c + 8);
            for (int p = 0; p < nt; p++) {
                const float k = coef[p * ldc + j];
                a0[p] += k * w0;
                a1[p] += k * w1;
            }
        }
        for (int p = 0; p < nt; p++) store8(y + p * ldy + c, a0[p]), store8(y + p * ldy + c + 8, a1[p]);
    }
    for (; c + 8 <= n; c += 8) {
        v8f a0[4];
        for (int p = 0; p < nt; p++) a0[p] = load8(y + p * ldy + c);
        for (int64_t j = 0; j < n_rows; j++) {
            const v8f w0 = load8(rows + j * ld + c);
            for (int p = 0; p < nt; p++) a0[p] += coef[p * ldc + j] * w0;
        }
        for (int p = 0; p < nt; p++) store8(y + p * ldy + c, a0[p]);
    }
    for (; c < n; c++)
        for (int p = 0; p < nt; p++) {
            float a = y[p * ldy + c];
            for (int64_t j = 0; j < n_rows; j++) a += coef[p * ldc + j] * rows[j * ld + c];
            y[p * ldy + c] = a;
        }
}

/* vouter for n_tok vectors y + p * ldy with coefficients coef + p * ldc, four at a time, then two, then one: per
 * vector the same arithmetic whatever n_tok is. */
static inline void vouter_tokens(const float *rows, int64_t n_rows, int64_t ld, const float *coef, int64_t ldc,
                                 float *y, int64_t ldy, int64_t n, int64_t n_tok) {
    int64_t p = 0;
    for (; p + 4 <= n_tok; p += 4) vouter(rows, n_rows, ld, coef + p * ldc, ldc, y + p * ldy, ldy, n, 4);
    for (; p + 2 <= n_tok; p += 2) vouter(rows, n_rows, ld, coef + p * ldc, ldc, y + p * ldy, ldy, n, 2);
    for (; p < n_tok; p++) vouter(rows, n_rows, ld, coef + p * ldc, ldc, y + p * ldy, ldy, n, 1);
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

/* p[i] = exp(p[i] - max) for n elements, 8 lanes at a time; returns their sum (attention's and the routers'
 * softmax). */
static inline float vexp_shifted(float *p, int64_t n, float max) {
    v8f total = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f e = vexp(load8(p + i) - max);
        store8(p + i, e);
        total += e;
    }
    if (i < n) { /* the last n - i elements, as one vector (its lanes past n count 0) */
        float tail[8];
        for (int64_t l = 0; l < 8; l++) tail[l] = i + l < n ? p[i + l] - max : 0.0f;
        store8(tail, vexp(load8(tail)));
        for (int64_t l = 0; l < 8; l++) {
            if (i + l < n) p[i + l] = tail[l];
            else tail[l] = 0.0f;
        }
        total += load8(tail);
    }
    return hsum8(total);
}

#endif
