"""The one-pass C conversions of the ``torch-cpu`` backend's many-row GEMM paths, and the
kernels built on them (``int4-gemm-c``, ``int8-gemm-c``): weight rows converted into bfloat16
by ``dequant_kernels.c`` (AVX-512, built on first use by :mod:`.native`) block by block, one
bfloat16 GEMM per block (one ``F.linear`` with the bias when the weight is one block). The
``cpu-vnni`` backend uses the same library for W4A8 on bfloat16 inputs at many rows."""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import cpu_kernels as ck
from .native import NativeLibrary

__all__ = ["DEQUANT", "DESCRIPTIONS", "FUSED_BIAS", "KERNELS", "dequant_library"]

_P, _I = ctypes.c_void_p, ctypes.c_int64
#: the one-pass C dequantization kernels (``dequant_kernels.c``, built on first use): 4-bit rows
#: -> bfloat16 rows, per-token int8 codes of bfloat16 inputs. AVX512F/BW only; without them, a
#: compiler or a working build the torch-op paths run instead (``monoquant env`` says why).
DEQUANT = NativeLibrary(
    "dequant",
    "dequant_kernels.c",
    ("avx512f", "avx512bw"),
    ("-mavx512f", "-mavx512bw"),
    1,
    {
        "mq_int4_rows_bf16": ([_P, _I, _I, _I, _P, _P, ctypes.c_int, _P], None),
        "mq_int4c_rows_bf16": ([_P, _I, _I, _I, _P, _P, _P], None),
        "mq_quantize_rows_bf16": ([_P, _I, _I, _P, _P], None),
        "mq_scale_rows_bf16": ([_P, _I, _I, _P], None),
        "mq_int8_rows_bf16": ([_P, _I, _I, _P, _P], None),
    },
)


def dequant_library() -> ctypes.CDLL | None:
    """The C dequantization kernels, or None where they cannot run (see :data:`DEQUANT`)."""
    return DEQUANT.library()[0]


def _bf16_blocks(x: torch.Tensor, p: ck.Prepared, bias, fill) -> torch.Tensor:
    """``x @ W^T (+ bias)`` in bfloat16 with ``W`` converted block by block into a reused
    bfloat16 buffer by ``fill(first row, rows, buffer)``: one ``F.linear`` with the bias fused
    when the weight is one block, else one GEMM per block into the output."""
    n, k = p.n, p.k
    xc = x.to(torch.bfloat16).contiguous()
    rows = ck.rows_per_block(k, torch.bfloat16, ck.MIN_GEMM_ROWS, n)
    buf = ck.scratch("bf16_blocks", (min(rows, n), k), torch.bfloat16)
    if rows >= n:
        fill(0, n, buf)
        if torch.is_grad_enabled() and x.requires_grad:
            buf = buf.clone()  # autograd keeps it; the scratch buffer is reused
        b = None if bias is None else bias.to(torch.bfloat16)
        return F.linear(xc, buf, b)
    out = torch.empty(x.shape[0], n, dtype=torch.bfloat16)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        fill(i, j - i, buf[: j - i])
        ck.gemm_into(out, i, j, xc, buf[: j - i])
    return out if bias is None else out.add_(bias.to(torch.bfloat16))


def int4_gemm_c(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`int4_gemm` with the C kernel dequantizing each block of rows into bfloat16 in
    one pass, in input order (no reordering of the input's columns); the bias is added."""
    lib = dequant_library()
    t = p.tensors
    codes, scale, zs, flip, gs = t["codes"], t["scale"], t["zs"], int(t["flip"]), t["gs"]

    def fill(i: int, r: int, b: torch.Tensor) -> None:
        lib.mq_int4_rows_bf16(
            codes[i].data_ptr(), r, p.k, gs, scale[i].data_ptr(), zs[i].data_ptr(), flip,
            b.data_ptr(),
        )  # fmt: skip

    return _bf16_blocks(x, p, bias, fill)


def int8_gemm_c(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Weight-only int8 for many rows with the C kernel writing ``q * s`` in bfloat16 (the
    dequantized weight, rounded once) block by block; the bias is added."""
    lib = dequant_library()
    wq, s = p.tensors["wq"], p.tensors["s"]

    def fill(i: int, r: int, b: torch.Tensor) -> None:
        lib.mq_int8_rows_bf16(wq[i].data_ptr(), r, p.k, s[i].data_ptr(), b.data_ptr())

    return _bf16_blocks(x, p, bias, fill)


#: the kernels that take the bias (the caller adds it for the others)
FUSED_BIAS = frozenset({"int4-gemm-c", "int8-gemm-c"})


KERNELS = {"int4-gemm-c": int4_gemm_c, "int8-gemm-c": int8_gemm_c}

#: what each kernel is, as ``monoquant plan`` shows it
DESCRIPTIONS = {
    "int4-gemm-c": "int4 rows -> bf16 blocks (C, one pass) + bf16 GEMM",
    "int8-gemm-c": "int8 rows -> bf16 blocks of q * s (C, one pass) + bf16 GEMM",
}
