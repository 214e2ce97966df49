/* Mono Quant CPU dequantization kernels: 4-bit weight rows -> bfloat16 rows in one pass, and
 * per-token int8 codes of bfloat16 activations, for the "convert a block of weight rows, then
 * one bfloat16 GEMM" paths of the torch-cpu and cpu-vnni backends at many input rows.
 *
 * Compiled on first use by plugins/backends/native.py (``cc -O3 -mavx512f -mavx512bw -shared``)
 * and called through ctypes; every pointer comes from a contiguous torch tensor whose shape the
 * Python side has checked. Only AVX512F/BW instructions: the float -> bfloat16 conversion is
 * done in integers (round to nearest even, as torch's ``.to(torch.bfloat16)``), so it runs on
 * every AVX-512 CPU, with or without AVX512-BF16.
 *
 * Shapes: the Python side only calls these with group sizes that are multiples of 32 (16 for the
 * chunked layout) and K a multiple of the group size (of 128 for the chunked layout).
 *
 * Weights: unsigned codes u in 0..15 (signed two's complement nibbles are XOR-ed with 8 first,
 * which is code + 8), one scale s and one offset per group of ``gs`` inputs:
 *   stored layout ("int4-group" files): byte j of a row holds u[2j] (low nibble), u[2j + 1];
 *                                       w = u * s - zs   (zs = zero * s)
 *   chunked layout (cpu-vnni):          byte j of chunk c holds u[128c + j], u[128c + 64 + j];
 *                                       w = u * s + o    (o = -zero * s)
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

int mq_abi_version(void) { return 1; }

/* float32 x16 -> bfloat16 x16, round to nearest even (finite inputs). */
static inline __m256i to_bf16(__m512 v) {
    __m512i b = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16));
}

static inline uint16_t to_bf16_1(float f) {
    union { float f; uint32_t u; } v = {f};
    return (uint16_t)((v.u + 0x7FFF + ((v.u >> 16) & 1)) >> 16);
}

/* Stored layout rows [rows, k / 2] -> out [rows, k] bfloat16; gs % 32 == 0 and k % gs == 0 (the
 * caller checks). scale, zs: [rows, k / gs]. */
void mq_int4_rows_bf16(const uint8_t *codes, int64_t rows, int64_t k, int64_t gs,
                       const float *scale, const float *zs, int flip, uint16_t *out) {
    const int64_t groups = k / gs, half = k / 2;
    const __m512i m15 = _mm512_set1_epi32(15), x8 = _mm512_set1_epi32(flip ? 8 : 0);
    /* output order: lo[0], hi[0], lo[1], hi[1], ... (index 16 + i picks hi[i]) */
    const __m512i idx0 = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i idx1 =
        _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = codes + r * half;
        const float *sr = scale + r * groups, *zr = zs + r * groups;
        uint16_t *o = out + r * k;
        for (int64_t j = 0; j < half; j += 16) {
            const int64_t g = (2 * j) / gs;
            __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
            __m512 lo = _mm512_cvtepi32_ps(_mm512_xor_si512(_mm512_and_si512(v, m15), x8));
            __m512 hi = _mm512_cvtepi32_ps(_mm512_xor_si512(_mm512_srli_epi32(v, 4), x8));
            __m512 s = _mm512_set1_ps(sr[g]), z = _mm512_set1_ps(zr[g]);
            __m512 w0 = _mm512_fmsub_ps(_mm512_permutex2var_ps(lo, idx0, hi), s, z);
            __m512 w1 = _mm512_fmsub_ps(_mm512_permutex2var_ps(lo, idx1, hi), s, z);
            _mm256_storeu_si256((__m256i *)(o + 2 * j), to_bf16(w0));
            _mm256_storeu_si256((__m256i *)(o + 2 * j + 16), to_bf16(w1));
        }
    }
}

/* Chunked layout rows [rows, k / 2] (k % 128 == 0, gs % 16 == 0) -> out [rows, k] bfloat16.
 * scale, offset: [rows, k / gs]. */
void mq_int4c_rows_bf16(const uint8_t *packed, int64_t rows, int64_t k, int64_t gs,
                        const float *scale, const float *offset, uint16_t *out) {
    const int64_t groups = k / gs, half = k / 2;
    const __m512i m15 = _mm512_set1_epi32(15);
    for (int64_t r = 0; r < rows; r++) {
        const uint8_t *c = packed + r * half;
        const float *sr = scale + r * groups, *orow = offset + r * groups;
        uint16_t *o = out + r * k;
        for (int64_t base = 0; base < k; base += 128) {
            const uint8_t *cc = c + base / 2;
            for (int64_t j = 0; j < 64; j += 16) {
                __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cc + j)));
                const int64_t g0 = (base + j) / gs, g1 = (base + 64 + j) / gs;
                __m512 lo = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(v, m15)),
                                            _mm512_set1_ps(sr[g0]), _mm512_set1_ps(orow[g0]));
                __m512 hi = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)),
                                            _mm512_set1_ps(sr[g1]), _mm512_set1_ps(orow[g1]));
                _mm256_storeu_si256((__m256i *)(o + base + j), to_bf16(lo));
                _mm256_storeu_si256((__m256i *)(o + base + 64 + j), to_bf16(hi));
            }
        }
    }
}

/* Per-token int8 codes of bfloat16 x [m, k], written as bfloat16 (integers -127..127 are exact
 * in bfloat16) into q [m, k], scales into sx [m]: scale = max|x| / 127 (1 for an all-zero row),
 * codes = round-half-even(x / scale) clamped, the contract of
 * monoquant_core.activations.quantize_per_token. */
void mq_quantize_rows_bf16(const uint16_t *x, int64_t m, int64_t k, uint16_t *q, float *sx) {
    for (int64_t t = 0; t < m; t++) {
        const uint16_t *xr = x + t * k;
        uint16_t *qr = q + t * k;
        __m512 vmax = _mm512_setzero_ps();
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xr + i)));
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16))));
        }
        float amax = _mm512_reduce_max_ps(vmax);
        for (; i < k; i++) {
            union { uint32_t u; float f; } v = {(uint32_t)xr[i] << 16};
            float a = fabsf(v.f);
            if (a > amax) amax = a;
        }
        float scale = amax > 0.0f ? amax / 127.0f : 1.0f;
        sx[t] = scale;
        __m512 vs = _mm512_set1_ps(scale);
        __m512 lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
        for (i = 0; i + 16 <= k; i += 16) {
            __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(xr + i)));
            __m512 v = _mm512_div_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), vs);
            v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
            /* an integer of at most 7 bits: its float's top 16 bits are its bfloat16, exactly */
            __m512i bits = _mm512_srli_epi32(_mm512_castps_si512(v), 16);
            _mm256_storeu_si256((__m256i *)(qr + i), _mm512_cvtepi32_epi16(bits));
        }
        for (; i < k; i++) {
            union { uint32_t u; float f; } v = {(uint32_t)xr[i] << 16};
            float r = nearbyintf(v.f / scale);
            r = r > 127.0f ? 127.0f : (r < -127.0f ? -127.0f : r);
            union { float f; uint32_t u; } o = {r};
            qr[i] = (uint16_t)(o.u >> 16);
        }
    }
}

/* y[t, :] *= s[t] for bfloat16 y [m, n] and float32 s [m], in float32, rounded to nearest even
 * (torch's mixed-dtype in-place multiply was far slower in an ad-hoc timing). */
void mq_scale_rows_bf16(uint16_t *y, int64_t m, int64_t n, const float *s) {
    for (int64_t t = 0; t < m; t++) {
        uint16_t *yr = y + t * n;
        const __m512 vs = _mm512_set1_ps(s[t]);
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(yr + i)));
            __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(b, 16)), vs);
            _mm256_storeu_si256((__m256i *)(yr + i), to_bf16(v));
        }
        for (; i < n; i++) {
            union { uint32_t u; float f; } v = {(uint32_t)yr[i] << 16};
            yr[i] = to_bf16_1(v.f * s[t]);
        }
    }
}

/* int8 rows [rows, k] with one float32 scale per row -> out [rows, k] bfloat16 of q * s (any k). */
void mq_int8_rows_bf16(const int8_t *q, int64_t rows, int64_t k, const float *scale,
                       uint16_t *out) {
    for (int64_t r = 0; r < rows; r++) {
        const int8_t *qr = q + r * k;
        uint16_t *o = out + r * k;
        const float s = scale[r];
        const __m512 vs = _mm512_set1_ps(s);
        int64_t i = 0;
        for (; i + 16 <= k; i += 16) {
            __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qr + i)));
            _mm256_storeu_si256((__m256i *)(o + i), to_bf16(_mm512_mul_ps(_mm512_cvtepi32_ps(v), vs)));
        }
        for (; i < k; i++) o[i] = to_bf16_1((float)qr[i] * s);
    }
}
