/* Mono Quant int8 weight-only GEMV / small-M kernel: per-channel symmetric int8 weights times
 * float32 or bfloat16 activations, float32 arithmetic, for the few-row path of the torch-cpu
 * backend (``int8-gemv-c``).
 *
 * Compiled on first use by plugins/backends/native.py (``cc -O3 -mavx512f -mavx512bw -shared``,
 * with -fopenmp where the compiler has it) and called through ctypes; every pointer comes from a
 * contiguous torch tensor whose shape the Python side has checked. Only AVX512F/BW
 * instructions; any K (the last K % 16 inputs of a row with masked loads) and any N.
 *
 *   y[t, n] = s[n] * sum_k q[n, k] * x[t, k] + bias[n]
 *
 * q: int8 [N, K] row-major (the stored codes), s: float32 [N], bias: float32 [N] or NULL.
 * x: [M, K], float32, or bfloat16 (widened to float32 exactly, once per call, into x32).
 * Each product q * x goes unrounded into a float32 FMA (16 lanes per row, then a tree sum), the
 * sum is scaled and the bias added in float32, so the result is the float32
 * dequantize-then-F.linear reference up to float32 rounding; y is float32 or bfloat16 (rounded
 * once, to nearest even).
 *
 * Loop order: threads split the output rows in blocks of ROWS; each block is multiplied with
 * every group of up to TOKENS tokens while its rows sit in L1/L2, so the weight is read from
 * memory once per call whatever M is. Each 16-input step converts the block's codes to float32
 * once and feeds them to every token's accumulators. On the first token group the block
 * prefetches the weight PF_AHEAD bytes ahead of where it reads (the rows are contiguous, so
 * that is the next rows' bytes), which keeps the DRAM stream busy at one token: of 4, 8, 16,
 * 32 and 64 KiB, 32 KiB came closest to a plain read of the same bytes while tuning on Zen 5
 * (the rate it reaches is bench/kernels.py's "% of read" column); Intel Xeons build with
 * -DPF_AHEAD=8192 (plugins/backends/native.py, prefetch_flag).
 */
#include <immintrin.h>
#include <stdint.h>

#define ROWS 8
#define TOKENS 4
#ifndef PF_AHEAD
#define PF_AHEAD 32768
#endif
#define INLINE static inline __attribute__((always_inline))

int mq_abi_version(void) { return 2; }

static inline uint16_t to_bf16_1(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

/* 16 int8 codes -> float32 (exact). */
INLINE __m512 codes16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* The first `left` (< 16) codes at p, the other lanes 0; no byte past p + left is read. */
INLINE __m512 codes_tail(const int8_t *p, __mmask64 mk) {
    __m512i b = _mm512_maskz_loadu_epi8(mk, p);
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_castsi512_si128(b)));
}

/* R weight rows (at w, K bytes apart) against NT tokens (at x, K floats apart): the float32
 * dot products into dot[t * R + r]. R and NT are compile-time constants at every call, so the
 * accumulators stay in registers. */
INLINE void block_dots(const int8_t *w, const float *x, int64_t k, int prefetch, const int R,
                       const int NT, float *dot) {
    __m512 acc[ROWS][TOKENS];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= k; i += 16) {
        if (prefetch)
            for (int b = 0; b < R * 16; b += 64)
                _mm_prefetch((const char *)w + PF_AHEAD + i * R + b, _MM_HINT_T0);
        __m512 wf[ROWS];
        for (int r = 0; r < R; r++) wf[r] = codes16(w + r * k + i);
        for (int t = 0; t < NT; t++) {
            const __m512 xv = _mm512_loadu_ps(x + t * k + i);
            for (int r = 0; r < R; r++) acc[r][t] = _mm512_fmadd_ps(wf[r], xv, acc[r][t]);
        }
    }
    if (i < k) {
        const __mmask16 m16 = (__mmask16)((1u << (k - i)) - 1u);
        const __mmask64 m64 = (__mmask64)m16;
        __m512 wf[ROWS];
        for (int r = 0; r < R; r++) wf[r] = codes_tail(w + r * k + i, m64);
        for (int t = 0; t < NT; t++) {
            const __m512 xv = _mm512_maskz_loadu_ps(m16, x + t * k + i);
            for (int r = 0; r < R; r++) acc[r][t] = _mm512_fmadd_ps(wf[r], xv, acc[r][t]);
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < R; r++) dot[t * R + r] = _mm512_reduce_add_ps(acc[r][t]);
}

/* Rows [r0, r0 + R) against tokens [t0, t0 + NT), written to y (scaled, bias added). */
INLINE void run_block(const int8_t *q, const float *x, int64_t k, int64_t n, int64_t r0,
                      int64_t t0, const float *s, const float *bias, void *y, int y_bf16,
                      const int R, const int NT) {
    float dot[ROWS * TOKENS];
    /* prefetch on the first token group only, and not past the end of the weight */
    const int prefetch = t0 == 0 && (r0 + R) * k + PF_AHEAD <= n * k;
    block_dots(q + r0 * k, x + t0 * k, k, prefetch, R, NT, dot);
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < R; r++) {
            float v = dot[t * R + r] * s[r0 + r];
            if (bias) v += bias[r0 + r];
            const int64_t at = (t0 + t) * n + r0 + r;
            if (y_bf16)
                ((uint16_t *)y)[at] = to_bf16_1(v);
            else
                ((float *)y)[at] = v;
        }
}

/* One token group of NT tokens against R rows: 8 rows at once for one or two tokens (eight or
 * sixteen independent FMA chains), two halves of 4 rows for three or four (registers). */
#define RUN(R, NT) run_block(q, x, k, n, r0, t0, s, bias, y, y_bf16, R, NT)
INLINE void run_group(const int8_t *q, const float *x, int64_t k, int64_t n, int64_t r0,
                      int64_t rows, int64_t t0, int nt, const float *s, const float *bias,
                      void *y, int y_bf16) {
    if (rows == ROWS) {
        switch (nt) {
        case 1: RUN(8, 1); return;
        case 2: RUN(8, 2); return;
        case 3: RUN(4, 3); r0 += 4; RUN(4, 3); return;
        default: RUN(4, 4); r0 += 4; RUN(4, 4); return;
        }
    }
    for (int64_t end = r0 + rows; r0 < end; r0++) { /* the last N % 8 rows, one at a time */
        switch (nt) {
        case 1: RUN(1, 1); break;
        case 2: RUN(1, 2); break;
        case 3: RUN(1, 3); break;
        default: RUN(1, 4); break;
        }
    }
}
#undef RUN

/* y [M, N] = (x [M, K] @ q^T) * s (+ bias). x_bf16: x holds bfloat16, widened into x32
 * [M, K] float32 first (else x32 is unused and may be NULL). y_bf16: y is bfloat16, else
 * float32. nthreads: OpenMP threads over blocks of ROWS output rows (1: no parallel region). */
void mq_int8_gemv(const void *xin, int64_t m, int64_t k, int x_bf16, float *x32, const int8_t *q,
                  const float *s, const float *bias, int64_t n, void *y, int y_bf16,
                  int nthreads) {
    const float *x = (const float *)xin;
    if (x_bf16) {
        const uint16_t *xb = (const uint16_t *)xin;
        const int64_t total = m * k;
        int64_t i = 0;
        for (; i + 16 <= total; i += 16) {
            __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xb + i)));
            _mm512_storeu_ps(x32 + i, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
        }
        for (; i < total; i++) {
            union { uint32_t u; float f; } v = {(uint32_t)xb[i] << 16};
            x32[i] = v.f;
        }
        x = x32;
    }
    const int64_t blocks = (n + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t r0 = b * ROWS, rows = n - r0 < ROWS ? n - r0 : ROWS;
        for (int64_t t0 = 0; t0 < m; t0 += TOKENS) {
            const int nt = m - t0 < TOKENS ? (int)(m - t0) : TOKENS;
            run_group(q, x, k, n, r0, rows, t0, nt, s, bias, y, y_bf16);
        }
    }
}

/* W8A8's per-token step (torch-cpu ``int8-dynamic``): each float32 row of x [m, k] (row stride
 * ldx) divided by its own max |x| (at least 1e-30) into xd [m, k], the divisors into amax [m].
 * One read for the maximum and one read + write for the division, both on the row while it is
 * in L1 (torch ops took an |x| copy, a reduction and a division: three passes and a temporary).
 * The quotient is the IEEE division torch computes, so the codes fbgemm makes are the same. */
void mq_rows_unit(const float *x, int64_t m, int64_t k, int64_t ldx, float *xd, float *amax,
                  int nthreads) {
    const int64_t full = k / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (k - full)) - 1u);
#pragma omp parallel for num_threads(nthreads) if (nthreads > 1 && m >= 64) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        const float *r = x + i * ldx;
        float *o = xd + i * k;
        __m512 mx = _mm512_setzero_ps();
        for (int64_t j = 0; j < full; j += 16)
            mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(r + j)));
        if (tail) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(tail, r + full)));
        float a = _mm512_reduce_max_ps(mx);
        if (!(a >= 1e-30f)) a = 1e-30f;
        amax[i] = a;
        const __m512 va = _mm512_set1_ps(a);
        for (int64_t j = 0; j < full; j += 16)
            _mm512_storeu_ps(o + j, _mm512_div_ps(_mm512_loadu_ps(r + j), va));
        if (tail)
            _mm512_mask_storeu_ps(o + full, tail,
                                  _mm512_div_ps(_mm512_maskz_loadu_ps(tail, r + full), va));
    }
}
