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
  the GEMM path at every ``M``); from the crossover ``M`` on, one of our GEMMs
  (:mod:`.cpu_schedule` picks: :mod:`.bf16_gemm` where bfloat16 dot products beat float32
  FMAs, else :mod:`.f32_gemm`), or the codes converted to the compute dtype in blocks and
  multiplied with a BLAS GEMM (AMX CPUs, shapes our GEMMs refuse, no C compiler).
* ``int4-group``: for few rows the C GEMV of :mod:`.int4_gemv` (float32 math, any N; AVX-512
  and a C compiler), else ``torch._weight_int4pack_mm_for_cpu`` (bf16 inputs; N % 16 == 0);
  layouts derived at prepare time, never stored; from the crossover on, our GEMMs as for int8,
  else blocked dequantize + GEMM (the C kernel of :data:`.dequant.DEQUANT` where it builds and
  the CPU computes in bfloat16, else PyTorch ops: a later crossover).
* ``fp16``: fbgemm's ``linear_dynamic_fp16``, and from 32 rows our float32 GEMM where it
  runs; ``bf16``: ``F.linear`` in bfloat16.

Every kernel constraint is checked in :meth:`TorchCpuBackend.supports`; what no kernel here
can run is left to ``reference``. Crossovers: :data:`.cpu_kernels.CROSSOVER`, overridden by
``MONOQUANT_TORCH_CPU_CROSSOVER=int8=32,int4=48``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from monoquant_core import Backend, Capabilities, FormatError, Kernel, hookimpl
from monoquant_core.activations import fake_quantize_static, static_act_params
from monoquant_core.qtensor import QTensor

from . import bf16_gemm, cpu_kernels, dequant, f32_gemm, gemv, int4_gemv
from .cpu_kernels import Prepared, expected_speedup, scratch
from .cpu_schedule import GROUPS, compute, fbgemm, own_gemm, schedule
from .fbgemm_probe import saturation_note

#: every kernel by name: PyTorch-op ones, the C-conversion ones and the C GEMVs
KERNELS = {
    **cpu_kernels.KERNELS,
    **dequant.KERNELS,
    **gemv.KERNELS,
    **int4_gemv.KERNELS,
    **bf16_gemm.KERNELS,
    **f32_gemm.KERNELS,
}
DESCRIPTIONS = {
    **cpu_kernels.DESCRIPTIONS,
    **bf16_gemm.DESCRIPTIONS,
    **f32_gemm.DESCRIPTIONS,
    **dequant.DESCRIPTIONS,
    **gemv.DESCRIPTIONS,
    **int4_gemv.DESCRIPTIONS,
}
#: the kernels that take the bias (the caller adds it for the others)
FUSED_BIAS = (
    dequant.FUSED_BIAS
    | set(gemv.KERNELS)
    | set(int4_gemv.KERNELS)
    | bf16_gemm.FUSED_BIAS
    | f32_gemm.FUSED_BIAS
    | {"int8-dynamic"}
)

_STATIC_OP = "linear_with_input_q_dq_qweight_dq_output_fp32"


def _static_op() -> bool:
    try:
        getattr(torch.ops.quantized, _STATIC_OP)
    except (AttributeError, RuntimeError):
        return False
    return True


class TorchCpuBackend(Backend):
    name = "torch-cpu"
    device_types = ("cpu",)
    priority = 10
    capabilities = Capabilities(
        bits=(4, 8, 16),
        group_sizes=(None, *GROUPS),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        devices=("cpu",),
        numerics=(
            "int8 dynamic: int8 inputs per token (dynamic-tensor: one uint8 scale per call; "
            "static: the calibrated uint8 scale / zero point), int32 accumulation; int8 and "
            "int4-group weight-only below the crossover M: float32 arithmetic on the inputs as "
            "given (C GEMVs on AVX-512 CPUs; elsewhere torch's kernels on bfloat16 inputs); "
            "above it: bfloat16 inputs where bfloat16 dot products are faster than float32 "
            "FMAs (fp32 inputs are cast), else float32 inputs, fp32 accumulation; fp16: "
            "float32 inputs x the fp16 weights widened (our GEMM), or fbgemm fp16 weights with "
            "fp32 activations (a bfloat16 model's fp16 weights: bfloat16 F.linear from M = 16); "
            "bf16: bfloat16 F.linear"
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
            own = own_gemm() == "f32" and f32_gemm.fits(*info.shape)
            ok = own or fbgemm() or info.dtype == torch.bfloat16
            return None if ok else "fbgemm/x86 quantized engine missing"
        if info.scheme == "bf16":
            return None
        return f"no CPU kernel for scheme {info.scheme!r}"

    def kernels(self, info):
        n, k = info.shape
        sched = schedule(info.scheme, info.activations, n, k, info.spec.group_size, info.dtype)
        out = []
        for i, (first, name) in enumerate(sched):
            last = sched[i + 1][0] - 1 if i + 1 < len(sched) else None
            desc = DESCRIPTIONS.get(name, name).format(compute=str(compute())[6:])
            desc += saturation_note(name) + _rate_note(name)
            out.append(Kernel(desc, first, last))
        return tuple(out)

    def expected_speedup(self, info, rows):
        n, k = info.shape
        sched = schedule(info.scheme, info.activations, n, k, info.spec.group_size, info.dtype)
        kind = next(name for first, name in reversed(sched) if rows >= first)
        return expected_speedup(kind, info.dtype, rows)

    def prepare(self, qt: QTensor, scheme) -> Prepared:
        n, k = qt.shape
        sched = schedule(qt.scheme, qt.activations, n, k, qt.group_size, qt.dtype)
        if qt.scheme == "int8":
            return _prepare_int8(qt, scheme, sched, n, k)
        if qt.scheme == "int4-group":
            return _prepare_int4(qt, sched, n, k)
        w = scheme.dequantize(qt)
        if sched[-1][1] == "fp16-gemm-f32":  # fbgemm's packed copy for few rows, if any
            t = {"w16": w.to(torch.float16).contiguous()}
            if sched[0][1] == "fp16":
                t["packed"] = torch.ops.quantized.linear_prepack_fp16(w.to(torch.float32), None)
            return Prepared(n, k, sched, t)
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


def _rate_note(kind: str) -> str:
    """Why our float32 or bfloat16 GEMM runs: the measured dot-product rates."""
    rate = f32_gemm.bf16_rate() if kind.endswith(("-gemm-f32", "-gemm-bf16")) else None
    return "" if rate is None else f" (bf16 dot products: {rate:.2f}x the fp32 FMA rate here)"


def _int8_reason(activations: str, symmetric: bool) -> str | None:
    if not symmetric:
        return "int8 kernels need symmetric weights (zero point 0)"
    if activations == "dynamic":
        ok = fbgemm() or hasattr(torch, "_int_mm")
        return None if ok else "neither fbgemm's quantized ops nor torch._int_mm are here"
    if activations == "dynamic-tensor":
        return None if fbgemm() else "fbgemm/x86 quantized engine missing"
    if activations == "static":
        if not fbgemm():
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
        if "int8-dynamic" in kinds and gemv.gemv_library() is not None:
            t["unit"] = gemv.rows_unit  # the per-token division in one C pass
        if qt.activations == "static":
            return _static_prepare(qt, scheme, t["packed"], n, k)
    if "int8-weight" in kinds:
        t["s_bf16"] = scale.to(torch.bfloat16)
    if kinds & {"int8-gemm", "int8-gemm-c", "int8-gemm-bf16"}:
        t["compute"] = compute()
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
    if "int4-gemm-f32" in kinds:
        t.update(f32_gemm.int4_tensors(qt))
    if kinds & {"int4-gemm", "int4-gemm-c"}:
        t["compute"] = compute()
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
