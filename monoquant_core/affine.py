"""Affine (scale / zero point) group math shared by observers and schemes.

Every function works on ``[C, G, S]`` groups (see :func:`~monoquant_core.layout.to_groups`) with
``[C, G]`` parameters, and uses the same half-up rounding, so an observer's error model always
matches the codes a scheme stores.
"""

from __future__ import annotations

import math

import torch

from .qtensor import QParams, QuantSpec

__all__ = [
    "Scratch",
    "dequantize_groups",
    "minmax_qparams",
    "params_fit",
    "quantize_groups",
    "round_params",
    "rounding_error",
]


def minmax_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> QParams:
    """Scale / zero point (float32, ``[C, G]``) covering ``[lo, hi]`` per group for ``spec``.

    * symmetric: ``scale = max(|lo|, |hi|) / qmax``, no zero point;
    * asymmetric, integer zero: the range is widened to include 0 (so 0 is exact) and the zero
      point is an integer in ``[qmin, qmax]``;
    * asymmetric, float zero: ``scale = (hi - lo) / (qmax - qmin)``, ``zero = qmin - lo / scale``.

    Degenerate groups never divide by zero: an all-zero group gets ``scale = 1`` (exactly 0 back)
    and a constant group ``c`` reproduces ``c`` (float zero) or the nearest code (integer zero).
    """
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    one = torch.ones_like(lo)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        return QParams(torch.where(amax > 0, amax / spec.qmax, one), None)
    if not spec.float_zero:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    span = hi - lo
    flat = torch.where(lo != 0, lo.abs(), one)
    scale = torch.where(span > 0, span / (spec.qmax - spec.qmin), flat)
    zero = spec.qmin - lo / scale
    if not spec.float_zero:
        zero = torch.clamp(torch.round(zero), spec.qmin, spec.qmax)
    return QParams(scale, zero)


def params_fit(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """True if every value of ``t`` survives a cast to ``dtype`` (no overflow, no flush to 0)."""
    if dtype == torch.float32:
        return True
    cast = t.to(dtype)
    if not torch.isfinite(cast).all():
        return False
    return bool(((cast != 0) | (t == 0)).all())


def round_params(qp: QParams, dtype: torch.dtype) -> QParams:
    """``qp`` with values rounded to ``dtype`` (kept as float32 for computing codes)."""
    zero = None if qp.zero_point is None else qp.zero_point.to(dtype).to(torch.float32)
    return QParams(qp.scale.to(dtype).to(torch.float32), zero)


def quantize_groups(g: torch.Tensor, qp: QParams, spec: QuantSpec) -> torch.Tensor:
    """Codes (float32, integral values) of ``[C, G, S]`` groups: ``clamp(round(x/s + z))``.

    Rounding is half-up (``floor(r + 0.5)``), computed as ``x * (1/s)``, ``+ (z + 0.5)``, a
    clamp and a floor (a broadcast ``addcmul`` is 3x slower than the two passes). Observers
    that evaluate candidate parameters and the packed fast paths of the schemes use the same
    arithmetic, so every error model matches stored codes.
    """
    r = g * qp.scale.reciprocal().unsqueeze(-1)
    r.add_(0.5 if qp.zero_point is None else qp.zero_point.unsqueeze(-1) + 0.5)
    return r.clamp_(spec.qmin, spec.qmax + 0.5).floor_()


class Scratch:
    """Reusable work buffers for block-wise loops.

    A fresh multi-MiB allocation is served by ``mmap`` and costs a page fault per 4 KiB on
    first touch, which is slower than the arithmetic that fills it. Block loops therefore
    write into buffers from ``scratch.get(name, shape)`` (``out=`` arguments) instead.
    """

    def __init__(self) -> None:
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32):
        n = math.prod(shape)
        buf = self._bufs.get(name)
        if buf is None or buf.numel() < n or buf.dtype != dtype:
            buf = self._bufs[name] = torch.empty(n, dtype=dtype)
        return buf[:n].view(shape)


def rounding_error(
    g: torch.Tensor, qp: QParams, spec: QuantSpec, scratch: Scratch | None = None
) -> torch.Tensor:
    """Squared error per group ``[C, G]`` of :func:`quantize_groups` with ``qp``.

    ``s^2 * sum (r - q)^2`` with ``r = x / s + z``: six passes over ``g``, no allocation of
    its size when a :class:`Scratch` is given.
    """
    scratch = scratch or Scratch()
    r = scratch.get("rounding_error.r", tuple(g.shape))
    q = scratch.get("rounding_error.q", tuple(g.shape))
    torch.mul(g, qp.scale.reciprocal().unsqueeze(-1), out=r)
    if qp.zero_point is not None:
        r.add_(qp.zero_point.unsqueeze(-1))
    torch.add(r, 0.5, out=q).clamp_(spec.qmin, spec.qmax + 0.5).floor_()
    r.sub_(q)
    return torch.linalg.vector_norm(r, dim=-1).square_() * qp.scale.square()


def dequantize_groups(q: torch.Tensor, qp: QParams) -> torch.Tensor:
    """``(q - z) * s`` for ``[C, G, S]`` codes."""
    if qp.zero_point is not None:
        q = q - qp.zero_point.unsqueeze(-1)
    return q * qp.scale.unsqueeze(-1)
