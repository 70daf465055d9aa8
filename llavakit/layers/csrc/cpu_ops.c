/* The small fp32 operations between a decoder layer's matrix products, one pass each (x86 with AVX2 + FMA).
 * In eager PyTorch each is several ops: RMSNorm eight (pow, mean, add, rsqrt, two multiplies...), the rotary
 * embedding about ten (two slices, a negation, a concatenation, multiplies, an add), SwiGLU two passes and a
 * temporary. At batch 1 those calls cost about as much as a small model's matrix products (docs/performance.md);
 * in a prefill, torch's single-threaded silu on a (tokens, intermediate) tensor alone took a tenth of the step.
 *
 * Rows are given by a pointer and a row stride in elements; within a row, elements are contiguous. Outputs are
 * contiguous. `threads` > 1 splits rows over OpenMP threads (the caller decides from the work). */
#include <math.h>
#include <stdint.h>

/* exp's argument is capped below fp32's overflow (88.7): -ffast-math assumes no infinities, and x / (1 + inf)
 * came out NaN instead of 0; with the cap it is x / 5.5e34, as good as 0. */
#define EXP_MAX 80.0f

/* out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * w, as F.rms_norm computes it (sum of squares in fp32). */
void rms_norm(const float *x, int64_t x_stride, const float *w, float *out, int64_t rows, int64_t n, float eps,
              int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride;
        float *o = out + r * n;
        float ss = 0.0f;
        for (int64_t i = 0; i < n; i++) ss += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; i++) o[i] = (xr[i] * inv) * w[i];
    }
}

/* sum[r] = x[r] + y[r]; out[r] = rms_norm(sum[r]): the residual add and the next norm in one pass. */
void add_rms_norm(const float *x, int64_t x_stride, const float *y, int64_t y_stride, const float *w, float *sum,
                  float *out, int64_t rows, int64_t n, float eps, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * x_stride, *yr = y + r * y_stride;
        float *s = sum + r * n, *o = out + r * n;
        float ss = 0.0f;
        for (int64_t i = 0; i < n; i++) {
            s[i] = xr[i] + yr[i];
            ss += s[i] * s[i];
        }
        const float inv = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t i = 0; i < n; i++) o[i] = (s[i] * inv) * w[i];
    }
}

/* Rotate-half rotary embedding of `heads` heads of size D per token: with h = D / 2,
 * out[i] = x[i] cos[i] - x[i + h] sin[i] and out[i + h] = x[i + h] cos[i + h] + x[i] sin[i + h].
 * x: tokens rows of stride x_stride, heads at stride D within a row; cos/sin: (tokens, D) contiguous. */
void rotary(const float *x, int64_t x_stride, const float *cos_, const float *sin_, float *out, int64_t tokens,
            int64_t heads, int64_t D, int threads) {
    const int64_t h = D / 2;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const float *c = cos_ + t * D, *s = sin_ + t * D;
        for (int64_t k = 0; k < heads; k++) {
            const float *xr = x + t * x_stride + k * D;
            float *o = out + (t * heads + k) * D;
            for (int64_t i = 0; i < h; i++) {
                o[i] = xr[i] * c[i] - xr[i + h] * s[i];
                o[i + h] = xr[i + h] * c[i + h] + xr[i] * s[i + h];
            }
        }
    }
}

/* out[r] = silu(gate[r]) * up[r], silu(g) = g / (1 + exp(-g)). */
void silu_and_mul(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride, float *out,
                  int64_t rows, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *g = gate + r * gate_stride, *u = up + r * up_stride;
        float *o = out + r * n;
        for (int64_t i = 0; i < n; i++) o[i] = g[i] / (1.0f + expf(fminf(-g[i], EXP_MAX))) * u[i];
    }
}

/* CLIP's QuickGELU, x * sigmoid(1.702 x), of n contiguous elements. */
void quick_gelu(const float *x, float *out, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t i = 0; i < n; i++) out[i] = x[i] / (1.0f + expf(fminf(-1.702f * x[i], EXP_MAX)));
}
