/* Weight-only int8/int4 matrix-vector products on x86 CPUs with AVX2 + FMA, reading the compressed-tensors
 * pack-quantized bytes as they are stored (see llavakit/quant/formats.py): each byte is offset binary, int8
 * values q + 128, int4 values two per byte, low nibble first, q + 8. Written by hand because a measured
 * dequantize-then-GEMV, torch._weight_int8pack_mm and inductor's generated loop were all slower than an fp32
 * GEMV on this kind of CPU (docs/quantization.md has the numbers).
 *
 * y[b, n] = sum_g scale[n, g] * sum_{k in group g} x[b, k] * q[n, k]   (fp32 accumulation)
 * Requires K % 32 == 0 and group % 32 == 0 (the caller checks). */
#include <immintrin.h>
#include <stdint.h>

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The 32 signed values of one 32-element block: elements 0..15 in *lo, 16..31 in *hi. */
static inline void load_block(const uint8_t *row, int64_t k, int bits, __m128i *lo, __m128i *hi) {
    if (bits == 8) {
        const __m128i flip = _mm_set1_epi8((char)0x80);  /* offset binary -> two's complement */
        *lo = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(row + k)), flip);
        *hi = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(row + k + 16)), flip);
    } else {
        const __m128i mask = _mm_set1_epi8(0x0F), eight = _mm_set1_epi8(8);
        __m128i v = _mm_loadu_si128((const __m128i *)(row + k / 2));
        __m128i l = _mm_and_si128(v, mask), h = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
        *lo = _mm_sub_epi8(_mm_unpacklo_epi8(l, h), eight);
        *hi = _mm_sub_epi8(_mm_unpackhi_epi8(l, h), eight);
    }
}

static inline __m256 widen(__m128i q8) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)); }

static inline void qgemv(const float *x, const uint8_t *w, const float *scale, float *y, int64_t B, int64_t N,
                         int64_t K, int64_t group, int bits, int nthreads) {
    const int64_t groups = K / group, row_bytes = K * bits / 8;
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        const float *s = scale + n * groups;
        for (int64_t b = 0; b < B; b++) {
            const float *xb = x + b * K;
            __m256 total = _mm256_setzero_ps();  /* scaled per group as vectors: one horizontal sum per row */
            for (int64_t g = 0; g < groups; g++) {
                __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
                __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
                for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
                    __m128i lo, hi;
                    load_block(row, k, bits, &lo, &hi);
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + k), widen(lo), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + k + 8), widen(_mm_srli_si128(lo, 8)), a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + k + 16), widen(hi), a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xb + k + 24), widen(_mm_srli_si128(hi, 8)), a3);
                }
                __m256 part = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
                total = _mm256_fmadd_ps(_mm256_set1_ps(s[g]), part, total);
            }
            y[b * N + n] = hsum(total);
        }
    }
}

void qgemv_int8(const float *x, const uint8_t *w, const float *scale, float *y, int64_t B, int64_t N, int64_t K,
                int64_t group, int nthreads) {
    qgemv(x, w, scale, y, B, N, K, group, 8, nthreads);
}

void qgemv_int4(const float *x, const uint8_t *w, const float *scale, float *y, int64_t B, int64_t N, int64_t K,
                int64_t group, int nthreads) {
    qgemv(x, w, scale, y, B, N, K, group, 4, nthreads);
}

/* Output rows [n0, n1) of the weight in fp32, row-major (n1 - n0, K): out = scale * q. The many-row path
 * (kernels.cpu_blocked) multiplies each such block with one float GEMM. Single-threaded on purpose: an OpenMP
 * region here leaves its threads spinning against torch's while the GEMM runs (measured slower on 2 cores). */
static inline void dequant(const uint8_t *w, const float *scale, float *out, int64_t n0, int64_t n1, int64_t K,
                           int64_t group, int bits) {
    const int64_t groups = K / group, row_bytes = K * bits / 8;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *row = w + n * row_bytes;
        const float *s = scale + n * groups;
        float *o = out + (n - n0) * K;
        for (int64_t g = 0; g < groups; g++) {
            const __m256 sg = _mm256_set1_ps(s[g]);
            for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
                __m128i lo, hi;
                load_block(row, k, bits, &lo, &hi);
                _mm256_storeu_ps(o + k, _mm256_mul_ps(sg, widen(lo)));
                _mm256_storeu_ps(o + k + 8, _mm256_mul_ps(sg, widen(_mm_srli_si128(lo, 8))));
                _mm256_storeu_ps(o + k + 16, _mm256_mul_ps(sg, widen(hi)));
                _mm256_storeu_ps(o + k + 24, _mm256_mul_ps(sg, widen(_mm_srli_si128(hi, 8))));
            }
        }
    }
}

void dequant_int8(const uint8_t *w, const float *scale, float *out, int64_t n0, int64_t n1, int64_t K,
                  int64_t group) {
    dequant(w, scale, out, n0, n1, K, group, 8);
}

void dequant_int4(const uint8_t *w, const float *scale, float *out, int64_t n0, int64_t n1, int64_t K,
                  int64_t group) {
    dequant(w, scale, out, n0, n1, K, group, 4);
}
