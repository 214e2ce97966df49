"""The C GEMV / small-M kernel of the ``torch-cpu`` backend's int8 weight-only layers
(``int8-gemv-c``): per-channel int8 codes times float32 or bfloat16 inputs in float32, the scale
and the bias applied in the same pass, the output in the input's dtype (``gemv_kernels.c``,
AVX-512, built on first use by :mod:`.native`, threads from ``torch.get_num_threads()``).

It serves the rows below the int8 crossover (:data:`.cpu_kernels.CROSSOVER` ``"int8-c"``) in
place of ``torch._weight_int8pack_mm``, which casts float32 inputs to bfloat16 and streams the
weight at well under the read bandwidth at one token (docs/performance.md). Without AVX-512, a
C compiler or a working build, :func:`gemv_library` is None and the backend keeps the torch
kernel (``monoquant env`` and ``monoquant plan`` name the kernel that runs)."""

from __future__ import annotations

import ctypes

import torch

from . import cpu_kernels as ck
from .native import NativeLibrary, prefetch_flag

__all__ = [
    "DESCRIPTIONS",
    "GEMV",
    "KERNELS",
    "gemv_library",
    "gemv_operands",
    "int8_gemv_c",
    "rows_unit",
]

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: the int8 GEMV kernel (``gemv_kernels.c``): AVX512F/BW only, like :data:`.dequant.DEQUANT`
GEMV = NativeLibrary(
    "gemv",
    "gemv_kernels.c",
    ("avx512f", "avx512bw"),
    ("-mavx512f", "-mavx512bw", prefetch_flag(amd=32768, intel=8192)),
    2,
    {
        "mq_int8_gemv": ([_P, _I, _I, _C, _P, _P, _P, _P, _I, _P, _C, _C], None),
        "mq_rows_unit": ([_P, _I, _I, _I, _P, _P, _C], None),
    },
)


def gemv_library() -> ctypes.CDLL | None:
    """The C GEMV kernel, or None where it cannot run (see :data:`GEMV`)."""
    return GEMV.library()[0]


def gemv_operands(
    x: torch.Tensor, n: int, bias: torch.Tensor | None, scratch: str
) -> tuple[torch.Tensor, bool, int | None, torch.Tensor, torch.Tensor | None]:
    """What the C GEMVs take: ``x`` contiguous float32 or bfloat16 (float16 and others cast to
    float32), whether it is bfloat16, a float32 scratch to widen it into (its pointer, named
    ``scratch``; None for float32), the output ``[M, n]`` in ``x``'s dtype, a float32 bias."""
    bf16 = x.dtype == torch.bfloat16
    if not bf16 and x.dtype != torch.float32:
        x = x.to(torch.float32)
    if not x.is_contiguous():
        x = x.contiguous()
    m, k = x.shape
    x32 = ck.scratch(scratch, (m, k), torch.float32).data_ptr() if bf16 else None
    y = torch.empty(m, n, dtype=x.dtype)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    return x, bf16, x32, y, bias


def rows_unit(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Each row of the float32 ``x`` [m, k] (unit stride within rows) divided by its max |x|
    (at least 1e-30) into ``out`` [m, k]; returns the divisors ``[m, 1]``: W8A8's per-token step
    in one C pass per row (:data:`GEMV`'s ``mq_rows_unit``)."""
    m, k = x.shape
    amax = torch.empty(m, 1, dtype=torch.float32)
    GEMV.library()[0].mq_rows_unit(
        x.data_ptr(), m, k, x.stride(0), out.data_ptr(), amax.data_ptr(), torch.get_num_threads()
    )
    return amax


def int8_gemv_c(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """``(x @ q^T) * s + bias`` for ``x`` ``[M, K]`` in float32 arithmetic, returned in
    bfloat16 for bfloat16 inputs and in float32 otherwise (the caller casts float16 back)."""
    t = p.tensors
    m, k, n = x.shape[0], p.k, p.n
    x, bf16, x32, y, bias = gemv_operands(x, n, bias, "int8_gemv.x32")
    gemv_library().mq_int8_gemv(
        x.data_ptr(), m, k, int(bf16), x32, t["wq"].data_ptr(), t["s"].data_ptr(),
        None if bias is None else bias.data_ptr(), n, y.data_ptr(), int(bf16),
        torch.get_num_threads(),
    )  # fmt: skip
    return y


KERNELS = {"int8-gemv-c": int8_gemv_c}

#: what each kernel is, as ``monoquant plan`` shows it
DESCRIPTIONS = {"int8-gemv-c": "int8 GEMV (C, AVX-512), fp32 math, input-dtype output"}
