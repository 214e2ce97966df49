"""QTensor: the canonical, device-independent quantized weight.

Layout (see docs/formats.md):

* The weight is viewed as a 2-D matrix ``[C, K]``: ``C`` is the size of the channel axis
  ``axis`` (moved to the front) and ``K`` the product of the other dimensions. Per-tensor
  quantization (``axis=None``) uses ``C = 1``.
* ``group_size=None`` means one group per channel; otherwise the ``K`` dimension is split into
  groups of ``group_size`` consecutive elements (the last group padded by repeating the last
  value when ``K`` is not a multiple).
* ``scale`` and ``zero_point`` have shape ``[C, G]`` (``G`` = number of groups).
* ``qdata`` holds the codes, ``[C, G * group_size]`` (``[C, K]`` without groups). Symmetric
  codes are signed (``int8``), asymmetric codes unsigned (``uint8``). 4-bit codes are packed
  two per ``uint8``, low nibble first, along ``K`` (signed 4-bit codes in two's complement).
  16-bit "codes" are the weight itself in ``float16`` / ``bfloat16`` (scale 1, no zero point).
* ``w = (q - zero_point) * scale`` (``w = q * scale`` when ``zero_point`` is None).
* Float columns (mixed precision, e.g. the ``outlier`` plugin): a 2-D ``[out, in]`` weight may
  carry the extras ``float_cols`` (int64 ``[n]``, sorted input-column indices) and
  ``float_values`` (``[out, n]``, a float dtype). Those columns' codes are 0 and
  :meth:`QTensor.dequantize` puts the float values back; a Linear layer computes them in
  floating point and the rest with the integer codes.

Kernel-specific layouts are never stored here: backends derive them when a model is prepared.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch

__all__ = [
    "QParams",
    "QTensor",
    "QuantSpec",
    "Scratch",
    "dequantize_groups",
    "error_stats",
    "fake_quantize_static",
    "from_groups",
    "minmax_qparams",
    "pack_int4",
    "params_fit",
    "quantize_groups",
    "quantize_per_tensor_asym",
    "quantize_per_token",
    "round_params",
    "rounding_error",
    "sqnr_db",
    "static_act_params",
    "to_groups",
    "unpack_int4",
]


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is to be quantized: code range, granularity and parameter storage.

    Args:
        bits: code width (4 or 8 for integer schemes, 16 for float casts).
        symmetric: signed codes and no zero point when True.
        axis: the channel axis (None = per-tensor).
        group_size: group length along the flattened non-channel dims (None = per channel).
        float_zero: the zero point is a float (not rounded) and the range is not widened to
            include 0 (``w = (q - z) * s`` with a real ``z``); otherwise an integer zero point.
        param_dtype: dtype the scale (and a float zero point) are stored in; observers that
            search parameters evaluate candidates with values rounded to it.
    """

    bits: int
    symmetric: bool
    axis: int | None = 0
    group_size: int | None = None
    float_zero: bool = False
    param_dtype: torch.dtype = torch.float32

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.symmetric else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def granularity(self) -> str:
        if self.axis is None:
            return "per-tensor"
        return "per-channel" if self.group_size is None else f"group-{self.group_size}"


@dataclass
class QParams:
    """Quantization parameters an observer produces: ``scale`` and ``zero_point``, ``[C, G]``."""

    scale: torch.Tensor
    zero_point: torch.Tensor | None = None


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


def _as_matrix(w: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return w.reshape(1, -1)
    return w.movedim(axis, 0).reshape(w.shape[axis], -1)


def to_groups(w: torch.Tensor, axis: int | None, group_size: int | None) -> torch.Tensor:
    """View ``w`` as ``[C, G, group_size]`` (padding the last group by repeating its last value).

    Args:
        w: any tensor with at least one element.
        axis: channel axis, or None for per-tensor.
        group_size: group length, or None for one group per channel.

    Returns:
        A ``[C, G, S]`` tensor (a view when no padding is needed).
    """
    m = _as_matrix(w, axis)
    if group_size is None:
        return m.unsqueeze(1)
    c, k = m.shape
    pad = (-k) % group_size
    if pad:
        m = torch.cat([m, m[:, -1:].expand(c, pad)], dim=1)
    return m.reshape(c, -1, group_size)


def from_groups(g: torch.Tensor, shape: tuple[int, ...], axis: int | None) -> torch.Tensor:
    """Inverse of :func:`to_groups`: ``[C, G, S]`` back to ``shape`` (dropping padding)."""
    numel = math.prod(shape)
    if axis is None:
        return g.reshape(-1)[:numel].reshape(shape)
    c = shape[axis]
    m = g.reshape(c, -1)[:, : numel // c if c else 0]
    moved = (shape[axis], *shape[:axis], *shape[axis + 1 :])
    return m.reshape(moved).movedim(0, axis)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes (values in 0..15, or -8..7 as two's complement) two per byte.

    The last dimension is packed, low nibble first; an odd length is padded with a zero code.
    """
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    if codes.dtype != torch.uint8:
        codes = codes.to(torch.int8).view(torch.uint8)
    return (codes[..., 0::2] & 0xF) | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor, length: int, signed: bool) -> torch.Tensor:
    """Unpack :func:`pack_int4` bytes to ``length`` codes per row (int8 if signed, else uint8)."""
    p = packed.to(torch.int16)
    codes = torch.stack([p & 0xF, p >> 4], dim=-1).flatten(-2)[..., :length]
    if signed:
        codes = codes - ((codes & 0x8) << 1)
        return codes.to(torch.int8)
    return codes.to(torch.uint8)


def error_stats(
    ref: torch.Tensor, approx: torch.Tensor, chunk: int = 1 << 20
) -> tuple[float, float, float]:
    """``(sqnr_db, max_abs_err, rel_err)`` of ``approx`` against ``ref``.

    Accumulated in float64 over chunks, so no temporary as large as the tensors is created.
    SQNR is ``10 log10(sum ref^2 / sum (ref - approx)^2)``: ``inf`` for an exact match
    (including an all-zero reference reproduced exactly), ``-inf`` for an all-zero reference
    that was not.
    """
    r, a = ref.detach().reshape(-1), approx.detach().reshape(-1)
    sig = err = peak = 0.0
    for i in range(0, r.numel(), chunk):
        rc = r[i : i + chunk].double()
        d = rc - a[i : i + chunk].double()
        sig += rc.square_().sum().item()
        peak = max(peak, d.abs().max().item())
        err += d.square_().sum().item()
    if err == 0.0:
        db = math.inf
    elif sig == 0.0:
        db = -math.inf
    else:
        db = 10.0 * math.log10(sig / err)
    return db, peak, math.sqrt(err) / max(math.sqrt(sig), 1e-30)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a 2-D ``x`` with one scale per row: ``(codes, scale [M, 1])``.

    ``scale = max|x_row| / 127`` (1 for an all-zero row), codes in ``-127..127``; this is the
    ``activations="dynamic"`` contract every backend follows (the reference backend computes
    ``F.linear(codes * scale, W)``).
    """
    amax = x.abs().amax(dim=1, keepdim=True).to(torch.float32)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(x.to(torch.float32) / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def quantize_per_tensor_asym(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Asymmetric uint8 codes of ``x`` with one scale and zero point for the whole tensor.

    The range is widened to include 0, ``scale = (max - min) / 255`` and ``zero = round(-min /
    scale)``: the ``activations="dynamic-tensor"`` contract (what fbgemm's dynamic linear does).
    """
    lo = min(float(x.min()), 0.0)
    hi = max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = round(-lo / scale)
    codes = torch.round(x.to(torch.float32) / scale + zero).clamp_(0, 255).to(torch.uint8)
    return codes, scale, zero


def fake_quantize_static(x: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """``x`` through the calibrated uint8 activation quantizer of a static ``qt`` (float32).

    ``codes = clamp(round(x / act_scale) + act_zero_point, 0, 255)``, back as ``(codes -
    act_zero_point) * act_scale``: the ``activations="static"`` contract every backend follows.

    Raises:
        ValueError: ``qt`` has no ``act_scale`` / ``act_zero_point`` extras.
    """
    scale, zero = static_act_params(qt)
    codes = (torch.round(x.to(torch.float32) / scale) + zero).clamp_(0, 255)
    return (codes - zero) * scale


def static_act_params(qt: QTensor) -> tuple[float, int]:
    """``(act_scale, act_zero_point)`` of a static ``qt``; ValueError when missing/invalid."""
    s, z = qt.extra.get("act_scale"), qt.extra.get("act_zero_point")
    if s is None or z is None or s.numel() != 1 or z.numel() != 1:
        raise ValueError(
            "int8 weight with activations='static' lacks its act_scale / act_zero_point "
            "(quantize it with calibration data)"
        )
    scale, zero = float(s.reshape(())), int(z.reshape(()))
    if not (math.isfinite(scale) and scale > 0 and 0 <= zero <= 255):
        raise ValueError(f"invalid static activation parameters scale={scale}, zero={zero}")
    return scale, zero


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - approx)^2)`` in dB.

    Returns ``inf`` for an exact match (including an all-zero reference reproduced exactly).
    """
    return error_stats(ref, approx)[0]


@dataclass
class QTensor:
    """A quantized weight in the canonical layout (see the module docstring).

    Attributes:
        qdata: codes (``int8``/``uint8``; 4-bit packed two per byte).
        scale: ``[C, G]`` scales.
        zero_point: ``[C, G]`` zero points, or None when symmetric.
        bits: code width.
        group_size: group length, or None (one group per channel, or per-tensor).
        axis: channel axis, or None for per-tensor.
        shape: the original weight shape.
        dtype: the original floating dtype.
        scheme: registry name of the scheme that produced it.
        extra: additional named tensors a scheme stores with the weight.
        meta: JSON-serialisable provenance (scheme/observer config, producing plugin).
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    bits: int
    group_size: int | None
    axis: int | None
    shape: tuple[int, ...]
    dtype: torch.dtype
    scheme: str
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def activations(self) -> str:
        """Run-time input quantization: ``"none"``, ``"dynamic"``, ``"dynamic-tensor"`` or
        ``"static"`` (calibrated ``act_scale`` / ``act_zero_point`` in :attr:`extra`)."""
        return str(self.meta.get("activations", "none"))

    @property
    def spec(self) -> QuantSpec:
        float_zero = self.zero_point is not None and self.zero_point.is_floating_point()
        return QuantSpec(
            self.bits, self.symmetric, self.axis, self.group_size, float_zero, self.scale.dtype
        )

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        return 1 if self.axis is None else self.shape[self.axis]

    @property
    def row_length(self) -> int:
        """Number of codes per channel row, including group padding."""
        k = self.numel // self.channels if self.channels else 0
        if self.group_size is None:
            return k
        return math.ceil(k / self.group_size) * self.group_size

    def tensors(self) -> dict[str, torch.Tensor]:
        """All stored tensors by role: ``qdata``, ``scale``, ``zero_point`` (if any), extras."""
        out = {"qdata": self.qdata, "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        out.update(self.extra)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    def codes(self) -> torch.Tensor:
        """The integer codes, unpacked, as ``[C, row_length]``."""
        if self.bits == 4:
            return unpack_int4(self.qdata, self.row_length, signed=self.symmetric)
        if self.bits in (8, 16):
            return self.qdata
        raise ValueError(f"QTensor.codes: no standard layout for bits={self.bits}")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rebuild the float tensor ``(q - zero_point) * scale`` in ``dtype`` (default: original).

        Computed in float32 so the result is deterministic and identical on every call. Float
        columns (``float_cols`` / ``float_values`` extras) are put back in place.
        """
        c = self.channels
        q = self.codes().to(torch.float32).reshape(c, self.scale.shape[-1], -1)
        if self.zero_point is not None:
            q = q - self.zero_point.to(torch.float32).unsqueeze(-1)
        w = q * self.scale.to(torch.float32).unsqueeze(-1)
        w = from_groups(w, self.shape, self.axis)
        if self.has_float_columns:
            w = w.clone()
            w[:, self.extra["float_cols"]] = self.extra["float_values"].to(torch.float32)
        return w.to(dtype or self.dtype)

    @property
    def has_float_columns(self) -> bool:
        """True when some input columns are stored in float (``float_cols`` extra)."""
        return "float_cols" in self.extra

    def without_float_columns(self) -> QTensor:
        """This QTensor without its float columns: the integer part only (their codes are 0)."""
        extra = {k: v for k, v in self.extra.items() if k not in ("float_cols", "float_values")}
        return replace(self, extra=extra)

    def to(self, device: torch.device | str) -> QTensor:
        """A copy on ``device`` (dtypes are part of the format and never change)."""
        d = torch.device(device)
        return replace(
            self,
            qdata=self.qdata.to(d),
            scale=self.scale.to(d),
            zero_point=None if self.zero_point is None else self.zero_point.to(d),
            extra={k: v.to(d) for k, v in self.extra.items()},
        )

    def validate(self) -> None:
        """Check internal consistency; raises ``ValueError`` naming the inconsistent field."""
        if self.axis is not None and not 0 <= self.axis < len(self.shape):
            raise ValueError(f"axis {self.axis} out of range for shape {self.shape}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size {self.group_size} must be positive")
        if self.meta.get("layout") == "affine" and self.bits not in (4, 8, 16):
            raise ValueError(f"bits={self.bits} has no standard (affine) layout")
        c, g = self.channels, self.scale.shape[-1] if self.scale.dim() else 1
        if tuple(self.scale.shape) != (c, g):
            raise ValueError(f"scale shape {tuple(self.scale.shape)} != expected {(c, g)}")
        if self.group_size is not None and g * self.group_size != self.row_length:
            raise ValueError(
                f"{g} groups of {self.group_size} do not cover a row of {self.row_length}"
            )
        if self.group_size is None and g != 1:
            raise ValueError(f"scale has {g} groups but group_size is None")
        if self.zero_point is not None and self.zero_point.shape != self.scale.shape:
            raise ValueError(
                f"zero_point shape {tuple(self.zero_point.shape)} != scale shape "
                f"{tuple(self.scale.shape)}"
            )
        if self.has_float_columns or "float_values" in self.extra:
            self._validate_float_columns()
        if self.bits == 16:
            if self.qdata.dtype not in (torch.float16, torch.bfloat16):
                raise ValueError(f"16-bit qdata must be float16/bfloat16, not {self.qdata.dtype}")
            if tuple(self.qdata.shape) != (c, self.row_length):
                raise ValueError(f"qdata shape {tuple(self.qdata.shape)} != {(c, self.row_length)}")
        if self.bits in (4, 8):
            per_row = self.row_length if self.bits == 8 else (self.row_length + 1) // 2
            if tuple(self.qdata.shape) != (c, per_row):
                raise ValueError(
                    f"qdata shape {tuple(self.qdata.shape)} != expected {(c, per_row)}"
                )
            want = torch.int8 if (self.bits == 8 and self.symmetric) else torch.uint8
            if self.qdata.dtype != want:
                raise ValueError(f"qdata dtype {self.qdata.dtype} != expected {want}")

    def _validate_float_columns(self) -> None:
        cols, vals = self.extra.get("float_cols"), self.extra.get("float_values")
        if cols is None or vals is None:
            raise ValueError("float_cols and float_values must come together")
        if len(self.shape) != 2 or self.axis not in (0, None):
            raise ValueError(f"float columns need a 2-D [out, in] weight, not shape {self.shape}")
        if cols.dtype != torch.int64 or cols.dim() != 1:
            raise ValueError(f"float_cols must be 1-D int64, not {cols.dtype} {tuple(cols.shape)}")
        n = cols.numel()
        if n and (int(cols.min()) < 0 or int(cols.max()) >= self.shape[1]):
            raise ValueError(f"float_cols out of range for {self.shape[1]} input columns")
        if n > 1 and not bool((cols[1:] > cols[:-1]).all()):
            raise ValueError("float_cols must be sorted and unique")
        if not vals.is_floating_point() or tuple(vals.shape) != (self.shape[0], n):
            raise ValueError(
                f"float_values shape {tuple(vals.shape)} != expected {(self.shape[0], n)}"
            )
