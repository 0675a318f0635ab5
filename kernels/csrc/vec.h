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
