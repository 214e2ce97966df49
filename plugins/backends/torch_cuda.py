"""``torch-cuda`` backend: PyTorch's CUDA kernels for quantized Linear layers.

* ``int8`` with ``activations="dynamic"``/``"dynamic-tensor"``: per-token (or per-tensor) int8
  inputs and ``torch._int_mm`` (cuBLASLt int8 GEMM; rows padded to the kernel's minimum).
* ``int8`` weight-only: the int8 weight converted to the input dtype inside the call.
* ``int4-group`` (asymmetric or symmetric, g32..256): the tinygemm kernel
  ``torch._weight_int4pack_mm`` with bfloat16 activations (sm80+), its packed layout derived
  from the canonical codes at prepare time.
* ``fp16`` / ``bf16``: ``F.linear`` with the 16-bit weight.

Every packed layout is checked once when a layer is prepared: the kernel's output for a few
unit inputs must match the canonical dequantized weight. A mismatch (an unexpected torch
version, say) falls back to dequantize + ``F.linear`` for that layer with a warning, so a
layout change can never silently corrupt outputs.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from monoquant_core import Backend, Capabilities, hookimpl
from monoquant_core.activations import quantize_per_tensor_asym, quantize_per_token
from monoquant_core.qtensor import QTensor

_GROUPS = (32, 64, 128, 256)
_INT_MM_MIN_ROWS = 17


@dataclass
class Prepared:
    kind: str
    n: int
    k: int
    tensors: dict[str, Any]


class TorchCudaBackend(Backend):
    name = "torch-cuda"
    device_types = ("cuda",)
    priority = 10
    capabilities = Capabilities(
        bits=(4, 8, 16),
        group_sizes=(None, *_GROUPS),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        devices=("cuda",),
        numerics=(
            "int8 dynamic: int8 inputs (per token or per call), int32 accumulation; int8 "
            "weight-only: weight cast to the input dtype; int4-group: bfloat16 activations "
            "(tinygemm), checked against the reference dequantization at prepare time"
        ),
    )

    def available(self):
        if not torch.cuda.is_available():
            return "no CUDA device (torch.cuda.is_available() is False)"
        return True

    def supports(self, info):
        if len(info.shape) != 2 or info.spec.axis not in (0, None):
            return "needs a 2-D [out, in] weight (nn.Linear layout)"
        n, k = info.shape
        if info.scheme == "int8":
            if not info.spec.symmetric:
                return "int8 kernels need symmetric weights (zero point 0)"
            if info.activations not in ("none", "dynamic", "dynamic-tensor"):
                return f"no CUDA kernel for int8 activations={info.activations!r}"
            if info.activations != "none" and (k % 8 or n % 8):
                return f"torch._int_mm needs K and N multiples of 8 (K={k}, N={n})"
            return None
        if info.scheme == "int4-group":
            if info.activations != "none":
                return f"no int4 kernel with activations={info.activations!r}"
            if not hasattr(torch.ops.aten, "_weight_int4pack_mm"):
                return "torch has no _weight_int4pack_mm"
            gs = info.spec.group_size
            if gs not in _GROUPS:
                return f"group size {gs} not in {_GROUPS}"
            if k % gs or n % 8 or k % 64:
                return f"tinygemm needs K % group_size == 0, K % 64 == 0, N % 8 == 0 (N={n}, K={k})"
            if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 8:
                return "tinygemm int4 needs compute capability 8.0+"
            return None
        if info.scheme in ("fp16", "bf16"):
            return None
        return f"no CUDA kernel for scheme {info.scheme!r}"

    def prepare(self, qt: QTensor, scheme) -> Prepared:
        n, k = qt.shape
        dev = qt.qdata.device
        if qt.scheme == "int8":
            wq = qt.qdata.reshape(n, k).contiguous()
            s = qt.scale.reshape(-1).to(torch.float32).expand(n).contiguous()
            kind = "int8-weight" if qt.activations == "none" else f"int8-{qt.activations}"
            return Prepared(kind, n, k, {"wq": wq, "s": s})
        if qt.scheme == "int4-group":
            prepared = _int4_prepare(qt)
            if _int4_check(qt, scheme, prepared):
                return prepared
            warnings.warn(
                f"torch-cuda: the int4 kernel layout did not match the reference for a "
                f"{n}x{k} weight; this layer runs dequantize + F.linear instead",
                RuntimeWarning,
                stacklevel=2,
            )
        w = scheme.dequantize(qt).to(dev)
        dtype = torch.float16 if qt.scheme == "fp16" else torch.bfloat16
        return Prepared("dense", n, k, {"w": w.to(dtype)})

    def linear(self, x: torch.Tensor, prepared: Prepared, bias: torch.Tensor | None):
        p = prepared
        lead = x.shape[:-1]
        x2 = x.reshape(-1, p.k)
        y = x2.new_zeros((0, p.n)) if x2.shape[0] == 0 else _KERNELS[p.kind](x2, p)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias.to(x.dtype)
        return y.reshape(*lead, p.n)


def _int4_prepare(qt: QTensor) -> Prepared:
    n, k = qt.shape
    codes = qt.codes().to(torch.int32)
    if qt.symmetric:
        codes = codes + 8
        offset = torch.zeros_like(qt.scale, dtype=torch.float32)
    else:
        offset = (8.0 - qt.zero_point.to(torch.float32)) * qt.scale.to(torch.float32)
    u = codes.to(torch.uint8)
    packed_in = (u[:, ::2] << 4 | u[:, 1::2]).contiguous()  # tinygemm: high nibble first
    inner = 8 if k % 128 == 0 else (4 if k % 64 == 0 else 2)
    packed = torch._convert_weight_to_int4pack(packed_in, inner)
    sz = torch.stack([qt.scale.to(torch.float32), offset], dim=-1)
    sz = sz.transpose(0, 1).contiguous().to(torch.bfloat16)
    return Prepared("int4", n, k, {"packed": packed, "sz": sz, "gs": qt.group_size})


def _int4_check(qt: QTensor, scheme, prepared: Prepared) -> bool:
    """Run the kernel on unit inputs and compare with the canonical dequantization."""
    try:
        probe = min(qt.shape[1], 64)
        eye = torch.eye(probe, qt.shape[1], device=qt.qdata.device, dtype=torch.bfloat16)
        got = _int4(eye, prepared).float()  # [probe, N] = W[:, :probe].T
        want = scheme.dequantize(qt).to(qt.qdata.device).float()[:, :probe].t()
        return bool(torch.allclose(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max())))
    except RuntimeError:
        return False


def _int4(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    t = p.tensors
    return torch._weight_int4pack_mm(
        x.to(torch.bfloat16).contiguous(), t["packed"], t["gs"], t["sz"]
    )


def _int_mm(codes: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    m = codes.shape[0]
    if m < _INT_MM_MIN_ROWS:
        codes = F.pad(codes, (0, 0, 0, _INT_MM_MIN_ROWS - m))
    return torch._int_mm(codes, wq.t())[:m]


def _int8_dynamic(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    codes, scale = quantize_per_token(x)
    return _int_mm(codes, p.tensors["wq"]).to(torch.float32) * (scale * p.tensors["s"])


def _int8_dynamic_tensor(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    codes, s, z = quantize_per_tensor_asym(x)
    signed = (codes.to(torch.int16) - 128).to(torch.int8)  # shift to int8: x = (c + 128 - z) s
    acc = _int_mm(signed, p.tensors["wq"]).to(torch.float32)
    rowsum = p.tensors["wq"].to(torch.float32).sum(1)  # [N]
    return (acc + (128 - z) * rowsum) * (s * p.tensors["s"])


def _int8_weight(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    w = p.tensors["wq"].to(x.dtype)
    return F.linear(x, w) * p.tensors["s"].to(x.dtype)


def _dense(x: torch.Tensor, p: Prepared) -> torch.Tensor:
    w = p.tensors["w"]
    return F.linear(x.to(w.dtype), w)


_KERNELS = {
    "int8-dynamic": _int8_dynamic,
    "int8-dynamic-tensor": _int8_dynamic_tensor,
    "int8-weight": _int8_weight,
    "int4": _int4,
    "dense": _dense,
}


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "torch-cuda"


@hookimpl
def monoquant_register_backends(register):
    register(TorchCudaBackend())
