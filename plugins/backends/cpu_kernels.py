"""The CPU kernels of the ``torch-cpu`` backend on PyTorch ops, and the helpers its GEMM paths
share (scratch buffers, row blocks, crossovers); the one-pass C conversions that replace the
PyTorch-op dequantization where they build are in :mod:`.dequant`.

Each kernel takes the input as ``[M, K]`` and a :class:`Prepared` weight and returns ``[M, N]``
(the caller casts to the input dtype and adds the bias). Two families:

* GEMV-class kernels that read the packed weight once per call and are fastest for few rows
  (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``, fbgemm's dynamic
  int8 linear; the C int8 GEMV of :mod:`.gemv`);
* GEMM paths for many rows: the weight is converted, block of rows by block of rows, into the
  compute dtype (bfloat16 where the CPU multiplies it natively, else float32) in a reused
  per-thread scratch buffer, and multiplied with a BLAS GEMM. No full float copy of the
  weight is ever kept; the conversion costs the same at every ``M``, so it pays off above a
  crossover (:data:`CROSSOVER`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from monoquant_core.activations import fake_quantize_static

from .fbgemm_probe import fbgemm_reduce_range

__all__ = [
    "CROSSOVER",
    "KERNELS",
    "SPEEDUP",
    "Prepared",
    "crossover",
    "expected_speedup",
    "scratch",
]

#: Input rows (M) from which the GEMM path beats the GEMV-class kernel, by weight size
#: (``N * K`` elements, first match). Measured single-threaded on an AVX512 + AVX512-BF16 CPU
#: (Zen 5) with ``python bench/kernels.py --crossover`` (it prints both kernels' times per M
#: for MiniLM-, 2k-, 4k- and 11k-sized weights). ``int8-c``: the C GEMV (:mod:`.gemv`) against
#: the GEMM path with the C conversion (three runs); ``int8``: ``torch._weight_int8pack_mm``
#: against the torch-op GEMM path, what runs where the C kernels do not build (one run, with
#: bfloat16 compute). ``int4-c``: the int4 GEMM path with the C dequantization kernel
#: (``int4``: with torch ops), both against ``torch._weight_int4pack_mm_for_cpu``: what runs
#: where the C int4 GEMV does not build (``int4`` also where it builds but the C dequantization
#: cannot run: no AVX512-BF16). ``int4-gemv-c``: the C int4 GEMV (:mod:`.int4_gemv`) against the
#: GEMM path with the C dequantization (three runs: 48 on 384x384, 24-96 on the other MiniLM
#: shapes and 24-96 on 2048-11008 wide ones, the two within 20% over M = 24-64; 32 there because
#: on the cold 4096x4096 weight of ``bench/kernels.py --quick`` they were level at M = 32 with
#: float32 inputs, the GEMV 5% behind with bfloat16 ones and further behind at g32).
#: ``int8-f32`` / ``int4-f32``: the C GEMVs against our float32 GEMM (:mod:`.f32_gemm`), one
#: run of ``--crossover`` on an Intel Xeon with AVX512-BF16 and no AMX, 2026-12-02: the GEMM
#: ahead from M = 8-16 on MiniLM-sized and 2048x2048 weights and from 24 on 4096-wide ones.
#: ``MONOQUANT_TORCH_CPU_CROSSOVER`` (``int8=32,int4=96``) overrides them for every size
#: (``int8`` / ``int4`` for both paths of the scheme).
CROSSOVER: dict[str, tuple[tuple[int | None, int], ...]] = {
    "int8": ((1 << 18, 48), (1 << 23, 32), (None, 16)),
    "int8-c": ((1 << 18, 48), (1 << 23, 32), (None, 24)),
    "int4": ((1 << 20, 160), (None, 96)),
    "int4-c": ((1 << 18, 48), (None, 32)),
    "int4-gemv-c": ((1 << 18, 48), (None, 32)),
    "int8-f32": ((1 << 23, 16), (None, 24)),
    "int4-f32": ((1 << 23, 16), (None, 24)),
}

#: Speed of each kernel against a float ``nn.Linear`` in the input's dtype, by input rows
#: (``(last M, x float)``, first match; None = no limit): single-threaded on a Zen 5 core
#: (AVX512-BF16, no AMX), from ``bench/kernels.py`` (4096x4096 and 4096->11008, M = 1 to 128)
#: and ``bench/e2e.py`` (thousands of rows) of 2026-12-01, rounded down. ``monoquant plan``
#: notes the layers expected to be slower than float (docs/performance.md has the tables).
SPEEDUP: dict[str, dict[torch.dtype, tuple[tuple[int | None, float], ...]]] = {
    "int8-dynamic": {
        torch.float32: ((None, 3.0),),
        torch.bfloat16: ((8, 2.5), (128, 1.5), (1024, 1.0), (None, 0.9)),
    },
    "int8-dynamic-tensor": {
        torch.float32: ((None, 3.0),),
        torch.bfloat16: ((8, 2.5), (128, 1.5), (1024, 1.0), (None, 0.7)),
    },
    "int8-weight": {torch.float32: ((None, 2.0),), torch.bfloat16: ((1, 1.7), (None, 0.8))},
    # the C GEMV: 5.1-5.4x fp32 and 3.7-4.5x bf16 at M = 1, 4.8-5.2x and 1.4-1.5x at M = 8
    # (bench/kernels.py, two runs, 4096-wide layers); up to the crossover, --crossover
    "int8-gemv-c": {
        torch.float32: ((1, 4.0), (8, 3.0), (None, 2.0)),
        torch.bfloat16: ((1, 3.0), (8, 1.2), (None, 0.8)),
    },
    "int8-gemm": {torch.float32: ((None, 2.2),), torch.bfloat16: ((None, 0.8),)},
    "int8-gemm-c": {torch.float32: ((None, 2.2),), torch.bfloat16: ((128, 0.8), (None, 0.95))},
    "int8-gemm-bf16": {torch.float32: ((None, 2.5),), torch.bfloat16: ((None, 1.0),)},
    "int8-dynamic-bf16": {torch.float32: ((None, 2.5),), torch.bfloat16: ((None, 1.2),)},
    "int4-gemm-bf16": {torch.float32: ((None, 2.5),), torch.bfloat16: ((None, 1.0),)},
    "int4": {
        torch.float32: ((None, 1.3),),
        torch.bfloat16: ((1, 3.5), (8, 1.2), (None, 0.6)),
    },
    # the C int4 GEMV: 8.4-9.0x fp32 and 6.3-16x bf16 at M = 1 (the float layers slowed by a
    # loaded machine), 5.8-6.3x and 1.7-1.8x at M = 8 (bench/kernels.py --quick, 4096x4096
    # g128, two runs; g32 4.9x / 1.3x at M = 8); up to the crossover, --crossover
    "int4-gemv-c": {
        torch.float32: ((1, 4.5), (8, 4.0), (None, 2.5)),
        torch.bfloat16: ((1, 3.5), (8, 1.3), (None, 0.7)),
    },
    "int4-gemm": {torch.float32: ((None, 1.5),), torch.bfloat16: ((None, 0.6),)},
    "int4-gemm-c": {torch.float32: ((None, 2.3),), torch.bfloat16: ((128, 0.8), (None, 0.95))},
    "fp16": {torch.float32: ((None, 2.0),), torch.bfloat16: ((1, 1.9), (8, 1.1), (None, 0.5))},
    # our float32 GEMMs (CPUs whose bf16 dot products are slow): bench/kernels.py --threads 1
    # --quick, Intel Xeon without AMX, 2026-12-02 (int8 1.1-1.3x / 1.0x fp32 at M = 32 / 128,
    # int4 1.2-1.7x / 1.0x; 1.5-1.8x a bf16 nn.Linear, whose bfloat16 GEMM is slow there)
    "int8-gemm-f32": {torch.float32: ((64, 1.1), (None, 1.0)), torch.bfloat16: ((None, 1.4),)},
    "int4-gemm-f32": {torch.float32: ((64, 1.1), (None, 1.0)), torch.bfloat16: ((None, 1.4),)},
    "fp16-gemm-f32": {torch.float32: ((128, 1.0), (None, 0.85)), torch.bfloat16: ((None, 1.2),)},
    "bf16": {torch.float32: ((None, 1.2),), torch.bfloat16: ((None, 1.0),)},
}


def expected_speedup(kind: str, dtype: torch.dtype, rows: int) -> float | None:
    """:data:`SPEEDUP` of ``kind`` at ``rows`` for ``dtype`` inputs (None: not measured)."""
    table = SPEEDUP.get(kind, {}).get(dtype)
    for last, ratio in table or ():
        if last is None or rows <= last:
            return ratio
    return None


_BLOCK_BYTES = 1 << 20  # converted rows per block: about 1 MiB, so a block stays in cache
_local = threading.local()


def crossover(kind: str, n: int, k: int, override: dict[str, int] | None = None) -> int:
    """The first ``M`` served by the GEMM path of ``kind`` (``int8`` / ``int8-c`` / ``int4`` /
    ``int4-c`` / ``int4-gemv-c``; an ``int8`` or ``int4`` override holds for every path of that
    scheme)."""
    key = kind.split("-")[0]
    if override and key in override:
        return override[key]
    for limit, m in CROSSOVER[kind]:
        if limit is None or n * k <= limit:
            return m
    raise AssertionError("unreachable: the last CROSSOVER row has no limit")


def scratch(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A per-thread work buffer of ``shape``, reused across calls (grown when too small): a
    fresh multi-MiB allocation costs page faults on every call."""
    bufs = getattr(_local, "bufs", None)
    if bufs is None:
        bufs = _local.bufs = {}
    n = 1
    for d in shape:
        n *= d
    buf = bufs.get((name, dtype))
    if buf is None or buf.numel() < n:
        buf = bufs[(name, dtype)] = torch.empty(n, dtype=dtype)
    return buf[:n].view(shape)


@dataclass
class Prepared:
    """Kernel-ready weights of one layer (derived at prepare time, never saved).

    ``kernels``: ``(first M, kernel name)`` pairs in ascending order; :meth:`kind` picks one
    by the number of input rows.
    """

    n: int
    k: int
    kernels: tuple[tuple[int, str], ...]
    tensors: dict[str, Any] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        """The kernel of a single row."""
        return self.kernels[0][1]

    def pick(self, m: int) -> str:
        kind = self.kernels[0][1]
        for first, name in self.kernels[1:]:
            if m >= first:
                kind = name
        return kind


def bf16(x: torch.Tensor) -> torch.Tensor:
    """bfloat16, contiguous, and 32-byte aligned (the AVX-512 kernels use aligned loads)."""
    xb = x.to(torch.bfloat16).contiguous()
    if xb.data_ptr() % 32:
        xb = xb.clone()
    return xb


#: fewest weight rows per GEMM call of the one-pass conversions: one GEMM per smaller block (and
#: its strided output) was clearly slower than one GEMM at K = 4096 in ad-hoc timings while
#: tuning (not a bench script); the end-to-end effect is in bench/e2e.py and bench/kernels.py
MIN_GEMM_ROWS = 512


#: a converted weight up to this size is one block (one GEMM call, its bias fused), which timed
#: a little faster than two blocks on a 1536x384 weight in ad-hoc timings while tuning
ONE_BLOCK_BYTES = 4 << 20


def rows_per_block(k: int, dtype: torch.dtype, least: int = 16, n: int | None = None) -> int:
    size = torch.tensor([], dtype=dtype).element_size()
    if n is not None and n * k * size <= ONE_BLOCK_BYTES:
        return n
    return max(least, _BLOCK_BYTES // max(1, k * size))


def gemm_into(out: torch.Tensor, i: int, j: int, x: torch.Tensor, block: torch.Tensor) -> None:
    """``out[:, i:j] = x @ block^T``; with autograd recording, a fresh copy of the (reused)
    block, so the gradient with respect to ``x`` stays correct."""
    if torch.is_grad_enabled() and x.requires_grad:
        out[:, i:j] = torch.matmul(x, block.clone().t())
    else:
        torch.matmul(x, block.t(), out=out[:, i:j])


# --------------------------------------------------------------------------- int8


#: Input rows per call of fbgemm's dynamic linear. Above it the call is made per chunk of rows
#: so its temporaries (the float input, its uint8 codes, the int32 output) stay in cache: at
#: 4096 rows of a MiniLM-sized layer one call was 1.0-3.5x slower than 512-row chunks
#: (``bench/kernels.py --chunks``).
CHUNK_ROWS = 512


def int8_dynamic(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token int8 inputs on fbgemm's per-tensor kernel: each row is first divided by its
    own max |x| (so one per-tensor scale has every token's resolution), and the output row
    multiplied back, the bias added in the same pass; ``W (x / a) * a = W x``. Many rows go in
    chunks of :data:`CHUNK_ROWS`, written straight into an output of the input's dtype. The
    division runs in one C pass per row where the layer was prepared with it
    (``tensors["unit"]``: :func:`.gemv.rows_unit`), else with torch ops (the same quotients)."""
    packed, m = p.tensors["packed"], x.shape[0]
    rr = fbgemm_reduce_range()
    if bias is not None and bias.dtype != torch.float32:
        bias = bias.to(torch.float32)
    if m == 1:  # one token: the per-call scale already is its own
        y = torch.ops.quantized.linear_dynamic(x.to(torch.float32).contiguous(), packed, rr)
        return y if bias is None else y.add_(bias)
    unit = p.tensors.get("unit")
    out = torch.empty(m, p.n, dtype=x.dtype if x.is_floating_point() else torch.float32)
    buf = scratch("int8_dynamic", (min(m, CHUNK_ROWS), p.k), torch.float32)
    for i in range(0, m, CHUNK_ROWS):
        xb = x[i : i + CHUNK_ROWS]
        xd = buf[: xb.shape[0]]
        if unit is not None and xb.dtype == torch.float32 and xb.stride(1) == 1:
            amax = unit(xb, xd)
        else:
            amax = xb.abs().amax(dim=1, keepdim=True).to(torch.float32).clamp_min_(1e-30)
            torch.div(xb, amax, out=xd)
        y, o = torch.ops.quantized.linear_dynamic(xd, packed, rr), out[i : i + CHUNK_ROWS]
        if bias is None:
            torch.mul(y, amax, out=o)
        else:  # y * a + bias in one pass over the output
            torch.addcmul(bias, y, amax, out=o)
    return out


def int8_dynamic_intmm(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    """Per-token int8 inputs with ``torch._int_mm`` (int32 accumulation): the path where
    fbgemm's quantized ops are missing. Codes as :func:`~monoquant_core.activations.
    quantize_per_token` makes them."""
    x = x.to(torch.float32)
    amax = x.abs().amax(dim=1, keepdim=True)
    xs = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(x / xs).clamp_(-127, 127).to(torch.int8)
    y = torch._int_mm(codes, p.tensors["wq"].t())
    return y.to(torch.float32).mul_(xs).mul_(p.tensors["s"])


def int8_dynamic_tensor(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(
        x.to(torch.float32).contiguous(), p.tensors["packed"], fbgemm_reduce_range()
    )


def int8_static(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    t = p.tensors
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return op(x.to(torch.float32).contiguous(), t["xs"], t["xz"], t["packed"])


def int8_static_ref(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return F.linear(fake_quantize_static(x, p.tensors["qt"]), p.tensors["w"])


def int8_weight(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return torch._weight_int8pack_mm(bf16(x), p.tensors["wq"], p.tensors["s_bf16"])


def int8_gemm(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    """Weight-only int8 for many rows: ``y = (x @ q^T) * s`` with the codes converted to the
    compute dtype block by block (exact: |q| <= 127) and one GEMM per block."""
    t = p.tensors
    dtype = t["compute"]
    xc = x.to(dtype).contiguous()
    wq, n, k = t["wq"], p.n, p.k
    out = torch.empty(x.shape[0], n, dtype=dtype)
    rows = rows_per_block(k, dtype, MIN_GEMM_ROWS)
    buf = scratch("int8_gemm", (min(rows, n), k), dtype)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        b = buf[: j - i]
        b.copy_(wq[i:j])
        gemm_into(out, i, j, xc, b)
    return out * t["s_compute"] if out.requires_grad else out.mul_(t["s_compute"])


# --------------------------------------------------------------------------- int4


def int4(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    t = p.tensors
    return torch._weight_int4pack_mm_for_cpu(bf16(x), t["packed"], t["gs"], t["sz"])


def int4_gemm(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    """Weight-only int4 for many rows: the nibbles of a block of rows are unpacked into two
    planes (even and odd inputs), dequantized in float32 ``(u - z) * s``, converted to the
    compute dtype and multiplied with the input whose columns are reordered the same way
    (even inputs first), so no interleaving pass is needed."""
    t = p.tensors
    dtype = t["compute"]
    n, k, gs = p.n, p.k, t["gs"]
    groups, half = k // gs, k // 2
    xc = torch.cat([x[:, 0::2], x[:, 1::2]], dim=1).to(dtype)
    out = torch.empty(x.shape[0], n, dtype=dtype)
    rows = rows_per_block(k, torch.float32)
    m = min(rows, n)
    u8 = scratch("int4_gemm.u8", (m, half), torch.uint8)
    f32 = scratch("int4_gemm.f32", (m, k), torch.float32)
    low = scratch("int4_gemm.low", (m, k), dtype) if dtype != torch.float32 else f32
    codes, scale, zs, flip = t["codes"], t["scale"], t["zs"], t["flip"]
    for i in range(0, n, rows):
        j = min(i + rows, n)
        r = j - i
        p8 = codes[i:j]
        if flip:  # signed nibbles: u = code ^ 8 is code + 8 in 0..15
            p8 = torch.bitwise_xor(p8, 0x88, out=scratch("int4_gemm.flip", (r, half), torch.uint8))
        planes = f32[:r].view(r, 2, half)
        torch.bitwise_and(p8, 15, out=u8[:r])
        planes[:, 0].copy_(u8[:r])
        torch.bitwise_right_shift(p8, 4, out=u8[:r])
        planes[:, 1].copy_(u8[:r])
        g = f32[:r].view(r, 2, groups, gs // 2)
        g.mul_(scale[i:j, None, :, None]).sub_(zs[i:j, None, :, None])
        if low is not f32:
            low[:r].copy_(f32[:r])
        gemm_into(out, i, j, xc, low[:r])
    return out


# --------------------------------------------------------------------------- 16-bit


def fp16(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(
        x.to(torch.float32).contiguous(), p.tensors["packed"]
    )


def bf16_linear(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return F.linear(x.to(torch.bfloat16), p.tensors["w"])


KERNELS = {
    "int8-dynamic": int8_dynamic,
    "int8-dynamic-intmm": int8_dynamic_intmm,
    "int8-dynamic-tensor": int8_dynamic_tensor,
    "int8-static": int8_static,
    "int8-static-ref": int8_static_ref,
    "int8-weight": int8_weight,
    "int8-gemm": int8_gemm,
    "int4": int4,
    "int4-gemm": int4_gemm,
    "fp16": fp16,
    "bf16": bf16_linear,
}

#: what each kernel is, as ``monoquant plan`` shows it
DESCRIPTIONS = {
    "int8-dynamic": "fbgemm int8 x int8, per-token inputs",
    "int8-dynamic-intmm": "torch._int_mm int8 x int8, per-token inputs",
    "int8-dynamic-tensor": "fbgemm int8 x uint8, one input scale per call",
    "int8-static": "fbgemm int8 x uint8, calibrated input scale",
    "int8-static-ref": "reference numerics (fbgemm static did not match)",
    "int8-weight": "_weight_int8pack_mm, bf16 inputs",
    "int8-gemm": "int8 rows -> {compute} blocks + {compute} GEMM",
    "int4": "_weight_int4pack_mm_for_cpu, bf16 inputs",
    "int4-gemm": "int4 rows -> {compute} blocks + {compute} GEMM",
    "fp16": "fbgemm fp16 weights, fp32 inputs",
    "bf16": "bf16 F.linear",
}
