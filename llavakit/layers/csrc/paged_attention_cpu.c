/* Attention of single query rows over a paged KV cache, read in place (fp32, x86 with AVX2 + FMA). Written by
 * hand because every torch formulation first copies each sequence's whole history out of its blocks, for
 * every layer at every step: at batch 32 that copy took as long as the attention itself (docs/performance.md).
 *
 * Row r attends, for each of its H query heads, to positions [lo, ends[r]) of sequence seqs[r], where
 * lo = max(0, ends[r] - window) (window 0: no window); query head h reads kv head h / (H / Hkv).
 * Cache: (num_blocks, block_size, Hkv, D), D % 8 == 0; position p of sequence s is at block
 * tables[s, p / block_size], offset p % block_size. Per row: the scores, eight positions at a time; their
 * softmax; then the weighted sum of values. */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* [sum(a0), ..., sum(a7)] */
static inline __m256 hsum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6,
                           __m256 a7) {
    __m256 s0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 s4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0123, s4567, 0x20), _mm256_permute2f128_ps(s0123, s4567, 0x31));
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 s = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* scores[i] = q . k[i] + offset for the n positions, eight at a time. */
static void scores_of(const float *q, const float *const *k, int64_t offset, int64_t n, int64_t D, float *scores) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int64_t c = 0; c < D; c += 8) {
            const __m256 qc = _mm256_loadu_ps(q + c);
            for (int j = 0; j < 8; j++) a[j] = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k[i + j] + offset + c), a[j]);
        }
        _mm256_storeu_ps(scores + i, hsum8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
    }
    for (; i < n; i++) scores[i] = dot(q, k[i] + offset, D);
}

static void softmax(float *x, int64_t n, float scale) {
    float m = -FLT_MAX, total = 0.0f;
    for (int64_t i = 0; i < n; i++) m = x[i] > m ? x[i] : m;
    for (int64_t i = 0; i < n; i++) {
        x[i] = expf((x[i] - m) * scale);
        total += x[i];
    }
    const float inv = 1.0f / total;
    for (int64_t i = 0; i < n; i++) x[i] *= inv;
}

/* Query heads of kv heads [h0, h1) of one row (q, out: (H, D)) over positions [lo, end) of its sequence.
 * Positions are visited in cache order, all the range's heads of a position together, so each block is
 * read front to back once per pass. k, v: room for n row pointers; scores: for (h1 - h0) * G * n floats. */
static void attend(const float *q, const float *kc, const float *vc, const int64_t *table, int64_t lo,
                   int64_t end, float *out, int64_t h0, int64_t h1, int64_t G, int64_t Hkv, int64_t D, int64_t bs,
                   float scale, const float **k, const float **v, float *scores) {
    const int64_t n = end - lo, heads = (h1 - h0) * G;
    q += h0 * G * D;
    out += h0 * G * D;
    memset(out, 0, heads * D * sizeof(float));
    if (n <= 0) return;
    for (int64_t p = lo; p < end; p++) {
        const int64_t row = (table[p / bs] * bs + p % bs) * Hkv * D;
        k[p - lo] = kc + row;
        v[p - lo] = vc + row;
    }
    for (int64_t i = 0; i < n; i += 8) {  /* eight positions, then every head over them */
        const int64_t m = n - i < 8 ? n - i : 8;
        for (int64_t h = 0; h < heads; h++)
            scores_of(q + h * D, k + i, (h0 + h / G) * D, m, D, scores + h * n + i);
    }
    for (int64_t h = 0; h < heads; h++) softmax(scores + h * n, n, scale);
    for (int64_t i = 0; i < n; i++) {
        for (int64_t h = 0; h < heads; h++) {
            const __m256 w = _mm256_set1_ps(scores[h * n + i]);
            const float *vh = v[i] + (h0 + h / G) * D;
            float *o = out + h * D;
            for (int64_t c = 0; c < D; c += 8)
                _mm256_storeu_ps(o + c, _mm256_fmadd_ps(w, _mm256_loadu_ps(vh + c), _mm256_loadu_ps(o + c)));
        }
    }
}

/* q, out: (N, H, D); rows, seqs, ends: (R,); tables: (S, width). Rows are split over kv heads only when
 * there are fewer rows than threads. */
void paged_attention_rows(const float *q, const float *kc, const float *vc, const int64_t *tables, int64_t width,
                          const int64_t *rows, const int64_t *seqs, const int64_t *ends, int64_t R, float *out,
                          int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t window, float scale,
                          int nthreads) {
    const int64_t G = H / Hkv, parts = R < nthreads ? Hkv : 1, per = Hkv / parts;
    int64_t longest = 0;
    for (int64_t r = 0; r < R; r++) longest = ends[r] > longest ? ends[r] : longest;
    if (window > 0 && window < longest) longest = window;
    #pragma omp parallel num_threads(nthreads)
    {
        const float **k = malloc(2 * longest * sizeof(float *)), **v = k + longest;
        float *scores = malloc(per * G * longest * sizeof(float));
        #pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < R * parts; t++) {
            const int64_t r = t / parts, h0 = t % parts * per, end = ends[r];
            const int64_t lo = window > 0 && end > window ? end - window : 0;
            attend(q + rows[r] * H * D, kc, vc, tables + seqs[r] * width, lo, end, out + rows[r] * H * D, h0,
                   h0 + per, G, Hkv, D, bs, scale, k, v, scores);
        }
        free((void *)k);
        free(scores);
    }
}

/* The step's new keys and values into the cache: row r of k and v (each `width` = Hkv * D contiguous floats,
 * rows k_stride / v_stride apart) goes to flattened cache row slots[r]; rows with slot -1 (padding) are skipped.
 * One call instead of two index_copy_ and their views per layer. */
void write_kv_rows(const float *k, int64_t k_stride, const float *v, int64_t v_stride, float *kc, float *vc,
                   const int64_t *slots, int64_t n, int64_t width) {
    for (int64_t r = 0; r < n; r++) {
        const int64_t s = slots[r];
        if (s < 0) continue;
        memcpy(kc + s * width, k + r * k_stride, width * sizeof(float));
        memcpy(vc + s * width, v + r * v_stride, width * sizeof(float));
    }
}
