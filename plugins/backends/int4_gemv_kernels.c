/* Mono Quant int4-group weight-only GEMV / small-M kernel: 4-bit codes with one float32 scale
 * and zero point per group of inputs, times float32 or bfloat16 activations, float32
 * arithmetic, for the few-row path of the torch-cpu backend (``int4-gemv-c``).
 *
 * Compiled on first use by plugins/backends/native.py (``cc -O3 -mavx512f -mavx512bw -shared``,
 * with -fopenmp where the compiler has it) and called through ctypes; every pointer comes from a
 * contiguous torch tensor whose shape the Python side has checked (plugins/backends/int4_gemv.py
 * builds the layout). Only AVX512F/BW instructions.
 *
 *   y[t, n] = sum_k w[n, k] * x[t, k] + bias[n],   w[n, k] = (u[n, k] - z[n, g]) * s[n, g]
 *
 * u: unsigned codes 0..15 (signed codes + 8, with z = 8), g = k / gs (gs a power of two from
 * 32 to 256). Layout (derived at prepare time, never stored): rows in tiles of 8 (N padded with
 * zero codes and zero scales), each row's inputs in chunks of 128 (the last one padded);
 *   codes  [tiles, chunks, 8, 16] 32-bit words: nibble j of word l of a row's chunk c holds
 *          u[128c + 16j + l], so one 64-byte load, a shift by 4j and vpermps give 16 weights
 *          in input order;
 *   params [tiles, groups, 8] scales, then (asymmetric only) [tiles, groups, 8] zero points,
 *          interleaved per group: sym ? s[8] : s[8] z[8], float32.
 * Per group and row the 16 possible weights ((u - z) * s, u = 0..15, rounded once in float32,
 * exactly the reference's dequantized values) are one register; vpermps looks the codes up in
 * it, so 16 weights cost a shift, a permute and one FMA per token. Each product goes unrounded
 * into a float32 FMA (16 lanes per row, then a tree sum), so the result is the float32
 * dequantize-then-F.linear reference up to float32 summation rounding; y is float32 or
 * bfloat16 (rounded once, to nearest even). Inputs past k (a padded last group, or k % 16 != 0)
 * are loaded masked as zeros, so the padded codes never count. (A first layout, a 16-byte load
 * widened to 32-bit lanes per 32 inputs, spent one more shuffle per 32 weights and was about 10%
 * slower at one token on a cache-resident weight in ad-hoc timings while tuning.)
 *
 * Loop order: threads split the tiles (static, each output summed by one thread in one order:
 * the result does not depend on the thread count); each tile is multiplied with every group of
 * up to TOKENS tokens while it sits in L1/L2, so the weight is read from memory once per call
 * whatever M is. On the first token group the tile prefetches PF_AHEAD bytes ahead (16 KiB, tuned
 * on Zen 5; Intel Xeons build with -DPF_AHEAD=4096: plugins/backends/native.py, prefetch_flag).
 */
#include <immintrin.h>
#include <stdint.h>

#define TILE 8
#define TOKENS 4
#ifndef PF_AHEAD
#define PF_AHEAD 16384
#endif
#define INLINE static inline __attribute__((always_inline))

int mq_abi_version(void) { return 1; }

static inline uint16_t to_bf16_1(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

/* The 16 weights (u - z) * s, u = 0..15, of group g for rows [r0, r0 + R) into tbl: rounded
 * once in float32 ((u - z) is exact), as the reference dequantizes. */
INLINE void tables(const float *par, int sym, int64_t g, const int r0, const int R,
                   __m512 *tbl) {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    const float *pg = par + g * (sym ? TILE : 2 * TILE) + r0;
    for (int r = 0; r < R; r++) {
        const __m512 z = sym ? _mm512_set1_ps(8.0f) : _mm512_set1_ps(pg[TILE + r]);
        tbl[r] = _mm512_mul_ps(_mm512_sub_ps(iota, z), _mm512_set1_ps(pg[r]));
    }
}

/* Inputs [i, i + 16) (nibble J of the chunk's words at wc) of R rows against NT tokens. */
INLINE void step(const uint32_t *wc, const float *x, int64_t k, int64_t i, __mmask16 mk,
                 const int J, const int R, const int NT, const __m512 *tbl,
                 __m512 acc[TILE][TOKENS]) {
    __m512 xv[TOKENS];
    for (int t = 0; t < NT; t++) xv[t] = _mm512_maskz_loadu_ps(mk, x + t * k + i);
    for (int r = 0; r < R; r++) {
        const __m512i v = _mm512_loadu_si512((const void *)(wc + r * 16));
        const __m512 wv = _mm512_permutexvar_ps(J ? _mm512_srli_epi32(v, 4 * J) : v, tbl[r]);
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
    }
}

/* Rows [r0, r0 + R) of one tile against NT tokens (at x, k floats apart): the float32 dot
 * products into dot[t * R + r]. R and NT are compile-time constants at every call. gs is a
 * power of two from 32 to 256 (lg its log2). */
INLINE void tile_dots(const uint32_t *w, const float *par, int sym, int64_t k, int lg,
                      const float *x, int prefetch, const int r0, const int R, const int NT,
                      float *dot) {
    const int64_t full = k / 128, gmask = (1 << lg) - 1;
    __m512 acc[TILE][TOKENS], tbl[TILE];
    for (int r = 0; r < R; r++) {
        tbl[r] = _mm512_setzero_ps(); /* set at input 0, the start of the first group */
        for (int t = 0; t < NT; t++) acc[r][t] = _mm512_setzero_ps();
    }
#define STEP(J)                                                                      \
    do {                                                                             \
        const int64_t i = c * 128 + 16 * (J);                                        \
        if ((i & gmask) == 0) tables(par, sym, i >> lg, r0, R, tbl);                  \
        step(wc, x, k, i, 0xFFFF, J, R, NT, tbl, acc);                               \
    } while (0)
    for (int64_t c = 0; c < full; c++) {
        const uint32_t *wc = w + c * (TILE * 16) + r0 * 16;
        if (prefetch)
            for (int b = 0; b < R * 64; b += 64)
                _mm_prefetch((const char *)wc + PF_AHEAD + b, _MM_HINT_T0);
        STEP(0); STEP(1); STEP(2); STEP(3); STEP(4); STEP(5); STEP(6); STEP(7);
    }
#undef STEP
    if (full * 128 < k) { /* the last, partial chunk: inputs past k are loaded as zeros */
        const int64_t c = full;
        const uint32_t *wc = w + c * (TILE * 16) + r0 * 16;
        for (int j = 0; j < 8 && c * 128 + 16 * j < k; j++) {
            const int64_t i = c * 128 + 16 * j;
            const __mmask16 mk = i + 16 <= k ? 0xFFFF : (__mmask16)((1u << (k - i)) - 1u);
            if ((i & gmask) == 0) tables(par, sym, i >> lg, r0, R, tbl);
            __m512 xv[TOKENS];
            for (int t = 0; t < NT; t++) xv[t] = _mm512_maskz_loadu_ps(mk, x + t * k + i);
            for (int r = 0; r < R; r++) {
                const __m512i v = _mm512_loadu_si512((const void *)(wc + r * 16));
                const __m512i u = _mm512_srlv_epi32(v, _mm512_set1_epi32(4 * j));
                const __m512 wv = _mm512_permutexvar_ps(u, tbl[r]);
                for (int t = 0; t < NT; t++) acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
            }
        }
    }
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < R; r++) dot[t * R + r] = _mm512_reduce_add_ps(acc[r][t]);
}

/* Rows [r0, r0 + R) of tile `tile` against tokens [t0, t0 + NT), written to y (bias added;
 * rows past n are padding and skipped). */
INLINE void run_block(const uint32_t *codes, const float *params, int sym, int64_t kc, int64_t k,
                      int64_t gs, const float *x, int64_t n, int64_t tile, int64_t t0,
                      const float *bias, void *y, int y_bf16, int prefetch, const int r0,
                      const int R, const int NT) {
    float dot[TILE * TOKENS];
    const int64_t groups = (k + gs - 1) / gs;
    const uint32_t *w = codes + tile * kc * (TILE * 16);
    const float *par = params + tile * groups * (sym ? TILE : 2 * TILE);
    tile_dots(w, par, sym, k, __builtin_ctzll((unsigned long long)gs), x + t0 * k, prefetch, r0,
              R, NT, dot);
    for (int t = 0; t < NT; t++)
        for (int r = 0; r < R; r++) {
            const int64_t row = tile * TILE + r0 + r;
            if (row >= n) break;
            float v = dot[t * R + r];
            if (bias) v += bias[row];
            const int64_t at = (t0 + t) * n + row;
            if (y_bf16)
                ((uint16_t *)y)[at] = to_bf16_1(v);
            else
                ((float *)y)[at] = v;
        }
}

/* One tile against one token group of nt tokens: all 8 rows at once for one or two tokens (8 or
 * 16 independent FMA chains), two halves of 4 rows for three or four (registers). */
#define RUN(R0, R, NT) \
    run_block(codes, params, sym, kc, k, gs, x, n, tile, t0, bias, y, y_bf16, pf, R0, R, NT)
INLINE void run_group(const uint32_t *codes, const float *params, int sym, int64_t kc, int64_t k,
                      int64_t gs, const float *x, int64_t n, int64_t tile, int64_t t0, int nt,
                      const float *bias, void *y, int y_bf16, int64_t tiles) {
    /* prefetch on the first token group only, and not past the end of the codes */
    const int pf = t0 == 0 && (tile + 1) * kc * (TILE * 64) + PF_AHEAD <= tiles * kc * (TILE * 64);
    switch (nt) {
    case 1: RUN(0, 8, 1); return;
    case 2: RUN(0, 8, 2); return;
    case 3: RUN(0, 4, 3); RUN(4, 4, 3); return;
    default: RUN(0, 4, 4); RUN(4, 4, 4); return;
    }
}
#undef RUN

/* y [M, N] = x [M, K] @ w^T (+ bias). codes / params: the tiled layout above (kc = ceil(K / 128)
 * chunks per row, ceil(K / gs) groups). x_bf16: x holds bfloat16, widened
 * into x32 [M, K] float32 first (else x32 is unused and may be NULL). y_bf16: y is bfloat16, else
 * float32. nthreads: OpenMP threads over tiles of 8 output rows (1: no parallel region). */
void mq_int4_gemv(const void *xin, int64_t m, int64_t k, int x_bf16, float *x32,
                  const uint32_t *codes, const float *params, int sym, int64_t kc, int64_t gs,
                  const float *bias, int64_t n, void *y, int y_bf16, int nthreads) {
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
    const int64_t tiles = (n + TILE - 1) / TILE;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t tile = 0; tile < tiles; tile++) {
        for (int64_t t0 = 0; t0 < m; t0 += TOKENS) {
            const int nt = m - t0 < TOKENS ? (int)(m - t0) : TOKENS;
            run_group(codes, params, sym, kc, k, gs, x, n, tile, t0, nt, bias, y, y_bf16, tiles);
        }
    }
}
