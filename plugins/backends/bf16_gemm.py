"""The many-row kernel of the ``torch-cpu`` backend's int8 weight-only layers on CPUs with
AVX512-BF16 (``int8-gemm-bf16``): a GEMM of our own (``bf16_gemm_kernels.c``, built on first use
by :mod:`.native`) that converts each panel of 64 weight rows from the stored int8 codes into
bfloat16 pairs once per call and multiplies every input row with it by ``vdpbf16ps``, the
per-channel scale and the bias applied to the float32 sums. No second copy of the weight is
kept; nothing goes through oneDNN.

It replaces "convert ``q * s`` into bfloat16 blocks, then a oneDNN bf16 GEMM per block"
(:mod:`.dequant`) where it can run (``K % 64 == 0``, ``N % 64 == 0``): that path paid the
conversion on top of a GEMM of the bf16 ``nn.Linear``'s speed, so a bfloat16 model ran its int8
layers at 0.77-0.9x its own bf16 layers at 32-128 rows (docs/performance.md has the tables;
``python bench/kernels.py``). Numerics: the codes are exact in bfloat16, so only the input
(float32 inputs are rounded to bfloat16, as on the path it replaces) and the output are
rounded."""

from __future__ import annotations

import ctypes

import torch

from . import cpu_kernels as ck
from .native import NativeLibrary

__all__ = [
    "BF16_GEMM",
    "DESCRIPTIONS",
    "KERNELS",
    "bf16_gemm_library",
    "fits",
    "fits_int4",
    "int4_gemm_bf16",
    "int4_tensors",
    "int8_gemm_bf16",
    "last_rows",
]

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
BF16_GEMM = NativeLibrary(
    "bf16_gemm",
    "bf16_gemm_kernels.c",
    ("avx512f", "avx512bw", "avx512_bf16"),
    ("-mavx512f", "-mavx512bw", "-mavx512bf16"),
    3,
    {
        "mq_int8_gemm_bf16": ([_P, _I, _I, _P, _I, _P, _P, _P, _C, _C], ctypes.c_int),
        "mq_int4_gemm_bf16": ([_P, _I, _I, _P, _I, _I, _P, _P, _C, _P, _P, _C, _C], ctypes.c_int),
        "mq_int8_gemm_bf16_q": ([_P, _I, _I, _P, _I, _P, _P, _P, _P, _C, _C], ctypes.c_int),
        "mq_int4_gemm_bf16_q": (
            [_P, _I, _I, _P, _I, _I, _P, _P, _C, _P, _P, _P, _C, _C],
            ctypes.c_int,
        ),
        "mq_bf16_fp32_rate": ([_I], ctypes.c_double),
    },
    headers=("avx512_transpose.h",),
)


def bf16_gemm_library() -> ctypes.CDLL | None:
    """The kernel, or None where it cannot run (no AVX512-BF16, no C compiler, a failed
    build: ``monoquant env`` says why)."""
    return BF16_GEMM.library()[0]


#: input elements (M x K) up to which the own GEMM runs; above, the conversion path: every panel
#: passes over the whole packed input, which then no longer stays in cache (``python
#: bench/kernels.py --own-gemm``, 2026-12-02: on 1024x4096 weights the own GEMM was 1.08-1.21x
#: the conversion path up to 512 rows, 0.97-0.98x at 1024 and 0.67-0.82x at 2048-4096; on
#: 384x1536 0.89-0.97x at 2048 and 0.74-0.84x at 4096; on 1024-wide inputs 0.95-1.04x at 4096)
MAX_INPUT_ELEMENTS = 3 << 20


def last_rows(k: int) -> int:
    """The most input rows the own GEMM takes for a weight with ``k`` inputs."""
    return max(1, MAX_INPUT_ELEMENTS // max(1, k))


def fits(n: int, k: int) -> bool:
    """Whether a ``[n, k]`` weight has the shape the kernel takes."""
    return n % 64 == 0 and k % 64 == 0 and k > 0


def fits_int4(n: int, k: int, gs: int | None) -> bool:
    """Whether an int4-group ``[n, k]`` weight with groups of ``gs`` has a shape it takes."""
    return n % 64 == 0 and k % 128 == 0 and k > 0 and gs in (32, 64, 128, 256) and k % gs == 0


def int4_tensors(qt) -> dict:
    """The int4 kernel's operands of an int4-group QTensor: the stored codes and the per-group
    scale and zero * scale, float32, transposed to ``[K / gs, N]``."""
    scale = qt.scale.to(torch.float32)
    zero = torch.full_like(scale, 8.0) if qt.symmetric else qt.zero_point.to(torch.float32)
    return {
        "codes4": qt.qdata.contiguous(),
        "st": scale.t().contiguous(),
        "zt": (zero * scale).t().contiguous(),
        "flip4": bool(qt.symmetric),
    }


def _operands(x: torch.Tensor, n: int, bias: torch.Tensor | None):
    xb = x if x.dtype == torch.bfloat16 and x.is_contiguous() else x.to(torch.bfloat16).contiguous()
    out_f32 = x.dtype != torch.bfloat16
    y = torch.empty(x.shape[0], n, dtype=torch.float32 if out_f32 else torch.bfloat16)
    if bias is not None and (bias.dtype != torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    return xb, out_f32, y, bias  # the caller holds the float32 bias while the kernel runs


def _check(rc: int, kind: str, m: int) -> None:
    if rc != 0:
        raise MemoryError(f"{kind}: no memory for {m} packed input rows")


def int8_gemm_bf16(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """``(x @ q^T) * s + bias`` with bfloat16 inputs and float32 sums: bfloat16 out for bfloat16
    inputs, float32 otherwise (the caller casts float16 back)."""
    t, m = p.tensors, x.shape[0]
    xb, out_f32, y, b = _operands(x, p.n, bias)
    rc = bf16_gemm_library().mq_int8_gemm_bf16(
        xb.data_ptr(), m, p.k, t["wq"].data_ptr(), p.n, t["s"].data_ptr(),
        None if b is None else b.data_ptr(), y.data_ptr(),
        int(out_f32), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "int8-gemm-bf16", m)
    return y


def int4_gemm_bf16(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """``x @ w^T + bias`` for an int4-group weight, ``w = (u - z) * s`` rounded to bfloat16
    per panel, bfloat16 inputs, float32 sums; the output dtype as :func:`int8_gemm_bf16`."""
    t, m = p.tensors, x.shape[0]
    xb, out_f32, y, b = _operands(x, p.n, bias)
    rc = bf16_gemm_library().mq_int4_gemm_bf16(
        xb.data_ptr(), m, p.k, t["codes4"].data_ptr(), p.n, t["gs"], t["st"].data_ptr(),
        t["zt"].data_ptr(), int(t["flip4"]), None if b is None else b.data_ptr(), y.data_ptr(),
        int(out_f32),
        torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "int4-gemm-bf16", m)
    return y


def int8_dynamic_gemm_bf16(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """W8A8 (``activations="dynamic"``) for bfloat16 inputs: each row quantized to its per-token
    int8 codes (the reference's, exact in bfloat16) while the GEMM packs it, times the int8
    weight rows (bfloat16 panels: exact), the float32 sums times weight scale x row scale plus
    the bias, rounded once. Other input dtypes run fbgemm's kernel
    (:func:`~.cpu_kernels.int8_dynamic`, with the bias)."""
    if x.dtype != torch.bfloat16:
        return ck.int8_dynamic(x, p, bias)
    t, m = p.tensors, x.shape[0]
    xb, out_f32, y, b = _operands(x, p.n, bias)
    rs = torch.empty(m, dtype=torch.float32)
    rc = bf16_gemm_library().mq_int8_gemm_bf16_q(
        xb.data_ptr(), m, p.k, t["wq"].data_ptr(), p.n, t["s"].data_ptr(),
        None if b is None else b.data_ptr(), rs.data_ptr(), y.data_ptr(), int(out_f32),
        torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "int8-dynamic-bf16", m)
    return y


def int4_dynamic_gemm_bf16(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """W4A8 for bfloat16 inputs (cpu-vnni's many-row path): each row quantized to its per-token
    int8 codes while packed, times the int4-group weight dequantized into bfloat16 panels
    (:func:`int4_gemm_bf16`), the float32 sums times the row scale plus the bias, rounded once."""
    t, m = p.tensors, x.shape[0]
    xb, out_f32, y, b = _operands(x, p.n, bias)
    rs = torch.empty(m, dtype=torch.float32)
    rc = bf16_gemm_library().mq_int4_gemm_bf16_q(
        xb.data_ptr(), m, p.k, t["codes4"].data_ptr(), p.n, t["gs"], t["st"].data_ptr(),
        t["zt"].data_ptr(), int(t["flip4"]), None if b is None else b.data_ptr(), rs.data_ptr(),
        y.data_ptr(), int(out_f32), torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "int4-dynamic-bf16", m)
    return y


#: first M of :func:`int8_dynamic_gemm_bf16` in a bfloat16 model, and the largest K it runs
#: at: against fbgemm's kernel (a bf16 -> float32 pass, amax, its uint8 quantization) it won
#: on MiniLM-sized layers (x a bf16 nn.Linear at M = 16-512: 384x384 1.06-1.54x where fbgemm
#: was 0.89-1.03x; 1536x384 1.07-1.28x against 0.68-1.57x) and lost at most M from K = 1536 on
#: (1024x4096: 0.92-1.10x against 1.12-1.56x), one run of ``python bench/kernels.py
#: --w8a8-bf16``, one thread on Zen 5
W8A8_ROWS, W8A8_MAX_K = 16, 512


def w8a8_schedule(n: int, k: int, dtype: torch.dtype) -> tuple[tuple[int, str], ...]:
    """torch-cpu's W8A8 kernels by M where fbgemm runs: fbgemm's kernel, and for a bfloat16
    model's layers this GEMM takes (``K <= W8A8_MAX_K``) :func:`int8_dynamic_gemm_bf16` from
    :data:`W8A8_ROWS` up to :func:`last_rows`, then fbgemm's again."""
    if dtype != torch.bfloat16 or k > W8A8_MAX_K or not fits(n, k) or not bf16_gemm_library():
        return ((1, "int8-dynamic"),)
    last = max(W8A8_ROWS, last_rows(k))
    return ((1, "int8-dynamic"), (W8A8_ROWS, "int8-dynamic-bf16"), (last + 1, "int8-dynamic"))


KERNELS = {
    "int8-gemm-bf16": int8_gemm_bf16,
    "int4-gemm-bf16": int4_gemm_bf16,
    "int8-dynamic-bf16": int8_dynamic_gemm_bf16,
}
#: the kernels that take the bias (all)
FUSED_BIAS = set(KERNELS)

#: what each kernel is, as ``monoquant plan`` shows it
DESCRIPTIONS = {
    "int8-gemm-bf16": "int8 rows -> bf16 panels (C, per call) + AVX512-BF16 GEMM (C), "
    "scale on the sums",
    "int4-gemm-bf16": "int4 rows -> bf16 panels of (u - z) * s (C, per call) + AVX512-BF16 "
    "GEMM (C)",
    "int8-dynamic-bf16": "per-token int8 codes in bf16 x int8 rows -> bf16 panels (C, per "
    "call) + AVX512-BF16 GEMM (C), scales and bias on the sums",
}
