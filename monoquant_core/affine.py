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
    "MIN_SCALE",
    "SAFE_MAX",
    "Scratch",
    "dequantize_groups",
    "minmax_qparams",
    "params_bounded",
    "params_fit",
    "quantize_groups",
    "round_params",
    "rounding_error",
]


#: every code of a group dequantizes to at most this magnitude: float32's largest value less
#: 1/128, the room a backend needs to round a scale to bfloat16 without reaching inf
SAFE_MAX = torch.finfo(torch.float32).max * (1 - 2**-7)
#: the smallest scale :func:`minmax_qparams` gives: float32's smallest normal value, whose
#: reciprocal (``quantize_groups`` multiplies by ``1 / scale``) is finite
MIN_SCALE = torch.finfo(torch.float32).tiny


#: groups of at most this magnitude take the plain float32 path of :func:`minmax_qparams`
_PLAIN_MAX = 2.0**100


def minmax_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> QParams:
    """Scale / zero point (float32, ``[C, G]``) covering ``[lo, hi]`` per group for ``spec``.

    * symmetric: ``scale = max(|lo|, |hi|) / qmax``, no zero point;
    * asymmetric, integer zero: the range is widened to include 0 (so 0 is exact) and the zero
      point is an integer in ``[qmin, qmax]``;
    * asymmetric, float zero: ``scale = (hi - lo) / (qmax - qmin)``, ``zero = qmin - lo / scale``.

    Degenerate groups never divide by zero: an all-zero group gets ``scale = 1`` (exactly 0 back)
    and a constant group ``c`` reproduces ``c`` (float zero) or the nearest code (integer zero).

    Any finite range gives finite parameters. A scale is never below :data:`MIN_SCALE` (a
    group smaller than about ``1e-36`` loses precision; below ``1e-38`` it comes back as 0).
    Ranges beyond ``2**100`` are computed in float64 (``hi - lo`` of two values near float32's
    limit overflows in float32) and capped so that every code ``qmin..qmax`` dequantizes within
    :data:`SAFE_MAX` (a group reaching within about 1% of float32's limit is clipped there).
    :func:`params_bounded` checks the result.
    """
    lo, hi = lo.to(torch.float32), hi.to(torch.float32)
    if lo.numel() and max(-float(lo.amin()), float(hi.amax())) > _PLAIN_MAX:
        return _wide_qparams(lo, hi, spec)
    one = torch.ones_like(lo)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        return QParams(torch.where(amax > 0, amax / spec.qmax, one).clamp_min_(MIN_SCALE), None)
    if not spec.float_zero:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    span = hi - lo
    flat = torch.where(lo != 0, lo.abs(), one)
    scale = torch.where(span > 0, span / (spec.qmax - spec.qmin), flat).clamp_min_(MIN_SCALE)
    zero = spec.qmin - lo / scale
    if not spec.float_zero:
        zero = torch.clamp(torch.round(zero), spec.qmin, spec.qmax)
    return QParams(scale, zero)


def _wide_qparams(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> QParams:
    """:func:`minmax_qparams` in float64, with every code kept within :data:`SAFE_MAX`."""
    lo = lo.to(torch.float64).clamp(-SAFE_MAX, SAFE_MAX)
    hi = hi.to(torch.float64).clamp(-SAFE_MAX, SAFE_MAX)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, amax / spec.qmax, 1.0).clamp_min(MIN_SCALE)
        scale = scale.clamp_max(SAFE_MAX / max(spec.qmax, -spec.qmin))
        return QParams(scale.to(torch.float32), None)
    levels = spec.qmax - spec.qmin
    if spec.float_zero:  # a constant group too large for ``scale = |c|`` spans [c, 0] instead
        wide = (lo == hi) & (lo.abs() > SAFE_MAX / (levels + 1))
        lo, hi = torch.where(wide, lo.clamp(max=0.0), lo), torch.where(wide, hi.clamp(min=0.0), hi)
    else:
        lo, hi = torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0)
    span = hi - lo
    flat = torch.where(lo != 0, lo.abs(), 1.0)
    scale = torch.where(span > 0, span / levels, flat).clamp_min(MIN_SCALE)
    zero = spec.qmin - lo / scale
    if not spec.float_zero:
        zero = torch.clamp(torch.round(zero), spec.qmin, spec.qmax)
    reach = torch.maximum(spec.qmax - zero, zero - spec.qmin)  # >= (qmax - qmin) / 2
    scale = torch.minimum(scale, SAFE_MAX / reach)
    return QParams(scale.to(torch.float32), zero.to(torch.float32))


def params_bounded(qp: QParams, spec: QuantSpec) -> torch.Tensor:
    """``[C, G]`` booleans: the group's scale is > 0 and every code ``qmin..qmax``
    dequantizes (``(q - z) * s`` in float32) to a finite value (so scale and zero point are
    finite too).

    Cheap (parameter-sized). Schemes use it to keep the observer's parameters for groups an
    optimiser could not fit; the core refuses a weight for which it is False anywhere.
    """
    s = qp.scale.to(torch.float32)
    if qp.zero_point is None:
        return (s > 0) & torch.isfinite(s * float(max(spec.qmax, -spec.qmin)))
    z = qp.zero_point.to(torch.float32)
    reach = torch.maximum(spec.qmax - z, z - spec.qmin)  # |q - z| of the farthest code
    return (s > 0) & torch.isfinite(reach * s)


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
