"""``torch-cpu`` backend: PyTorch's fused CPU kernels for quantized Linear layers.

What runs where (see docs/performance.md for the measurements):

* ``int8`` with ``activations="dynamic"`` (W8A8, inputs quantized per token on every call):
  fbgemm's ``quantized::linear_dynamic`` (``reduce_range=False``). Its activation scale is per
  call, so each token is first divided by its own max |x| and the output multiplied back:
  per-token resolution at fbgemm's speed (``torch._int_mm`` is 3-5x slower at small M here).
* ``int8`` with ``activations="dynamic-tensor"``: fbgemm at every batch size (one activation
  scale per call: the fastest int8 path, a separate, labelled accuracy trade-off).
* ``int8`` with ``activations="static"`` (calibrated uint8 ``act_scale`` / ``act_zero_point``):
  fbgemm's ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` (static input
  quantization, int32 accumulation, fp32 output). Checked against the reference on a probe input
  at prepare time; on a mismatch (e.g. u8 x s8 saturation on some ISAs) the layer runs the
  reference numerics instead, with a warning.
* ``int8`` weight-only: ``torch._weight_int8pack_mm`` with bfloat16 activations.
* ``int4-group`` (g32/64/128/256, asymmetric or symmetric): ``torch._weight_int4pack_mm_for_cpu``
  with bfloat16 activations; the packed layout depends on the CPU's instruction set, so it is
  derived here at prepare time and never stored.
* ``fp16``: fbgemm's ``linear_dynamic_fp16``; ``bf16``: ``F.linear`` in bfloat16.

fp32 inputs are cast to bfloat16 around the bf16 kernels and the output cast back; numerics are
declared in :attr:`capabilities`. Every kernel constraint (shapes, alignment, dtypes) is checked
in :meth:`supports` or guarded at call time; what the kernels cannot do runs on ``reference``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from monoquant_core import Backend, Capabilities, FormatError, hookimpl
from monoquant_core.activations import fake_quantize_static, static_act_params
from monoquant_core.qtensor import QTensor

_GROUPS = (32, 64, 128, 256)


@dataclass
class Prepared:
    """Kernel-ready weights of one layer (derived at load/prepare time, never saved)."""

    kind: str
    n: int
    k: int
    tensors: dict[str, Any]


def _has(op: str) -> bool:
    return hasattr(torch.ops.aten, op)


def _fbgemm() -> bool:
    return any(e in torch.backends.quantized.supported_engines for e in ("x86", "fbgemm"))


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
        group_sizes=(None, *_GROUPS),
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        devices=("cpu",),
        numerics=(
            "int8 dynamic: int8 inputs per token (dynamic-tensor: one uint8 scale per call; "
            "static: the calibrated uint8 scale / zero point), "
            "int32 accumulation; int8 weight-only and "
            "int4-group: bfloat16 activations (fp32 inputs are cast), fp32 accumulation; "
            "fp16: fbgemm fp16 weights with fp32 activations; bf16: bfloat16 F.linear"
        ),
    )

    def available(self):
        return True

    def supports(self, info):
        if len(info.shape) != 2 or info.spec.axis not in (0, None):
            return "needs a 2-D [out, in] weight (nn.Linear layout)"
        n, k = info.shape
        if info.scheme == "int8":
            if not info.spec.symmetric:
                return "int8 kernels need symmetric weights (zero point 0)"
            if info.activations in ("dynamic", "dynamic-tensor"):
                return None if _fbgemm() else "fbgemm/x86 quantized engine missing"
            if info.activations == "static":
                if not _fbgemm():
                    return "fbgemm/x86 quantized engine missing"
                return None if _static_op() else f"torch has no quantized::{_STATIC_OP}"
            if info.activations != "none":
                return f"no CPU kernel for int8 activations={info.activations!r}"
            if not _has("_weight_int8pack_mm"):
                return "torch has no _weight_int8pack_mm"
            return None if k % 16 == 0 else f"K % 16 != 0 (K={k})"
        if info.scheme == "int4-group":
            gs = info.spec.group_size
            if info.activations != "none":
                return f"no int4 kernel with activations={info.activations!r} (cpu-vnni has W4A8)"
            if not _has("_weight_int4pack_mm_for_cpu"):
                return "torch has no _weight_int4pack_mm_for_cpu"
            if gs not in _GROUPS:
                return f"group size {gs} not in {_GROUPS}"
            if k % gs:
                return f"K % group_size != 0 (K={k}, group_size={gs})"
            if n % 16:
                return f"N % 16 != 0 (N={n})"
            return None
        if info.scheme == "fp16":
            return None if _fbgemm() else "fbgemm/x86 quantized engine missing"
        if info.scheme == "bf16":
            return None
        return f"no CPU kernel for scheme {info.scheme!r}"

    def prepare(self, qt: QTensor, scheme) -> Prepared:
        n, k = qt.shape
        if qt.scheme == "int8":
            scale = qt.scale.reshape(-1).to(torch.float32).expand(n).contiguous()
            wq = qt.qdata.reshape(n, k).contiguous()
            if qt.activations in ("dynamic", "dynamic-tensor", "static"):
                with warnings.catch_warnings():  # torch deprecates qint8 tensors; the op stays
                    warnings.simplefilter("ignore", UserWarning)
                    qw = torch._make_per_channel_quantized_tensor(
                        wq, scale.double(), torch.zeros(n, dtype=torch.long), 0
                    )
                packed = torch.ops.quantized.linear_prepack(qw, None)
                if qt.activations == "static":
                    return _static_prepare(qt, scheme, packed, n, k)
                kind = "int8-dynamic" if qt.activations == "dynamic" else "int8-dynamic-tensor"
                return Prepared(kind, n, k, {"packed": packed, "wq": wq, "s": scale})
            return Prepared("int8-weight", n, k, {"wq": wq, "s": scale.to(torch.bfloat16)})
        if qt.scheme == "int4-group":
            gs = qt.group_size
            codes = qt.codes().to(torch.int32)
            if qt.symmetric:  # signed -8..7 -> 0..15 with zero 8: w = (u - 8) * s
                codes = codes + 8
                offset = torch.zeros_like(qt.scale, dtype=torch.float32)
            else:  # w = (q - z) * s = (q - 8) * s + (8 - z) * s
                offset = (8.0 - qt.zero_point.to(torch.float32)) * qt.scale.to(torch.float32)
            packed = torch._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
            sz = torch.stack([qt.scale.to(torch.float32), offset], dim=-1)
            sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)  # [K/gs, N, 2]
            return Prepared("int4", n, k, {"packed": packed, "sz": sz, "gs": gs})
        w = scheme.dequantize(qt)
        if qt.scheme == "fp16":
            packed = torch.ops.quantized.linear_prepack_fp16(w.to(torch.float32), None)
            return Prepared("fp16", n, k, {"packed": packed})
        return Prepared("bf16", n, k, {"w": w.to(torch.bfloat16)})

    def linear(self, x: torch.Tensor, prepared: Prepared, bias: torch.Tensor | None):
        p = prepared
        lead = x.shape[:-1]
        x2 = x.reshape(-1, p.k)
        y = x2.new_zeros((0, p.n)) if x2.shape[0] == 0 else _KERNELS[p.kind](x2, p)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None:
            y = y.add_(bias) if bias.dtype == y.dtype else y + bias.to(y.dtype)
        return y.reshape(*lead, p.n)


def _int8_dynamic(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    """Per-token int8 inputs on fbgemm's per-tensor kernel: each row is first divided by its
    own max |x| (so one per-tensor scale has every token's resolution), and the output row
    multiplied back; ``W (x / a) * a = W x``."""
    x = x.to(torch.float32)
    if x.shape[0] == 1:  # one token: the per-call scale already is its own
        return torch.ops.quantized.linear_dynamic(x.contiguous(), p.tensors["packed"], False)
    amax = torch.linalg.vector_norm(x, float("inf"), dim=1, keepdim=True).clamp_min_(1e-30)
    y = torch.ops.quantized.linear_dynamic(x / amax, p.tensors["packed"], False)
    return y.mul_(amax)


def _static_prepare(qt: QTensor, scheme, packed: Any, n: int, k: int) -> Prepared:
    try:
        xs, xz = static_act_params(qt)
    except ValueError as e:
        raise FormatError(f"{e}", "quantize the layer again with calibration data") from None
    p = Prepared("int8-static", n, k, {"packed": packed, "xs": xs, "xz": xz})
    # Probe: codes spread over the whole uint8 range, against the reference numerics.
    gen = torch.Generator().manual_seed(0)
    probe = (torch.randint(0, 256, (8, k), generator=gen).float() - xz) * xs
    w = scheme.dequantize(qt).to(torch.float32)
    ref = F.linear(fake_quantize_static(probe, qt), w)
    got = _int8_static(probe, p)
    tol = 1e-4 * float(ref.abs().max()) + 1e-6
    if float((got - ref).abs().max()) <= tol:
        return p
    warnings.warn(
        f"torch-cpu: fbgemm's static int8 linear did not match the reference for a {n}x{k} "
        "weight; this layer runs the reference numerics instead",
        RuntimeWarning,
        stacklevel=3,
    )
    return Prepared("int8-static-ref", n, k, {"qt": qt, "w": w})


def _int8_static(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    t = p.tensors
    return getattr(torch.ops.quantized, _STATIC_OP)(
        x.to(torch.float32).contiguous(), t["xs"], t["xz"], t["packed"]
    )


def _int8_static_ref(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return F.linear(fake_quantize_static(x, p.tensors["qt"]), p.tensors["w"])


def _int8_dynamic_tensor(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic(
        x.to(torch.float32).contiguous(), p.tensors["packed"], False
    )


def _bf16(x: torch.Tensor) -> torch.Tensor:
    """bfloat16, contiguous, and 32-byte aligned (the AVX-512 kernels use aligned loads)."""
    xb = x.to(torch.bfloat16).contiguous()
    if xb.data_ptr() % 32:
        xb = xb.clone()
    return xb


def _int8_weight(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return torch._weight_int8pack_mm(_bf16(x), p.tensors["wq"], p.tensors["s"])


def _int4(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    t = p.tensors
    return torch._weight_int4pack_mm_for_cpu(_bf16(x), t["packed"], t["gs"], t["sz"])


def _fp16(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(
        x.to(torch.float32).contiguous(), p.tensors["packed"]
    )


def _bf16_linear(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    return F.linear(x.to(torch.bfloat16), p.tensors["w"])


_KERNELS = {
    "int8-dynamic": _int8_dynamic,
    "int8-dynamic-tensor": _int8_dynamic_tensor,
    "int8-static": _int8_static,
    "int8-static-ref": _int8_static_ref,
    "int8-weight": _int8_weight,
    "int4": _int4,
    "fp16": _fp16,
    "bf16": _bf16_linear,
}


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "torch-cpu"


@hookimpl
def monoquant_register_backends(register):
    register(TorchCpuBackend())
