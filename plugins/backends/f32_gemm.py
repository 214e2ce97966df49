"""The many-row kernels of the ``torch-cpu`` backend's weight-only layers on AVX-512 CPUs whose
bfloat16 dot products are not faster than their float32 FMAs (``int8-gemm-f32``,
``int4-gemm-f32``, ``fp16-gemm-f32``): a GEMM of our own (``f32_gemm_kernels.c``, built on
first use by :mod:`.native`) that converts the stored int8 codes, int4 codes or fp16 weights
into float32 blocks of 64 weight rows x 128 inputs (L1-sized) once per call and multiplies
every input row with them by FMAs. No second copy of the weight is kept.

Which GEMM runs where is :func:`bf16_faster`: the ratio of the core's ``vdpbf16ps`` and
``vfmadd231ps`` rates, measured once per process by the bf16 library (a few milliseconds). On
an Intel Xeon with AVX512-BF16 and no AMX it was 0.49x (``taskset -c 1 python
bench/isa_peak.py``), and the bfloat16 GEMM ran int8 / int4 weight-only layers at 0.7x a
float32 ``nn.Linear`` at 128 rows (docs/performance.md). Numerics: float32 inputs, float32
sums; int8 codes exact in float32 and the scale applied to the sums; int4 weights dequantized
exactly as the reference does, ``(u - z) * s`` in float32; fp16 weights widened exactly.
Other input dtypes are converted to float32 first and the output back.
"""

from __future__ import annotations

import ctypes
import os

import torch

from . import cpu_kernels as ck
from .native import NativeLibrary

__all__ = [
    "DESCRIPTIONS",
    "F32_GEMM",
    "KERNELS",
    "bf16_faster",
    "f32_gemm_library",
    "fits",
    "fits_int4",
    "int4_tensors",
    "last_rows",
]

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
F32_GEMM = NativeLibrary(
    "f32_gemm",
    "f32_gemm_kernels.c",
    ("avx512f", "avx512bw", "avx512dq"),
    ("-mavx512f", "-mavx512bw", "-mavx512dq"),
    1,
    {
        "mq_int8_gemm_f32": ([_P, _I, _I, _P, _I, _P, _P, _P, _C], ctypes.c_int),
        "mq_int4_gemm_f32": ([_P, _I, _I, _P, _I, _I, _P, _P, _C, _P, _P, _C], ctypes.c_int),
        "mq_f16_gemm_f32": ([_P, _I, _I, _P, _I, _P, _P, _C], ctypes.c_int),
    },
    headers=("avx512_transpose.h",),
)

#: ``vdpbf16ps`` over ``vfmadd231ps`` rates from which the bfloat16 GEMMs are used: the
#: bfloat16 path also rounds the inputs and converts them, so it needs a clear margin
BF16_MARGIN = 1.3

_bf16: dict[str, float] = {}


def f32_gemm_library() -> ctypes.CDLL | None:
    """The kernel, or None where it cannot run (no AVX-512, no C compiler, a failed build:
    ``monoquant env`` says why)."""
    return F32_GEMM.library()[0]


def bf16_rate() -> float | None:
    """The ``vdpbf16ps`` / ``vfmadd231ps`` multiply-add rate ratio of this core (measured once
    per process), or None where the bf16 library does not run."""
    from .bf16_gemm import bf16_gemm_library

    if "ratio" not in _bf16:
        lib = bf16_gemm_library()
        _bf16["ratio"] = float(lib.mq_bf16_fp32_rate(200_000)) if lib is not None else -1.0
    return _bf16["ratio"] if _bf16["ratio"] > 0 else None


def bf16_faster() -> bool:
    """Whether the weight-only GEMMs compute in bfloat16 (:mod:`.bf16_gemm`) rather than in
    float32 (this module): bfloat16 dot products at least :data:`BF16_MARGIN` times the float32
    FMA rate, or ``MONOQUANT_CPU_GEMM=bf16`` (``=f32`` forces this module's)."""
    forced = os.environ.get("MONOQUANT_CPU_GEMM", "").strip().lower()
    if forced in ("bf16", "f32"):
        return forced == "bf16"
    ratio = bf16_rate()
    return ratio is not None and ratio >= BF16_MARGIN


#: input elements (M x K) up to which the int8 GEMM runs (from :func:`last_rows`, at least
#: :data:`MIN_LAST_ROWS` rows); above, the int8 conversion path (float32 blocks and torch's
#: float32 GEMM), which amortises its conversion over many rows. ``python bench/kernels.py
#: --f32-gemm`` (Intel Xeon, AVX512-BF16, no AMX, one thread, x a float32 F.linear; three runs):
#: ours 0.80-1.05x up to 512 rows and 0.71-0.91x at 1024-4096, the conversion path 0.63-0.97x
#: and 0.75-0.95x; level from about 1024 rows of K = 384, 256-512 of 1536, 512 of 4096. int4
#: keeps this GEMM at every M: its conversion path (torch ops) was 0.46-0.81x.
MAX_INPUT_ELEMENTS, MIN_LAST_ROWS = 3 << 17, 256


def last_rows(k: int) -> int:
    """The most input rows the int8 GEMM takes for a weight with ``k`` inputs."""
    return max(MIN_LAST_ROWS, MAX_INPUT_ELEMENTS // max(1, k))


def fits(n: int, k: int) -> bool:
    """Whether an int8 or fp16 ``[n, k]`` weight has the shape the kernel takes."""
    return n % 64 == 0 and k % 64 == 0 and k > 0


def fits_int4(n: int, k: int, gs: int | None) -> bool:
    """Whether an int4-group ``[n, k]`` weight with groups of ``gs`` has a shape it takes."""
    return n % 64 == 0 and k % 128 == 0 and k > 0 and gs in (32, 64, 128, 256) and k % gs == 0


def int4_tensors(qt) -> dict:
    """The int4 kernel's operands: the stored codes, the per-group scale and zero point as
    float32 ``[K / gs, N]`` (8 for symmetric codes, which are stored signed)."""
    scale = qt.scale.to(torch.float32)
    zero = torch.full_like(scale, 8.0) if qt.symmetric else qt.zero_point.to(torch.float32)
    return {
        "codes4": qt.qdata.contiguous(),
        "st32": scale.t().contiguous(),
        "zp32": zero.t().contiguous(),
        "flip4": bool(qt.symmetric),
    }


def _operands(x: torch.Tensor, n: int, bias: torch.Tensor | None):
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    return xf, y, bias  # the caller holds the float32 input and bias while the kernel runs


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _run(kind: str, fn, x: torch.Tensor, p: ck.Prepared, bias, *weight) -> torch.Tensor:
    """``fn(x, m, k, *weight, bias, out, threads)`` on float32 operands; the output in the
    input's dtype. ``weight``: the kernel's weight arguments (``n`` among them, in its place)."""
    m = x.shape[0]
    xf, y, b = _operands(x, p.n, bias)  # held while the kernel runs
    rc = fn(xf.data_ptr(), m, p.k, *weight, _ptr(b), y.data_ptr(), torch.get_num_threads())
    if rc != 0:
        raise MemoryError(f"{kind}: no memory for {m} packed input rows")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


def int8_gemm_f32(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """``(x @ q^T) * s + bias`` in float32, returned in the input's dtype."""
    t, lib = p.tensors, f32_gemm_library()
    weight = (t["wq"].data_ptr(), p.n, t["s"].data_ptr())
    return _run("int8-gemm-f32", lib.mq_int8_gemm_f32, x, p, bias, *weight)


def int4_gemm_f32(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """``x @ w^T + bias`` for an int4-group weight, ``w = (u - z) * s`` in float32."""
    t, lib = p.tensors, f32_gemm_library()
    weight = (
        t["codes4"].data_ptr(), p.n, t["gs"], t["st32"].data_ptr(), t["zp32"].data_ptr(),
        int(t["flip4"]),
    )  # fmt: skip
    return _run("int4-gemm-f32", lib.mq_int4_gemm_f32, x, p, bias, *weight)


def f16_gemm_f32(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """``x @ w^T + bias`` for an fp16 weight, widened to float32 per block."""
    lib = f32_gemm_library()
    return _run("fp16-gemm-f32", lib.mq_f16_gemm_f32, x, p, bias, p.tensors["w16"].data_ptr(), p.n)


KERNELS = {
    "int8-gemm-f32": int8_gemm_f32,
    "int4-gemm-f32": int4_gemm_f32,
    "fp16-gemm-f32": f16_gemm_f32,
}
#: the kernels that take the bias (all)
FUSED_BIAS = set(KERNELS)

#: what each kernel is, as ``monoquant plan`` shows it
DESCRIPTIONS = {
    "int8-gemm-f32": "int8 rows -> fp32 blocks (C, per call) + fp32 FMA GEMM (C), scale on "
    "the sums",
    "int4-gemm-f32": "int4 rows -> fp32 blocks of (u - z) * s (C, per call) + fp32 FMA GEMM (C)",
    "fp16-gemm-f32": "fp16 rows -> fp32 blocks (C, per call) + fp32 FMA GEMM (C)",
}
