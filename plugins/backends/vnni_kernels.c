/* Mono Quant ``cpu-vnni`` backend: int4-group weights x int8 activations (W4A8) with
 * AVX512-VNNI.
 *
 * Compiled on first use by plugins/backends/cpu_vnni.py (``cc -O3 -mavx512f -mavx512bw
 * -mavx512dq -mavx512vl -mavx512vnni -shared``) and called through ctypes; every pointer comes
 * from a contiguous torch tensor whose shape the Python side has checked.
 *
 * Activations: per token (row) symmetric int8, exactly the ``activations="dynamic"`` contract of
 * monoquant_core.qtensor.quantize_per_token: scale = max|x| / 127 (1 for an all-zero row),
 * codes = round-half-even(x / scale) clamped to -127..127. With the same codes and integer dot
 * products per group, the outputs equal the reference backend's up to float rounding.
 *
 * Weights: codes u in 0..15 with w = u * s[n, g] + o[n, g] (o = -zero * scale), packed in chunks
 * of 128 inputs: byte j of chunk c of a row holds u[128c + j] | u[128c + 64 + j] << 4, so one
 * 64-byte load and two masks give two 64-code vectors in input order (K % 128 == 0). Then
 *   y[t, n] = sx[t] * sum_g (s[n, g] * sum_{k in g} u[n, k] xq[t, k] + o[n, g] * xsum[t, g])
 * where xsum[t, g] is the sum of the token's codes over group g; vpdpbusd multiplies the
 * unsigned weight codes by the signed activation codes.
 *
 * Loop order: threads split the output rows in blocks of ROWS; each block is multiplied with
 * every token block of up to TOKENS tokens while it sits in L1/L2, so the weights are read from
 * memory once per call whatever M is, and prefetched PF_AHEAD bytes ahead on the first pass.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define TOKENS 4
#define ROWS 8
#ifndef PF_AHEAD
#define PF_AHEAD 4096
#endif

int mq_abi_version(void) { return 1; }

/* Per-token int8 codes of x [M, K] into q [M, K], scales into sx [M]. */
static void quantize_rows(const float *x, int64_t m, int64_t k, int8_t *q, float *sx) {
    for (int64_t t = 0; t < m; t++) {
        const float *xr = x + t * k;
        int8_t *qr = q + t * k;
        __m512 vmax = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_loadu_ps(xr + i)));
        float amax = _mm512_reduce_max_ps(vmax);
        for (; i < k; i++) {
            float a = fabsf(xr[i]);
            if (a > amax) amax = a;
        }
        float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
        sx[t] = scale;
        __m512 vs = _mm512_set1_ps(scale);
        __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
        for (i = 0; i + 16 <= k; i += 16) {
            __m512i r = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(xr + i), vs));
            r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
            _mm_storeu_si128((__m128i *)(qr + i), _mm512_cvtepi32_epi8(r));
        }
        for (; i < k; i++) {
            float v = nearbyintf(xr[i] / scale);
            qr[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
        }
    }
}

/* Sums of the int8 codes over each group: xsum [M, K / gs] (exact in float). */
static void group_sums(const int8_t *xq, int64_t m, int64_t k, int64_t gs, float *xsum) {
    int64_t g = k / gs;
    for (int64_t t = 0; t < m; t++)
        for (int64_t i = 0; i < g; i++) {
            int32_t acc = 0;
            for (int64_t j = 0; j < gs; j++) acc += xq[t * k + i * gs + j];
            xsum[t * g + i] = (float)acc;
        }
}

#define INLINE static inline __attribute__((always_inline))

/* The scales of chunk c for its low and high 64 codes (groups of 32, 64, or >= 128). */
INLINE void chunk_scales(const float *sr, int64_t c, int64_t gs, __m512 *slo, __m512 *shi) {
    if (gs >= 128) {
        *slo = *shi = _mm512_set1_ps(sr[(c * 128) >> (gs == 256 ? 8 : 7)]);
    } else if (gs == 64) {
        *slo = _mm512_set1_ps(sr[2 * c]);
        *shi = _mm512_set1_ps(sr[2 * c + 1]);
    } else { /* gs == 32: lanes 0-7 hold the first group of 32, lanes 8-15 the second */
        const __m512i il = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        const __m512i ih = _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2);
        __m512 s4 = _mm512_castps128_ps512(_mm_loadu_ps(sr + 4 * c));
        *slo = _mm512_permutexvar_ps(il, s4);
        *shi = _mm512_permutexvar_ps(ih, s4);
    }
}

/* Chunk c (128 inputs) of one weight row against NT tokens, accumulated into f[j]. */
INLINE void chunk_dots(const uint8_t *wr, const int8_t *xb, int64_t k, const float *sr,
                       int64_t gs, int prefetch, int64_t c, const int NT, __m512 f[TOKENS]) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    if (PF_AHEAD && prefetch) _mm_prefetch((const char *)(wr + 64 * c) + PF_AHEAD, _MM_HINT_T0);
    __m512i pk = _mm512_loadu_si512((const void *)(wr + 64 * c));
    __m512i lo = _mm512_and_si512(pk, nib);
    __m512i hi = _mm512_and_si512(_mm512_srli_epi16(pk, 4), nib);
    __m512 slo, shi;
    chunk_scales(sr, c, gs, &slo, &shi);
    for (int j = 0; j < NT; j++) {
        const int8_t *xr = xb + j * k + 128 * c;
        __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo,
                                        _mm512_loadu_si512((const void *)xr));
        if (gs >= 128) { /* one scale for the chunk: add the integers first */
            a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512((const void *)(xr + 64)));
            f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), slo, f[j]);
        } else {
            __m512i h = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi,
                                            _mm512_loadu_si512((const void *)(xr + 64)));
            f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), slo, f[j]);
            f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h), shi, f[j]);
        }
    }
}

/* One weight row against NT tokens. NT is a compile-time constant at every call, so the
 * accumulators stay in registers; two accumulators per token (even / odd chunks) halve the
 * loop-carried FMA latency chain, which bounds the one-token case. */
INLINE void row_dots(const uint8_t *wr, const int8_t *xb, int64_t k, const float *sr, int64_t gs,
                     int prefetch, const int NT, __m512 out[TOKENS]) {
    __m512 f0[TOKENS], f1[TOKENS];
    for (int j = 0; j < NT; j++) f0[j] = f1[j] = _mm512_setzero_ps();
    const int64_t chunks = k / 128;
    int64_t c = 0;
    for (; c + 2 <= chunks; c += 2) {
        chunk_dots(wr, xb, k, sr, gs, prefetch, c, NT, f0);
        chunk_dots(wr, xb, k, sr, gs, prefetch, c + 1, NT, f1);
    }
    if (c < chunks) chunk_dots(wr, xb, k, sr, gs, prefetch, c, NT, f0);
    for (int j = 0; j < NT; j++) out[j] = _mm512_add_ps(f0[j], f1[j]);
}

/* y [M, N] = sx[t] * sum_g (s[n,g] * sum_{k in g} u[n,k] xq[t,k] + o[n,g] * xsum[t,g]).
 * gs in {32, 64, 128, 256}; K % 128 == 0 and K % gs == 0. */
void mq_w4a8(const float *x, int64_t m, int64_t k, int8_t *xq, float *sx, float *xsum,
             const uint8_t *w, const float *s, const float *o, int64_t n, int64_t gs, float *y,
             int nthreads) {
    quantize_rows(x, m, k, xq, sx);
    group_sums(xq, m, k, gs, xsum);
    const int64_t g = k / gs, rowbytes = k / 2;
    int64_t nblocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t b = 0; b < nblocks; b++) {
        int64_t r1 = (b + 1) * ROWS < n ? (b + 1) * ROWS : n;
        for (int64_t t0 = 0; t0 < m; t0 += TOKENS) {
            int nt = m - t0 < TOKENS ? (int)(m - t0) : TOKENS;
            const int8_t *xb = xq + t0 * k;
            for (int64_t r = b * ROWS; r < r1; r++) {
                const uint8_t *wr = w + r * rowbytes;
                const float *sr = s + r * g, *orow = o + r * g;
                __m512 f[TOKENS];
                int pf = t0 == 0;
                switch (nt) {
                case 1: row_dots(wr, xb, k, sr, gs, pf, 1, f); break;
                case 2: row_dots(wr, xb, k, sr, gs, pf, 2, f); break;
                case 3: row_dots(wr, xb, k, sr, gs, pf, 3, f); break;
                default: row_dots(wr, xb, k, sr, gs, pf, 4, f); break;
                }
                for (int j = 0; j < nt; j++) {
                    const float *xs = xsum + (t0 + j) * g;
                    __m512 od = _mm512_setzero_ps();
                    int64_t i = 0;
                    for (; i + 16 <= g; i += 16)
                        od = _mm512_fmadd_ps(_mm512_loadu_ps(orow + i), _mm512_loadu_ps(xs + i), od);
                    if (i < g) {
                        __mmask16 mk = (__mmask16)((1u << (g - i)) - 1u);
                        od = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, orow + i),
                                             _mm512_maskz_loadu_ps(mk, xs + i), od);
                    }
                    float acc = _mm512_reduce_add_ps(f[j]) + _mm512_reduce_add_ps(od);
                    y[(t0 + j) * n + r] = acc * sx[t0 + j];
                }
            }
        }
    }
}
