"""Which kernel the ``torch-cpu`` backend runs for a weight, by input rows ``M``: the schedule
:meth:`.torch_cpu.TorchCpuBackend.prepare` builds and ``monoquant plan`` / ``monoquant env``
show, and the capability checks it rests on.

Many-row GEMMs (:func:`own_gemm`): our AVX512-BF16 GEMM (:mod:`.bf16_gemm`) where the core's
bfloat16 dot products beat its float32 FMAs by a margin (Zen 4 / Zen 5), else our float32
GEMM (:mod:`.f32_gemm`: an Intel Xeon with AVX512-BF16 and no AMX ran ``vdpbf16ps`` at 0.49x
the FMA rate), and on AMX CPUs the conversion path, whose bfloat16 blocks oneDNN multiplies
with AMX tiles (not measured here: no AMX CPU in our sessions so far).
"""

from __future__ import annotations

import os

import torch

from monoquant_core import UsageError
from monoquant_core.hardware import cpu_features, has_bf16_compute

from . import bf16_gemm, f32_gemm
from .bf16_gemm import bf16_gemm_library
from .cpu_kernels import crossover
from .dequant import dequant_library
from .f32_gemm import bf16_faster, f32_gemm_library
from .gemv import gemv_library
from .int4_gemv import int4_gemv_library

__all__ = ["ENV", "GROUPS", "compute", "fbgemm", "has_op", "own_gemm", "schedule"]

GROUPS = (32, 64, 128, 256)
#: first M at which a bfloat16 model's fp16 weights run the bf16 F.linear (``bench/kernels.py``:
#: fbgemm's fp16 kernel is faster up to M = 8, slower from 16)
FP16_BF16_ROWS = 16
#: first M at which fp16 weights run our float32 GEMM where it runs (Intel Xeon without AMX):
#: fbgemm's fp16 kernel was 1.08-1.14x ours at M = 8 (``bench/kernels.py --threads 1 --quick``,
#: cold 4096x4096) and the 4-block decoder at one token ran 1.27x fp32 on it against 0.87x on
#: ours (``bench/e2e.py --batches 1x1``); ours was 1.2-1.4x fbgemm's at M = 32 and 128
FP16_F32_ROWS = 32
ENV = "MONOQUANT_TORCH_CPU_CROSSOVER"


def has_op(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def fbgemm() -> bool:
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        return False
    try:
        torch.ops.quantized.linear_prepack  # noqa: B018  (deprecated ops may disappear)
        torch.ops.quantized.linear_dynamic  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _amx() -> bool:
    return "amx_bf16" in cpu_features()


def compute() -> torch.dtype:
    """The dtype of the conversion path's blocks and BLAS GEMM: bfloat16 on AMX CPUs and where
    bfloat16 dot products are faster than float32 FMAs, else float32."""
    if has_bf16_compute() and (_amx() or bf16_faster()):
        return torch.bfloat16
    return torch.float32


def native() -> bool:
    """The one-pass C conversions into bfloat16 run here (and the CPU computes in bf16)."""
    return compute() == torch.bfloat16 and dequant_library() is not None


def own_gemm() -> str | None:
    """Our many-row GEMM here: ``"bf16"``, ``"f32"``, or None (the conversion path only)."""
    if _amx():
        return None
    if has_bf16_compute() and bf16_faster() and bf16_gemm_library() is not None:
        return "bf16"
    return "f32" if f32_gemm_library() is not None else None


def override() -> dict[str, int]:
    raw = os.environ.get(ENV, "").strip()
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, _, value = part.partition("=")
        if key.strip() not in ("int8", "int4") or not value.strip().isdigit():
            raise UsageError(
                f"{ENV}={raw!r}: {part!r} is not int8=M or int4=M",
                f"write e.g. {ENV}=int8=32,int4=48, or unset it",
            )
        out[key.strip()] = max(1, int(value))
    return out


def int4pack_ok(n: int, k: int, gs: int | None) -> bool:
    return has_op("_weight_int4pack_mm_for_cpu") and gs in GROUPS and k % gs == 0 and n % 16 == 0


def schedule(scheme: str, activations: str, n: int, k: int, gs: int | None, dtype: torch.dtype):
    """``((first M, kernel), ...)`` for a supported weight: what the backend prepares.

    ``dtype`` is the original weight's (the model's) dtype. An ``fp16`` weight of a bfloat16
    model runs fbgemm's fp16 kernel for few rows (1.3-2x a bf16 ``nn.Linear`` at M <= 8) and,
    from M = 16, a bfloat16 ``F.linear`` on a bf16 copy made at prepare time (fp16 holds every
    normal bf16 value exactly, so this is the bf16 model's own layer): fbgemm's kernel needs
    float32 inputs and was 0.5x a bf16 ``nn.Linear`` there, and torch's fp16 -> bf16
    conversion is too slow to do per call. Where our float32 GEMM runs, fp16 weights take it
    from :data:`FP16_F32_ROWS` rows on (any input dtype), fbgemm's kernel below."""
    own = own_gemm()
    if scheme == "fp16":
        if own == "f32" and f32_gemm.fits(n, k):
            return (
                ((1, "fp16"), (FP16_F32_ROWS, "fp16-gemm-f32"))
                if fbgemm()
                else ((1, "fp16-gemm-f32"),)
            )
        if dtype == torch.bfloat16:
            return ((1, "fp16"), (FP16_BF16_ROWS, "bf16")) if fbgemm() else ((1, "bf16"),)
        return ((1, "fp16"),)
    if scheme == "int8":
        return _int8(activations, n, k, dtype, own)
    if scheme == "int4-group":
        return _int4(n, k, gs, own)
    return ((1, scheme),)


def _int8(activations: str, n: int, k: int, dtype: torch.dtype, own: str | None):
    if activations == "dynamic":
        if not fbgemm():
            return ((1, "int8-dynamic-intmm"),)
        if own != "bf16":
            return ((1, "int8-dynamic"),)
        return bf16_gemm.w8a8_schedule(n, k, dtype)  # fbgemm (+ our GEMM for many rows)
    if activations == "dynamic-tensor":
        return ((1, "int8-dynamic-tensor"),)
    if activations == "static":
        return ((1, "int8-static"),)
    gemm = "int8-gemm-c" if native() else "int8-gemm"
    first = crossover("int8-c", n, k, override())
    if own == "f32" and f32_gemm.fits(n, k):  # then the conversion path
        first = crossover("int8-f32", n, k, override())
        last = max(first, f32_gemm.last_rows(k))
        if gemv_library() is not None:
            return ((1, "int8-gemv-c"), (first, "int8-gemm-f32"), (last + 1, gemm))
        gemm = "int8-gemm-f32"
    elif own == "bf16" and bf16_gemm.fits(n, k):
        if gemv_library() is not None:  # our AVX512-BF16 GEMM, then the conversion path
            last = max(first, bf16_gemm.last_rows(k))
            return ((1, "int8-gemv-c"), (first, "int8-gemm-bf16"), (last + 1, gemm))
        gemm = "int8-gemm-bf16"
    if gemv_library() is not None:
        return ((1, "int8-gemv-c"), (first, gemm))
    if k % 16 or not has_op("_weight_int8pack_mm"):
        return ((1, gemm),)
    return ((1, "int8-weight"), (crossover("int8", n, k, override()), gemm))


def _int4(n: int, k: int, gs: int | None, own: str | None):
    native_ = gs is not None and gs % 32 == 0 and native()
    gemm = "int4-gemm-c" if native_ else "int4-gemm"
    gemv = gs in GROUPS and int4_gemv_library() is not None  # any N
    if own == "f32" and f32_gemm.fits_int4(n, k, gs):
        # at every M: the float32 conversion path unpacks int4 with torch ops, 0.46-0.81x a
        # float32 F.linear where this GEMM is 0.68-1.04x (bench/kernels.py --f32-gemm)
        if gemv:
            return ((1, "int4-gemv-c"), (crossover("int4-f32", n, k, override()), "int4-gemm-f32"))
        gemm, native_ = "int4-gemm-f32", True
    elif own == "bf16" and bf16_gemm.fits_int4(n, k, gs):
        if gemv:  # then the conversion path
            first = crossover("int4-gemv-c", n, k, override())
            last = max(first, bf16_gemm.last_rows(k))
            return ((1, "int4-gemv-c"), (first, "int4-gemm-bf16"), (last + 1, gemm))
        gemm, native_ = "int4-gemm-bf16", True
    if gemv:  # then either GEMM
        first = crossover("int4-gemv-c" if native_ else "int4", n, k, override())
        return ((1, "int4-gemv-c"), (first, gemm))
    if not int4pack_ok(n, k, gs):
        return ((1, gemm),)
    return ((1, "int4"), (crossover("int4-c" if native_ else "int4", n, k, override()), gemm))
