/* Mono Quant: the 16x16 transposes of 4-byte groups the AVX-512 GEMM kernels share
 * (bf16_gemm_kernels.c, f32_gemm_kernels.c): 16 weight rows, 64 bytes of each, become 16
 * vectors that each hold the same 4 bytes of all 16 rows, the layout the GEMMs' panels are
 * built from. Included by the kernel sources; plugins/backends/native.py hashes it with them.
 * The includer defines PREFETCH (bytes ahead in each row) before including this file. */
#ifndef MQ_AVX512_TRANSPOSE_H
#define MQ_AVX512_TRANSPOSE_H
#include <immintrin.h>
#include <stdint.h>

#define SHUF(a, b, i) \
    _mm512_castps_si512(_mm512_shuffle_ps(_mm512_castsi512_ps(a), _mm512_castsi512_ps(b), i))

/* r[0..15]: 16 rows of 16 4-byte groups -> r[u] holds group u of the 16 rows (a transpose). */
static inline __attribute__((always_inline)) void transpose16(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 16; g += 4) {
        r[g] = SHUF(t[g], t[g + 2], 0x44);
        r[g + 1] = SHUF(t[g], t[g + 2], 0xEE);
        r[g + 2] = SHUF(t[g + 1], t[g + 3], 0x44);
        r[g + 3] = SHUF(t[g + 1], t[g + 3], 0xEE);
    }
    for (int h = 0; h < 16; h += 8)
        for (int i = 0; i < 4; i++) {
            t[h + i] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0x88);
            t[h + i + 4] = _mm512_shuffle_i32x4(r[h + i], r[h + i + 4], 0xdd);
        }
    for (int i = 0; i < 8; i++) {
        r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
        r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xdd);
    }
}

/* 64 bytes of each of 16 rows (stride bytes apart), each row prefetched PREFETCH bytes ahead,
 * transposed: r[u] holds bytes 4u..4u+3 of the 16 rows */
static inline __attribute__((always_inline)) void load_transposed(const uint8_t *p,
                                                                  int64_t stride, __m512i *r) {
    for (int i = 0; i < 16; i++) {
        _mm_prefetch((const char *)(p + i * stride + PREFETCH), _MM_HINT_T0);
        r[i] = _mm512_loadu_si512(p + i * stride);
    }
    transpose16(r);
}

#endif
