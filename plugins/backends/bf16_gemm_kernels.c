/* Mono Quant: int8 and int4-group weight-only GEMMs with AVX512-BF16 dot products, for many
 * input rows.
 *
 * Compiled on first use by plugins/backends/native.py (``cc -O3 -mavx512f -mavx512bw
 * -mavx512bf16 -shared``, with -fopenmp where the compiler has it) and called through ctypes;
 * every pointer comes from a contiguous torch tensor.
 *
 * out[m][n] = s[n] * sum_k x[m][k] * q[n][k] + bias[n], x in bfloat16, q the int8 codes of the
 * row-major weight [N, K] (as stored: no second layout is kept), float32 accumulation,
 * the per-channel scale and the bias applied to the float32 sums, the output rounded once
 * (bfloat16, round to nearest even) or written in float32.
 *
 * The int8 codes are exact in bfloat16, so the only roundings are the input's (if it was
 * float32) and the output's: more accurate than converting q * s into bfloat16 first.
 *
 * W8A8 / W4A8 (the ``_q`` entry points): each input row is first quantized to its per-token
 * int8 codes (scale = max |x| / 127, 1 for a zero row; x / scale rounded to nearest even,
 * clamped to +-127: the reference's codes, exact in bfloat16) while it is packed, and the
 * sums are multiplied by weight scale x row scale in the epilogue with the bias: one rounding.
 *
 * int4-group: the same GEMM, each panel converted from the stored codes (one byte per k-pair,
 * low nibble first) into bfloat16 of the dequantized weight (u - z) * s, rounded once, as the
 * conversion path it replaces did; no scale on the sums.
 *
 * Loop order: threads split the output columns in panels of 64. Each panel's 64 weight rows
 * are converted once per call into bfloat16 pairs [K/2][64][2] (16x16 transposes of 4-byte
 * groups, a byte shuffle, a widening), the layout vdpbf16ps takes; every tile of up to 6 input
 * rows is then multiplied with it (24 accumulators: 6 rows x 4 vectors of 16 columns, chosen
 * over 12 rows x 2 vectors in an A/B of the two builds while tuning; bench/kernels.py).
 * The input rows are packed per tile as [K/2][rows] pairs first, so the broadcasts read one
 * stream (rows 8 KiB apart at K = 4096 fall into one L1 set). The weight rows of a panel are
 * read 64 bytes at a time each, with a software prefetch 512 bytes ahead. Requires
 * K % 64 == 0 and N % 64 == 0; the Python side sends other shapes to the other kernels.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int mq_abi_version(void) { return 3; }

#define MR 6  /* input rows per tile */
#define NP 64 /* weight rows (output columns) per panel */
#define NV (NP / 16)
/* bytes ahead in each of the 64 weight rows a panel reads at once (more streams than the
 * hardware prefetcher follows); 512 was the best of 256/512/1024 while tuning, the effect on
 * whole models is in bench/e2e.py */
#define PREFETCH 512

#include "avx512_transpose.h"

/* 16 pairs of int8 (32 bytes: lanes 0-1 of v, or 2-3 when high) -> 32 bfloat16 */
static inline __m512i widen_pairs(__m512i v, int high) {
    const __m128i a = high ? _mm512_extracti32x4_epi32(v, 2) : _mm512_extracti32x4_epi32(v, 0);
    const __m128i b = high ? _mm512_extracti32x4_epi32(v, 3) : _mm512_extracti32x4_epi32(v, 1);
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(a));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

/* NP int8 weight rows (row stride k) -> bfloat16 [k/2][NP][2] (exact: the codes are integers) */
static void convert_panel(const int8_t *q, int64_t k, uint16_t *dst) {
    /* within each 128-bit lane (4 rows x 4 bytes): the (k, k+1) pairs first, then (k+2, k+3) */
    const __m512i pairs = _mm512_set4_epi32(0x0F0E0B0A, 0x07060302, 0x0D0C0908, 0x05040100);
    const __m512i halves = _mm512_set_epi64(7, 5, 3, 1, 6, 4, 2, 0);
    for (int64_t c = 0; c < k; c += 64)
        for (int h = 0; h < NP / 16; h++) {
            __m512i r[16];
            load_transposed((const uint8_t *)q + h * 16 * k + c, k, r);
            for (int u = 0; u < 16; u++) {
                __m512i v = _mm512_permutexvar_epi64(halves, _mm512_shuffle_epi8(r[u], pairs));
                const int64_t j = (c + 4 * u) / 2; /* the first of the two k-pairs */
                _mm512_storeu_si512(dst + j * 2 * NP + h * 32, widen_pairs(v, 0));
                _mm512_storeu_si512(dst + (j + 1) * 2 * NP + h * 32, widen_pairs(v, 1));
            }
        }
}

/* NP rows of stored int4 codes (row stride k / 2 bytes, low nibble first: one byte per
 * k-pair) -> bfloat16 [k/2][NP][2] of the dequantized weights (u - z) * s, rounded once.
 * st, zt: the per-group scale and zero * scale transposed, [groups][n] (this panel's rows at
 * st + row0); flip: symmetric codes, stored signed (u = code ^ 8). k % 128 == 0, gs >= 32. */
static void convert_panel_int4(const uint8_t *c, int64_t k, int64_t gs, const float *st,
                               const float *zt, int64_t n, int flip, uint16_t *dst) {
    const int64_t half = k / 2;
    const __m512i m15 = _mm512_set1_epi32(15), x8 = _mm512_set1_epi32(flip ? 8 : 0);
    const __m512i mff = _mm512_set1_epi32(0xff);
    /* lanes (row, nibble): rows 0-7 from lo/hi, then rows 8-15 */
    const __m512i idx0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i idx1 =
        _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    const __m512i dup0 = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
    const __m512i dup1 =
        _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
    for (int64_t cb = 0; cb < half; cb += 64) { /* 64 bytes: 64 k-pairs of each row */
        for (int h = 0; h < NP / 16; h++) {
            __m512i r[16];
            load_transposed(c + h * 16 * half + cb, half, r);
            int64_t g = -1;
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, z0 = s0, z1 = s0;
            for (int u = 0; u < 16; u++) {
                for (int t = 0; t < 4; t++) {
                    const int64_t j = cb + 4 * u + t; /* k-pair: k = 2j, 2j + 1 */
                    if ((2 * j) / gs != g) {
                        g = (2 * j) / gs;
                        const __m512 sv = _mm512_loadu_ps(st + g * n + h * 16);
                        const __m512 zv = _mm512_loadu_ps(zt + g * n + h * 16);
                        s0 = _mm512_permutexvar_ps(dup0, sv);
                        s1 = _mm512_permutexvar_ps(dup1, sv);
                        z0 = _mm512_permutexvar_ps(dup0, zv);
                        z1 = _mm512_permutexvar_ps(dup1, zv);
                    }
                    const __m512i v = _mm512_and_si512(_mm512_srli_epi32(r[u], 8 * t), mff);
                    const __m512i lo = _mm512_xor_si512(_mm512_and_si512(v, m15), x8);
                    const __m512i hi = _mm512_xor_si512(_mm512_srli_epi32(v, 4), x8);
                    const __m512 w0 = _mm512_fmsub_ps(
                        _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, idx0, hi)), s0, z0);
                    const __m512 w1 = _mm512_fmsub_ps(
                        _mm512_cvtepi32_ps(_mm512_permutex2var_epi32(lo, idx1, hi)), s1, z1);
                    _mm512_storeu_si512(dst + j * 2 * NP + h * 32,
                                        (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
                }
            }
        }
    }
}

/* mr rows (packed [kp][mr] pairs) x one panel: NP outputs per row, scaled, biased, stored */
static inline __attribute__((always_inline)) void
tile(const int mr, const uint32_t *a, const uint16_t *b, int64_t kp, const float *sc,
     const float *rs, const float *bias, void *out, int64_t ldo, int out_f32) {
    __m512 acc[MR][NV];
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < NV; v++) acc[r][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < kp; j++) {
        __m512bh bv[NV];
        for (int v = 0; v < NV; v++) bv[v] = (__m512bh)_mm512_loadu_si512(b + j * 2 * NP + v * 32);
        for (int r = 0; r < mr; r++) {
            const __m512bh x = (__m512bh)_mm512_set1_epi32((int)a[j * mr + r]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], x, bv[v]);
        }
    }
    const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
    for (int v = 0; v < NV; v += 2) {
        const __m512 s0 = sc ? _mm512_loadu_ps(sc + v * 16) : one;
        const __m512 s1 = sc ? _mm512_loadu_ps(sc + v * 16 + 16) : one;
        const __m512 c0 = bias ? _mm512_loadu_ps(bias + v * 16) : zero;
        const __m512 c1 = bias ? _mm512_loadu_ps(bias + v * 16 + 16) : zero;
        for (int r = 0; r < mr; r++) {
            __m512 f0 = s0, f1 = s1;
            if (rs) { /* per-token input scale: weight scale x row scale */
                const __m512 rr = _mm512_set1_ps(rs[r]);
                f0 = _mm512_mul_ps(s0, rr);
                f1 = _mm512_mul_ps(s1, rr);
            }
            const __m512 y0 = _mm512_fmadd_ps(acc[r][v], f0, c0);
            const __m512 y1 = _mm512_fmadd_ps(acc[r][v + 1], f1, c1);
            if (out_f32) {
                float *o = (float *)out + r * ldo + v * 16;
                _mm512_storeu_ps(o, y0);
                _mm512_storeu_ps(o + 16, y1);
            } else { /* round to nearest even, NaN kept a NaN (vcvtne2ps2bf16) */
                _mm512_storeu_si512((uint16_t *)out + r * ldo + v * 16,
                                    (__m512i)_mm512_cvtne2ps_pbh(y1, y0));
            }
        }
    }
}

/* What a panel is converted from: int8 codes (scale on the sums) or int4 codes with
 * per-group parameters (dequantized in the conversion). */
typedef struct {
    const int8_t *q8;
    const uint8_t *q4;
    int64_t gs;
    const float *st, *zt;
    int flip;
} weights_t;

/* One bfloat16 row [k] (k % 32 == 0) -> its per-token int8 codes as bfloat16 into dst (k
 * values), its scale returned. */
static float quantize_row(const uint16_t *x, int64_t k, uint16_t *dst) {
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i)));
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16))));
    }
    const float amax = _mm512_reduce_max_ps(vmax);
    const float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 vs = _mm512_set1_ps(scale), lo = _mm512_set1_ps(-127.0f),
                 hi = _mm512_set1_ps(127.0f);
    for (int64_t i = 0; i < k; i += 16) {
        const __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i)));
        __m512 v = _mm512_div_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), vs);
        v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        /* an integer of at most 7 bits: its float's top 16 bits are its bfloat16, exactly */
        _mm256_storeu_si256((__m256i *)(dst + i),
                            _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
    }
    return scale;
}

/* rs: NULL, or [m] floats that receive each row's per-token scale (the rows are quantized) */
static int gemm(const uint16_t *x, int64_t m, int64_t k, int64_t n, const weights_t *w,
                const float *scale, float *rs, const float *bias, void *out, int out_f32,
                int nthreads) {
    const int64_t kp = k / 2, panels = n / NP, tiles = (m + MR - 1) / MR;
    uint32_t *ap = aligned_alloc(64, ((size_t)m * kp * 4 + 63) / 64 * 64);
    int64_t *start = malloc((size_t)(tiles + 1) * sizeof(int64_t));
    uint16_t *qrow = rs ? aligned_alloc(64, (size_t)k * 2 + 64) : NULL;
    if (!ap || !start || (rs && !qrow)) {
        free(ap);
        free(start);
        free(qrow);
        return -1;
    }
    for (int64_t t = 0, i = 0; t < tiles; t++) { /* balanced tiles of at most MR rows */
        const int64_t r = (m - i + (tiles - t) - 1) / (tiles - t);
        start[t] = i;
        uint32_t *dst = ap + i * kp;
        for (int64_t rr = 0; rr < r; rr++) {
            const uint16_t *xr = x + (i + rr) * k;
            if (rs) {
                rs[i + rr] = quantize_row(xr, k, qrow);
                xr = qrow;
            }
            const uint32_t *row = (const uint32_t *)xr;
            for (int64_t j = 0; j < kp; j++) dst[j * r + rr] = row[j];
        }
        i += r;
    }
    free(qrow);
    start[tiles] = m;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        uint16_t *panel = aligned_alloc(64, (size_t)kp * NP * 4);
        if (!panel) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (!panel) continue;
            if (w->q8)
                convert_panel(w->q8 + p * NP * k, k, panel);
            else
                convert_panel_int4(w->q4 + p * NP * (k / 2), k, w->gs, w->st + p * NP,
                                   w->zt + p * NP, n, w->flip, panel);
            const float *sc = scale ? scale + p * NP : NULL, *bi = bias ? bias + p * NP : NULL;
            for (int64_t t = 0; t < tiles; t++) {
                const int64_t i = start[t], r = start[t + 1] - i;
                void *o = out_f32 ? (void *)((float *)out + i * n + p * NP)
                                  : (void *)((uint16_t *)out + i * n + p * NP);
                const uint32_t *a = ap + i * kp;
                const float *ri = rs ? rs + i : NULL;
                switch (r) {
#define TILE(R) \
    case R: tile(R, a, panel, kp, sc, ri, bi, o, n, out_f32); break;
                    TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
                    default: break;
                }
            }
        }
        free(panel);
    }
    free(ap);
    free(start);
    return failed ? -1 : 0;
}

/* x bf16 [m, k], q int8 [n, k] row-major, scale fp32 [n], bias fp32 [n] or NULL ->
 * out [m, n] (float32 when out_f32, else bfloat16). k % 64 == 0, n % 64 == 0.
 * Returns 0, or -1 when memory for the packed input could not be allocated. */
int mq_int8_gemm_bf16(const uint16_t *x, int64_t m, int64_t k, const int8_t *q, int64_t n,
                      const float *scale, const float *bias, void *out, int out_f32,
                      int nthreads) {
    const weights_t w = {q, NULL, 0, NULL, NULL, 0};
    return gemm(x, m, k, n, &w, scale, NULL, bias, out, out_f32, nthreads);
}

/* W8A8: the same with the rows of x quantized per token first (their scales into rs [m]);
 * x must be bfloat16. */
int mq_int8_gemm_bf16_q(const uint16_t *x, int64_t m, int64_t k, const int8_t *q, int64_t n,
                        const float *scale, const float *bias, float *rs, void *out, int out_f32,
                        int nthreads) {
    const weights_t w = {q, NULL, 0, NULL, NULL, 0};
    return gemm(x, m, k, n, &w, scale, rs, bias, out, out_f32, nthreads);
}

/* The same for int4-group weights: codes [n, k / 2] as stored, st / zt the scale and zero *
 * scale as float32 [k / gs, n] (transposed), flip for symmetric codes. k % 128 == 0,
 * n % 64 == 0, gs in 32, 64, 128, 256 dividing k. */
int mq_int4_gemm_bf16(const uint16_t *x, int64_t m, int64_t k, const uint8_t *codes, int64_t n,
                      int64_t gs, const float *st, const float *zt, int flip, const float *bias,
                      void *out, int out_f32, int nthreads) {
    const weights_t w = {NULL, codes, gs, st, zt, flip};
    return gemm(x, m, k, n, &w, NULL, NULL, bias, out, out_f32, nthreads);
}

/* W4A8: the same with the rows of x quantized per token first (their scales into rs [m]). */
int mq_int4_gemm_bf16_q(const uint16_t *x, int64_t m, int64_t k, const uint8_t *codes,
                        int64_t n, int64_t gs, const float *st, const float *zt, int flip,
                        const float *bias, float *rs, void *out, int out_f32, int nthreads) {
    const weights_t w = {NULL, codes, gs, st, zt, flip};
    return gemm(x, m, k, n, &w, NULL, rs, bias, out, out_f32, nthreads);
}

/* The rate of vdpbf16ps over vfmadd231ps in multiply-adds per second on this core: 16
 * independent register accumulators each (no memory traffic), iters rounds of each, the best
 * of three alternating runs (bench/isa_peak.py measures the same with more rounds). Where it
 * is low (0.49 on an Intel Xeon with AVX512-BF16 and no AMX) the float32 GEMM of
 * f32_gemm_kernels.c is used instead of this file's. */
static double seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define CHAINS 16
static float fma_loop(int64_t iters, float seed) {
    __m512 acc[CHAINS];
    const __m512 a = _mm512_set1_ps(seed), b = _mm512_set1_ps(0.999f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (int64_t n = 0; n < iters; n++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, a);
    __m512 s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm512_add_ps(s, acc[i]);
    return _mm512_reduce_add_ps(s);
}

static float dpbf16_loop(int64_t iters, float seed) {
    __m512 acc[CHAINS];
    const __m512bh a = (__m512bh)_mm512_set1_epi32(0x3f803f80); /* bfloat16 1.0 pairs */
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps(seed + (float)i);
    for (int64_t n = 0; n < iters; n++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbf16_ps(acc[i], a, a);
    __m512 s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm512_add_ps(s, acc[i]);
    return _mm512_reduce_add_ps(s);
}

double mq_bf16_fp32_rate(int64_t iters) {
    double best_f = 1e30, best_b = 1e30;
    volatile float sink = 0.0f;
    for (int rep = 0; rep < 3; rep++) {
        double t0 = seconds();
        sink += fma_loop(iters, 1.0f);
        double t1 = seconds();
        sink += dpbf16_loop(iters, 1.0f);
        double t2 = seconds();
        if (t1 - t0 < best_f) best_f = t1 - t0;
        if (t2 - t1 < best_b) best_b = t2 - t1;
    }
    (void)sink;
    /* 16 fp32 multiply-adds per FMA, 32 bf16 ones per vdpbf16ps */
    return (32.0 / best_b) / (16.0 / best_f);
}
