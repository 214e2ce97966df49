"""``torch-cpu`` backend: PyTorch's fused CPU kernels for quantized Linear layers, chosen per
weight and per number of input rows ``M`` (``monoquant plan`` shows the choice).

What runs where (docs/performance.md has the measurements; :mod:`.cpu_kernels` the kernels):

* ``int8`` with ``activations="dynamic"`` (W8A8, inputs quantized per token on every call):
  fbgemm's ``quantized::linear_dynamic`` (``reduce_range=False``), each token first divided by
  its own max |x| so the per-call scale has per-token resolution. Where fbgemm's quantized ops
  are missing (torch deprecates them), ``torch._int_mm`` with the same per-token codes.
* ``int8`` with ``activations="dynamic-tensor"``: fbgemm at every ``M`` (one activation scale
  per call). ``activations="static"``: fbgemm's static int8 linear, checked against the
  reference on a probe input at prepare time (reference numerics with a warning on a mismatch).
* ``int8`` weight-only: for few rows the C GEMV of :mod:`.gemv` (float32 math, any K; AVX-512
  and a C compiler), else ``torch._weight_int8pack_mm`` (bf16 inputs; K % 16 != 0 then uses
  the GEMM path at every ``M``); from the crossover ``M`` on, the codes are converted to the
  compute dtype in blocks and multiplied with a GEMM (bfloat16 where the CPU has AVX512-BF16 or
  AMX, else float32).
* ``int4-group``: for few rows the C GEMV of :mod:`.int4_gemv` (float32 math, any N; AVX-512
  and a C compiler), else ``torch._weight_int4pack_mm_for_cpu`` (bf16 inputs; N % 16 == 0);
  layouts derived at prepare time, never stored; blocked dequantize + GEMM from the crossover on:
  the blocks dequantized into bfloat16 in one pass by the C kernel of
  :data:`.dequant.DEQUANT` where it builds (AVX-512, a C compiler) and the CPU computes in
  bfloat16, else with PyTorch ops (a later crossover).
* ``fp16``: fbgemm's ``linear_dynamic_fp16``; ``bf16``: ``F.linear`` in bfloat16.

Every kernel constraint is checked in :meth:`TorchCpuBackend.supports`; what no kernel here
can run is left to ``reference``. Crossovers: :data:`.cpu_kernels.CROSSOVER`, overridden by
``MONOQUANT_TORCH_CPU_CROSSOVER=int8=32,int4=48``.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F

from monoquant_core import Backend, Capabilities, FormatError, Kernel, UsageError, hookimpl
from monoquant_core.activations import fake_quantize_static, static_act_params
from monoquant_core.hardware import has_bf16_compute
from monoquant_core.qtensor import QTensor

from . import bf16_gemm, cpu_kernels, dequant, gemv, int4_gemv
from .bf16_gemm import bf16_gemm_library
from .cpu_kernels import Prepared, crossover, expected_speedup, scratch
from .dequant import dequant_library
from .fbgemm_probe import saturation_note
from .gemv import gemv_library
from .int4_gemv import int4_gemv_library

#: every kernel by name: PyTorch-op ones, the C-conversion ones and the C GEMVs
KERNELS = {
    **cpu_kernels.KERNELS,
    **dequant.KERNELS,
    **gemv.KERNELS,
    **int4_gemv.KERNELS,
    **bf16_gemm.KERNELS,
}
DESCRIPTIONS = {
    **cpu_kernels.DESCRIPTIONS,
    **bf16_gemm.DESCRIPTIONS,
    **dequant.DESCRIPTIONS,
    **gemv.DESCRIPTIONS,
    **int4_gemv.DESCRIPTIONS,
}
#: the kernels that take the bias (the caller adds it for the others)
FUSED_BIAS = dequant.FUSED_BIAS | set(gemv.KERNELS) | set(int4_gemv.KERNELS) | bf16_gemm.FUSED_BIAS

_GROUPS = (32, 64, 128, 256)
#: first M at which a bfloat16 model's fp16 weights run the bf16 F.linear (``bench/kernels.py``:
#: fbgemm's fp16 kernel is faster up to M = 8, slower from 16)
FP16_BF16_ROWS = 16
_STATIC_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"
_ENV = "MONOQUANT_TORCH_CPU_CROSSOVER"


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def _fbgemm() -> bool:
    engines = torch.backends.quantized.supported_engines
    if not any(e in engines for e in ("x86", "fbgemm")):
        return False
    try:
        torch.ops.quantized.linear_prepack  # noqa: B018  (deprecated ops may disappear)
        torch.ops.quantized.linear_dynamic  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _static_op() -> bool:
    try:
        getattr(torch.ops.quantized, _STATIC_OP)
    except (AttributeError, RuntimeError):
        return False
    return True


def _compute() -> torch.dtype:
    return torch.bfloat16 if has_bf16_compute() else torch.float32


def _native() -> bool:
    """The one-pass C conversions into bfloat16 run here (and the CPU computes in bf16)."""
    return _compute() == torch.bfloat16 and dequant_library() is not None


def _override() -> dict[str, int]:
    raw = os.environ.get(_ENV, "").strip()
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, _, value = part.partition("=")
        if key.strip() not in ("int8", "int4") or not value.strip().isdigit():
            raise UsageError(
                f"{_ENV}={raw!r}: {part!r} is not int8=M or int4=M",
                f"write e.g. {_ENV}=int8=32,int4=48, or unset it",
            )
        out[key.strip()] = max(1, int(value))
    return out


def _int4pack_ok(n: int, k: int, gs: int | None) -> bool:
    return _has("_weight_int4pack_mm_for_cpu") and gs in _GROUPS and k % gs == 0 and n % 16 == 0


def _schedule(scheme: str, activations: str, n: int, k: int, gs: int | None, dtype: torch.dtype):
    """``((first M, kernel), ...)`` for a supported weight: what :meth:`prepare` builds.

    ``dtype`` is the original weight's (the model's) dtype. An ``fp16`` weight of a bfloat16
    model runs fbgemm's fp16 kernel for few rows (1.3-2x a bf16 ``nn.Linear`` at M <= 8) and,
    from M = 16, a bfloat16 ``F.linear`` on a bf16 copy made at prepare time (fp16 holds every
    normal bf16 value exactly, so this is the bf16 model's own layer): fbgemm's kernel needs
    float32 inputs and was 0.5x a bf16 ``nn.Linear`` there, and torch's fp16 -> bf16
    conversion is too slow to do per call."""
    if scheme == "fp16" and dtype == torch.bfloat16:
        return ((1, "fp16"), (FP16_BF16_ROWS, "bf16")) if _fbgemm() else ((1, "bf16"),)
    if scheme == "int8":
        if activations == "dynamic":
            if not _fbgemm():
                return ((1, "int8-dynamic-intmm"),)
            return bf16_gemm.w8a8_schedule(n, k, dtype)  # fbgemm (+ our GEMM for many rows)
        if activations == "dynamic-tensor":
            return ((1, "int8-dynamic-tensor"),)
        if activations == "static":
            return ((1, "int8-static"),)
        gemm = "int8-gemm-c" if _native() else "int8-gemm"
        if bf16_gemm.fits(n, k) and _compute() == torch.bfloat16 and bf16_gemm_library():
            if gemv_library() is not None:  # our AVX512-BF16 GEMM, then the conversion path
                first = crossover("int8-c", n, k, _override())
                last = max(first, bf16_gemm.last_rows(k))
                return ((1, "int8-gemv-c"), (first, "int8-gemm-bf16"), (last + 1, gemm))
            gemm = "int8-gemm-bf16"
        if gemv_library() is not None:
            return ((1, "int8-gemv-c"), (crossover("int8-c", n, k, _override()), gemm))
        if k % 16 or not _has("_weight_int8pack_mm"):
            return ((1, gemm),)
        return ((1, "int8-weight"), (crossover("int8", n, k, _override()), gemm))
    if scheme == "int4-group":
        native = gs is not None and gs % 32 == 0 and _native()
        gemm = "int4-gemm-c" if native else "int4-gemm"
        if bf16_gemm.fits_int4(n, k, gs) and _compute() == torch.bfloat16 and bf16_gemm_library():
            if gs in _GROUPS and int4_gemv_library() is not None:  # then the conversion path
                first = crossover("int4-gemv-c", n, k, _override())
                last = max(first, bf16_gemm.last_rows(k))
                return ((1, "int4-gemv-c"), (first, "int4-gemm-bf16"), (last + 1, gemm))
            gemm, native = "int4-gemm-bf16", True
        if gs in _GROUPS and int4_gemv_library() is not None:  # any N; then either GEMM
            first = crossover("int4-gemv-c" if native else "int4", n, k, _override())
            return ((1, "int4-gemv-c"), (first, gemm))
        if not _int4pack_ok(n, k, gs):
            return ((1, gemm),)
        return ((1, "int4"), (crossover("int4-c" if native else "int4", n, k, _override()), gemm))
    return ((1, scheme),)


class TorchCpuBackend(Backend):
    name = "torch-cpu"
    device_types = ("cpu",)
    priority = 10
    capabilities = Capabilities(
        bits=(4, 8, 16),
        group_sizes=(None, *_GROUPS),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        devices=("cpu",),
        numerics=(
            "int8 dynamic: int8 inputs per token (dynamic-tensor: one uint8 scale per call; "
            "static: the calibrated uint8 scale / zero point), int32 accumulation; int8 and "
            "int4-group weight-only below the crossover M: float32 arithmetic on the inputs as "
            "given (C GEMVs on AVX-512 CPUs; elsewhere torch's kernels on bfloat16 inputs); "
            "above it: bfloat16 inputs (fp32 inputs are cast; float32 on CPUs without native "
            "bfloat16), fp32 accumulation; fp16: "
            "fbgemm fp16 weights with fp32 activations (a bfloat16 model's fp16 weights: bfloat16 "
            "F.linear from M = 16); bf16: bfloat16 F.linear"
        ),
    )

    def available(self):
        return True

    def supports(self, info):
        if len(info.shape) != 2 or info.spec.axis not in (0, None):
            return "needs a 2-D [out, in] weight (nn.Linear layout)"
        k = info.shape[1]
        if info.scheme == "int8":
            return _int8_reason(info.activations, info.spec.symmetric)
        if info.scheme == "int4-group":
            gs = info.spec.group_size
            if info.activations != "none":
                return f"no int4 kernel with activations={info.activations!r} (cpu-vnni has W4A8)"
            if gs is None or k % gs or k % 2:
                return f"K % group_size != 0 (K={k}, group_size={gs})"
            return None
        if info.scheme == "fp16":
            ok = _fbgemm() or info.dtype == torch.bfloat16
            return None if ok else "fbgemm/x86 quantized engine missing"
        if info.scheme == "bf16":
            return None
        return f"no CPU kernel for scheme {info.scheme!r}"

    def kernels(self, info):
        n, k = info.shape
        sched = _schedule(info.scheme, info.activations, n, k, info.spec.group_size, info.dtype)
        out = []
        for i, (first, name) in enumerate(sched):
            last = sched[i + 1][0] - 1 if i + 1 < len(sched) else None
            desc = DESCRIPTIONS.get(name, name).format(compute=str(_compute())[6:])
            desc += saturation_note(name)
            out.append(Kernel(desc, first, last))
        return tuple(out)

    def expected_speedup(self, info, rows):
        n, k = info.shape
        sched = _schedule(info.scheme, info.activations, n, k, info.spec.group_size, info.dtype)
        kind = next(name for first, name in reversed(sched) if rows >= first)
        return expected_speedup(kind, info.dtype, rows)

    def prepare(self, qt: QTensor, scheme) -> Prepared:
        n, k = qt.shape
        sched = _schedule(qt.scheme, qt.activations, n, k, qt.group_size, qt.dtype)
        if qt.scheme == "int8":
            return _prepare_int8(qt, scheme, sched, n, k)
        if qt.scheme == "int4-group":
            return _prepare_int4(qt, sched, n, k)
        w = scheme.dequantize(qt)
        if qt.scheme == "fp16" and sched[0][1] == "fp16":
            packed = torch.ops.quantized.linear_prepack_fp16(w.to(torch.float32), None)
            t = {"packed": packed}
            if len(sched) > 1:  # a bf16 model: its own bf16 weight for many rows
                t["w"] = w.to(torch.bfloat16)
            return Prepared(n, k, sched, t)
        return Prepared(n, k, ((1, "bf16"),), {"w": w.to(torch.bfloat16)})

    def linear(self, x: torch.Tensor, prepared: Prepared, bias: torch.Tensor | None):
        p = prepared
        lead = x.shape[:-1]
        x2 = x.reshape(-1, p.k)
        m = x2.shape[0]
        kind = p.pick(m) if m else None
        if kind == "bf16" and x.dtype == torch.bfloat16 and (bias is None or bias.dtype == x.dtype):
            return F.linear(x, p.tensors["w"], bias)  # the bf16 model's own layer, bias fused
        if kind in FUSED_BIAS:
            y = KERNELS[kind](x2, p, bias)
            return (y if y.dtype == x.dtype else y.to(x.dtype)).reshape(*lead, p.n)
        y = x2.new_zeros((0, p.n)) if m == 0 else KERNELS[kind](x2, p)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None:
            y = y.add_(bias) if bias.dtype == y.dtype else y + bias.to(y.dtype)
        return y.reshape(*lead, p.n)


def _int8_reason(activations: str, symmetric: bool) -> str | None:
    if not symmetric:
        return "int8 kernels need symmetric weights (zero point 0)"
    if activations == "dynamic":
        ok = _fbgemm() or hasattr(torch, "_int_mm")
        return None if ok else "neither fbgemm's quantized ops nor torch._int_mm are here"
    if activations == "dynamic-tensor":
        return None if _fbgemm() else "fbgemm/x86 quantized engine missing"
    if activations == "static":
        if not _fbgemm():
            return "fbgemm/x86 quantized engine missing"
        return None if _static_op() else f"torch has no quantized::{_STATIC_OP}"
    if activations != "none":
        return f"no CPU kernel for int8 activations={activations!r}"
    return None


def _prepare_int8(qt: QTensor, scheme, sched, n: int, k: int) -> Prepared:
    scale = qt.scale.reshape(-1).to(torch.float32).expand(n).contiguous()
    wq = qt.qdata.reshape(n, k).contiguous()
    kinds = {name for _, name in sched}
    t: dict = {"wq": wq, "s": scale}
    if kinds & {"int8-dynamic", "int8-dynamic-tensor", "int8-static"}:
        with warnings.catch_warnings():  # torch deprecates qint8 tensors; the ops stay for now
            warnings.simplefilter("ignore", UserWarning)
            qw = torch._make_per_channel_quantized_tensor(
                wq, scale.double(), torch.zeros(n, dtype=torch.long), 0
            )
            t["packed"] = torch.ops.quantized.linear_prepack(qw, None)
        if qt.activations == "static":
            return _static_prepare(qt, scheme, t["packed"], n, k)
    if "int8-weight" in kinds:
        t["s_bf16"] = scale.to(torch.bfloat16)
    if kinds & {"int8-gemm", "int8-gemm-c", "int8-gemm-bf16"}:
        t["compute"] = _compute()
        t["s_compute"] = scale.to(t["compute"])
    return Prepared(n, k, sched, t)


def _prepare_int4(qt: QTensor, sched, n: int, k: int) -> Prepared:
    gs = qt.group_size
    kinds = {name for _, name in sched}
    scale = qt.scale.to(torch.float32)
    # signed codes -8..7 run as u = code + 8 in 0..15 with zero 8: w = (u - 8) * s
    zero = torch.full_like(scale, 8.0) if qt.symmetric else qt.zero_point.to(torch.float32)
    t: dict = {"gs": gs}
    if "int4" in kinds:
        t.update(int4pack_tensors(qt))
    if "int4-gemv-c" in kinds:
        t.update(int4_gemv.prepare(qt))
    if "int4-gemm-bf16" in kinds:
        t["compute"] = torch.bfloat16
        t.update(bf16_gemm.int4_tensors(qt))
    if kinds & {"int4-gemm", "int4-gemm-c"}:
        t["compute"] = _compute()
        t["scale"] = scale.contiguous()
        t["zs"] = (zero * scale).contiguous()
        t["flip"] = qt.symmetric
        t["codes"] = qt.qdata  # stored layout: two nibbles per byte, low first
    return Prepared(n, k, sched, t)


def int4pack_tensors(qt: QTensor) -> dict:
    """torch's ``_weight_int4pack_mm_for_cpu`` operands of an int4-group QTensor: the packed
    codes and the bfloat16 ``[K / gs, N, 2]`` scales and offsets."""
    n, k = qt.shape
    scale = qt.scale.to(torch.float32)
    zero = torch.full_like(scale, 8.0) if qt.symmetric else qt.zero_point.to(torch.float32)
    sz = torch.stack([scale, (8.0 - zero) * scale], dim=-1)
    packed = _int4pack(qt.qdata, n, k, qt.symmetric)
    return {"packed": packed, "sz": sz.transpose(0, 1).contiguous().to(torch.bfloat16)}


#: rows converted to torch's CPU int4 layout at a time: a multiple of its 64-row tiles, so the
#: blocks concatenate to the whole weight's layout (tested), with a small int32 temporary
_PACK_ROWS = 1024


def _int4pack(qdata: torch.Tensor, n: int, k: int, symmetric: bool) -> torch.Tensor:
    """torch's CPU int4 layout (``_convert_weight_to_int4pack_for_cpu``) from the stored
    nibbles, a block of rows at a time: unsigned codes 0..15 (a signed two's complement nibble
    ``^ 8`` is ``code + 8``) written straight into a reused int32 block."""
    out = torch.empty(n, k // 2, dtype=torch.uint8)
    codes = scratch("int4pack.codes", (min(_PACK_ROWS, n), k), torch.int32)
    for i in range(0, n, _PACK_ROWS):
        p = qdata[i : i + _PACK_ROWS]
        b = codes[: p.shape[0]]
        torch.bitwise_and(p, 15, out=b[:, 0::2])
        torch.bitwise_right_shift(p, 4, out=b[:, 1::2])
        if symmetric:
            b.bitwise_xor_(8)
        out[i : i + p.shape[0]] = torch._convert_weight_to_int4pack_for_cpu(b, 1)
    return out


def _static_prepare(qt: QTensor, scheme, packed, n: int, k: int) -> Prepared:
    try:
        xs, xz = static_act_params(qt)
    except ValueError as e:
        raise FormatError(f"{e}", "quantize the layer again with calibration data") from None
    p = Prepared(n, k, ((1, "int8-static"),), {"packed": packed, "xs": xs, "xz": xz})
    # Probe: codes spread over the whole uint8 range, against the reference numerics.
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randint(0, 256, (8, k), generator=gen).float() - xz) * xs
    w = scheme.dequantize(qt).to(torch.float32)
    ref = F.linear(fake_quantize_static(probe, qt), w)
    got = KERNELS["int8-static"](probe, p)
    tol = 1e-4 * float(ref.abs().max()) + 1e-6
    if float((got - ref).abs().max()) <= tol:
        return p
    warnings.warn(
        f"torch-cpu: fbgemm's static int8 linear did not match the reference for a {n}x{k} "
        "weight; this layer runs the reference numerics instead",
        RuntimeWarning,
        stacklevel=3,
    )
    return Prepared(n, k, ((1, "int8-static-ref"),), {"qt": qt, "w": w})


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "torch-cpu"


@hookimpl
def monoquant_register_backends(register):
    register(TorchCpuBackend())
