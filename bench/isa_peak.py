"""Compute ceilings of this CPU core: int8 VNNI multiply-adds against fp32 FMAs per second.

    taskset -c 1 python bench/isa_peak.py

At large batch (M=128) a quantized Linear is compute-bound, so its best possible speed-up over
fp32 is the ratio of the two peaks measured here: ``vpdpbusd`` (64 int8 multiply-adds per
512-bit instruction) against ``vfmadd231ps`` (16 fp32 multiply-adds), each run on 16 independent
register accumulators (no memory traffic, latency hidden). Needs a C compiler and an AVX512-VNNI
CPU; it reuses the cpu-vnni backend's compiler discovery. On CPUs with AVX512-BF16 it also
measures ``vdpbf16ps`` (32 bfloat16 multiply-adds per instruction) against the FMAs with the
probe torch-cpu runs once per process to choose its GEMM (``mq_bf16_fp32_rate`` in
``bf16_gemm_kernels.c``): where it is not above the fp32 FMA peak, a bfloat16 GEMM cannot beat
a float32 one.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monoquant_plugins.backends import cpu_vnni
from monoquant_plugins.backends.bf16_gemm import bf16_gemm_library

from monoquant_core.hardware import has_bf16_compute

SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#define CHAINS 16
int32_t int8_peak(int64_t iters, int32_t seed) {
    __m512i acc[CHAINS], a = _mm512_set1_epi32(seed), b = _mm512_set1_epi32(seed + 1);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_epi32(i);
    for (int64_t n = 0; n < iters; n++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
    __m512i s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm512_add_epi32(s, acc[i]);
    return _mm512_reduce_add_epi32(s);
}
float fp32_peak(int64_t iters, float seed) {
    __m512 acc[CHAINS], a = _mm512_set1_ps(seed), b = _mm512_set1_ps(0.999f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (int64_t n = 0; n < iters; n++)
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], b, a);
    __m512 s = acc[0];
    for (int i = 1; i < CHAINS; i++) s = _mm512_add_ps(s, acc[i]);
    return _mm512_reduce_add_ps(s);
}
"""


def main() -> int:
    reason = cpu_vnni.cpu_reason()
    cc = cpu_vnni.find_compiler()
    if reason or cc is None:
        print(f"isa_peak: {reason or 'no C compiler found'}", file=sys.stderr)
        return 2
    bf16 = has_bf16_compute() and bf16_gemm_library() is not None
    with tempfile.TemporaryDirectory() as tmp:
        src, lib_path = os.path.join(tmp, "peak.c"), os.path.join(tmp, "peak.so")
        with open(src, "w") as f:
            f.write(SOURCE)
        subprocess.run(
            [
                cc,
                "-O3",
                "-funroll-loops",
                *cpu_vnni.ISA_FLAGS,
                "-fPIC",
                "-shared",
                "-o",
                lib_path,
                src,
            ],
            check=True,
        )
        lib = ctypes.CDLL(lib_path)
        lib.int8_peak.argtypes = [ctypes.c_int64, ctypes.c_int32]
        lib.fp32_peak.argtypes = [ctypes.c_int64, ctypes.c_float]
        lib.fp32_peak.restype = ctypes.c_float
        iters = 2_000_000
        rates: dict[str, list[float]] = {"int8": [], "fp32": [], "bf16": []}
        for _ in range(7):  # alternate, so clock changes hit both
            t0 = time.perf_counter()
            lib.int8_peak(iters, 3)
            rates["int8"].append(iters * 16 * 64 / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            lib.fp32_peak(iters, 1.0)
            rates["fp32"].append(iters * 16 * 16 / (time.perf_counter() - t0))
            if bf16:  # torch-cpu's own probe: the vdpbf16ps / vfmadd231ps rate ratio
                rates["bf16"].append(bf16_gemm_library().mq_bf16_fp32_rate(iters // 10))
    i8, f32 = max(rates["int8"]), max(rates["fp32"])
    print(f"int8 vpdpbusd: {i8 / 1e9:.1f} G multiply-adds/s (best of 7)")
    print(f"fp32 vfmadd  : {f32 / 1e9:.1f} G multiply-adds/s (best of 7)")
    print(f"ceiling of an int8 over fp32 speed-up when compute-bound: {i8 / f32:.2f}x")
    if bf16:
        ratio = max(rates["bf16"])
        print(f"bf16 vdpbf16ps: {ratio * f32 / 1e9:.1f} G multiply-adds/s (best of 7 ratios)")
        print(f"ceiling of a bf16 over fp32 speed-up when compute-bound: {ratio:.2f}x")
    else:
        print("bf16: no AVX512-BF16 on this CPU (not measured)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
