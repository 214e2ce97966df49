/* Mono Quant: int8, int4-group and fp16 weight-only GEMMs with float32 FMAs, for many input
 * rows, on AVX-512 CPUs where bfloat16 dot products are not faster than float32 FMAs.
 *
 * Compiled on first use by plugins/backends/native.py (``cc -O3 -mavx512f -mavx512bw
 * -mavx512dq -shared``, with -fopenmp where the compiler has it) and called through ctypes;
 * every pointer comes from a contiguous torch tensor.
 *
 * out[m][n] = s[n] * sum_k x[m][k] * q[n][k] + bias[n] (int8: the per-channel scale on the
 * float32 sums), or sum_k x[m][k] * w[n][k] + bias[n] with w = (u - z) * s per group (int4,
 * rounded once to float32 as the reference dequantizes) or the fp16 weight widened (exact);
 * x, the sums and out in float32. The weight stays as stored (no second layout is kept).
 *
 * Why: on an Intel Xeon with AVX512-BF16 and no AMX, ``vdpbf16ps`` ran at 0.49x the float32
 * FMA rate (``taskset -c 1 python bench/isa_peak.py``), so the bfloat16 GEMM of
 * bf16_gemm_kernels.c (and oneDNN's bf16 matmul) ran at 0.7x a float32 nn.Linear at 128 rows.
 *
 * Loop order (Goto's): threads split the output columns in panels of 64. For each panel, K is
 * walked in blocks of 128: the block's 64 weight rows are converted once into float32
 * [128][64] (32 KiB: stays in L1; 16x16 transposes of 4-byte groups, then a widening), and
 * every tile of up to 6 input rows multiplies it into 24 accumulators (6 rows x 4 vectors of
 * 16 columns) kept in a per-thread float32 [M][64] buffer between the K blocks. The input rows
 * are packed per tile as [K][rows] first. The last block's epilogue applies the scale and the
 * bias. Requires K % 64 == 0 and N % 64 == 0 (int4: K % 128 == 0, groups of 32-256 dividing
 * K); the Python side sends other shapes to the other kernels.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int mq_abi_version(void) { return 1; }

#define MR 6   /* input rows per tile */
#define NP 64  /* weight rows (output columns) per panel */
#define NV (NP / 16)
#define KC 128 /* k values per block */
#define PREFETCH 512

#include "avx512_transpose.h"

/* What a panel is converted from. */
typedef struct {
    const int8_t *q8;   /* int8 codes [n][k] */
    const uint8_t *q4;  /* int4 codes [n][k / 2], low nibble first */
    const uint16_t *h;  /* fp16 weights [n][k] */
    int64_t gs;         /* int4: group size */
    const float *st, *zt; /* int4: scale and zero point, [k / gs][n] (this panel at + row0) */
    int flip;           /* int4: symmetric codes stored signed (u = code ^ 8) */
} weights_t;

/* int8: rows [NP][k] from column k0, kc (64 or 128) values -> dst [kc][NP] float32 (exact) */
static void convert_int8(const int8_t *q, int64_t k, int64_t k0, int64_t kc, float *dst) {
    for (int64_t c = 0; c < kc; c += 64)
        for (int h = 0; h < NV; h++) {
            __m512i r[16];
            load_transposed((const uint8_t *)q + h * 16 * k + k0 + c, k, r);
            for (int u = 0; u < 16; u++)
                for (int t = 0; t < 4; t++) {
                    /* byte t of each row, sign-extended */
                    const __m512i v = _mm512_srai_epi32(_mm512_slli_epi32(r[u], 24 - 8 * t), 24);
                    _mm512_storeu_ps(dst + (c + 4 * u + t) * NP + h * 16, _mm512_cvtepi32_ps(v));
                }
        }
}

/* fp16: rows [NP][k] from column k0, kc values -> dst [kc][NP] float32 (exact) */
static void convert_f16(const uint16_t *w, int64_t k, int64_t k0, int64_t kc, float *dst) {
    for (int64_t c = 0; c < kc; c += 32) /* 64 bytes: 32 values of each row */
        for (int h = 0; h < NV; h++) {
            __m512i r[16];
            load_transposed((const uint8_t *)(w + h * 16 * k + k0 + c), 2 * k, r);
            for (int u = 0; u < 16; u++) {
                const __m256i lo = _mm512_cvtepi32_epi16(r[u]);
                const __m256i hi = _mm512_cvtepi32_epi16(_mm512_srli_epi32(r[u], 16));
                _mm512_storeu_ps(dst + (c + 2 * u) * NP + h * 16, _mm512_cvtph_ps(lo));
                _mm512_storeu_ps(dst + (c + 2 * u + 1) * NP + h * 16, _mm512_cvtph_ps(hi));
            }
        }
}

/* int4: rows [NP] of codes from column k0 (kc = 128 values: 64 bytes of each row) -> dst
 * [kc][NP] float32 of (u - z) * s (the reference's rounding); n: the row stride of st / zt */
static void convert_int4(const weights_t *w, int64_t k, int64_t n, int64_t row0, int64_t k0,
                         float *dst) {
    const int64_t half = k / 2;
    const __m512i m15 = _mm512_set1_epi32(15), x8 = _mm512_set1_epi32(w->flip ? 8 : 0);
    const __m512i mff = _mm512_set1_epi32(0xff);
    for (int h = 0; h < NV; h++) {
        __m512i r[16];
        load_transposed(w->q4 + (row0 + h * 16) * half + k0 / 2, half, r);
        int64_t g = -1;
        __m512 s = _mm512_setzero_ps(), z = s;
        for (int u = 0; u < 16; u++)
            for (int t = 0; t < 4; t++) {
                const int64_t kk = 2 * (4 * u + t); /* within the block: values kk, kk + 1 */
                if ((k0 + kk) / w->gs != g) {
                    g = (k0 + kk) / w->gs;
                    s = _mm512_loadu_ps(w->st + g * n + row0 + h * 16);
                    z = _mm512_loadu_ps(w->zt + g * n + row0 + h * 16);
                }
                const __m512i v = _mm512_and_si512(_mm512_srli_epi32(r[u], 8 * t), mff);
                const __m512i lo = _mm512_xor_si512(_mm512_and_si512(v, m15), x8);
                const __m512i hi = _mm512_xor_si512(_mm512_srli_epi32(v, 4), x8);
                _mm512_storeu_ps(dst + kk * NP + h * 16,
                                 _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(lo), z), s));
                _mm512_storeu_ps(dst + (kk + 1) * NP + h * 16,
                                 _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(hi), z), s));
            }
    }
}

/* mr rows (packed [kc][mr]) x one converted block [kc][NP], added into c [mr][NP] (set when
 * first) */
static inline __attribute__((always_inline)) void tile(const int mr, const float *a,
                                                       const float *b, int64_t kc, float *c,
                                                       int first) {
    __m512 acc[MR][NV];
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + r * NP + v * 16);
    for (int64_t j = 0; j < kc; j++) {
        __m512 bv[NV];
        for (int v = 0; v < NV; v++) bv[v] = _mm512_loadu_ps(b + j * NP + v * 16);
        for (int r = 0; r < mr; r++) {
            const __m512 x = _mm512_set1_ps(a[j * mr + r]);
            for (int v = 0; v < NV; v++) acc[r][v] = _mm512_fmadd_ps(x, bv[v], acc[r][v]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int v = 0; v < NV; v++) _mm512_storeu_ps(c + r * NP + v * 16, acc[r][v]);
}

static int gemm_rows(const float *x, int64_t m, int64_t k, int64_t n, const weights_t *w,
                     const float *scale, const float *bias, float *out, int nthreads) {
    const int64_t panels = n / NP, tiles = (m + MR - 1) / MR;
    float *ap = aligned_alloc(64, ((size_t)m * k * 4 + 63) / 64 * 64);
    int64_t *start = malloc((size_t)(tiles + 1) * sizeof(int64_t));
    if (!ap || !start) {
        free(ap);
        free(start);
        return -1;
    }
    for (int64_t t = 0, i = 0; t < tiles; t++) { /* balanced tiles of at most MR rows */
        const int64_t r = (m - i + (tiles - t) - 1) / (tiles - t);
        start[t] = i;
        float *dst = ap + i * k;
        for (int64_t rr = 0; rr < r; rr++) {
            const float *row = x + (i + rr) * k;
            for (int64_t j = 0; j < k; j++) dst[j * r + rr] = row[j];
        }
        i += r;
    }
    start[tiles] = m;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        float *blk = aligned_alloc(64, (size_t)KC * NP * 4);
        float *acc = aligned_alloc(64, ((size_t)m * NP * 4 + 63) / 64 * 64);
        if (!blk || !acc) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; p++) {
            if (!blk || !acc) continue;
            for (int64_t k0 = 0; k0 < k; k0 += KC) {
                const int64_t kc = k - k0 < KC ? k - k0 : KC;
                if (w->q8)
                    convert_int8(w->q8 + p * NP * k, k, k0, kc, blk);
                else if (w->h)
                    convert_f16(w->h + p * NP * k, k, k0, kc, blk);
                else
                    convert_int4(w, k, n, p * NP, k0, blk);
                for (int64_t t = 0; t < tiles; t++) {
                    const int64_t i = start[t], r = start[t + 1] - i;
                    const float *a = ap + i * k + k0 * r;
                    float *c = acc + i * NP;
                    switch (r) {
#define TILE(R) \
    case R: tile(R, a, blk, kc, c, k0 == 0); break;
                        TILE(1) TILE(2) TILE(3) TILE(4) TILE(5) TILE(6)
                        default: break;
                    }
                }
            }
            const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
            for (int v = 0; v < NV; v++) {
                const __m512 s = scale ? _mm512_loadu_ps(scale + p * NP + v * 16) : one;
                const __m512 b = bias ? _mm512_loadu_ps(bias + p * NP + v * 16) : zero;
                for (int64_t i = 0; i < m; i++)
                    _mm512_storeu_ps(out + i * n + p * NP + v * 16,
                                     _mm512_fmadd_ps(_mm512_loadu_ps(acc + i * NP + v * 16), s, b));
            }
        }
        free(blk);
        free(acc);
    }
    free(ap);
    free(start);
    return failed ? -1 : 0;
}

/* Rows in chunks of MC_ELEMENTS / k (a multiple of MR, at least 16 tiles), so the packed input
 * of a chunk (1 MiB) and its accumulators stay in L2 while every panel reads them; each chunk
 * converts the weight again, a cost per weight that the chunk's rows amortise. 1 << 18 against
 * 1 << 19 and 1 << 20 in ``python bench/kernels.py --f32-gemm``: 0.79-0.91x a float32 F.linear
 * at 1024-4096 rows against 0.67-0.90x and 0.71-0.89x, level up to 512 rows. */
#define MC_ELEMENTS (1 << 18)
static int gemm(const float *x, int64_t m, int64_t k, int64_t n, const weights_t *w,
                const float *scale, const float *bias, float *out, int nthreads) {
    int64_t mc = MC_ELEMENTS / k / MR * MR;
    if (mc < 16 * MR) mc = 16 * MR;
    for (int64_t i = 0; i < m; i += mc) {
        const int64_t r = m - i < mc ? m - i : mc;
        if (gemm_rows(x + i * k, r, k, n, w, scale, bias, out + i * n, nthreads)) return -1;
    }
    return 0;
}

/* x float32 [m, k], q int8 [n, k] row-major, scale fp32 [n], bias fp32 [n] or NULL -> out
 * float32 [m, n]. k % 64 == 0, n % 64 == 0. Returns 0, or -1 when memory ran out. */
int mq_int8_gemm_f32(const float *x, int64_t m, int64_t k, const int8_t *q, int64_t n,
                     const float *scale, const float *bias, float *out, int nthreads) {
    const weights_t w = {q, NULL, NULL, 0, NULL, NULL, 0};
    return gemm(x, m, k, n, &w, scale, bias, out, nthreads);
}

/* The same for int4-group weights: codes [n, k / 2] as stored, st / zt the scale and zero
 * point as float32 [k / gs, n], flip for symmetric codes. k % 128 == 0, n % 64 == 0, gs in
 * 32, 64, 128, 256 dividing k. */
int mq_int4_gemm_f32(const float *x, int64_t m, int64_t k, const uint8_t *codes, int64_t n,
                     int64_t gs, const float *st, const float *zt, int flip, const float *bias,
                     float *out, int nthreads) {
    const weights_t w = {NULL, codes, NULL, gs, st, zt, flip};
    return gemm(x, m, k, n, &w, NULL, bias, out, nthreads);
}

/* The same for fp16 weights [n, k]. k % 64 == 0, n % 64 == 0. */
int mq_f16_gemm_f32(const float *x, int64_t m, int64_t k, const uint16_t *h, int64_t n,
                    const float *bias, float *out, int nthreads) {
    const weights_t w = {NULL, NULL, h, 0, NULL, NULL, 0};
    return gemm(x, m, k, n, &w, NULL, bias, out, nthreads);
}
