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

from .layout import from_groups, unpack_int4

__all__ = [
    "QParams",
    "QTensor",
    "QuantSpec",
    "attach_float_columns",
    "float_columns",
    "without_columns",
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

    def facts(self) -> dict[str, Any]:
        """What it is, without its data (JSON): what a serializer's format-level metadata (a
        ``quantization_config``) is built from."""
        return {
            "scheme": self.scheme,
            "bits": self.bits,
            "group_size": self.group_size,
            "axis": self.axis,
            "symmetric": self.symmetric,
            "shape": list(self.shape),
            "dtype": str(self.dtype).replace("torch.", ""),
            "scale_dtype": str(self.scale.dtype).replace("torch.", ""),
            "activations": self.activations,
            "extras": sorted(self.extra),
        }

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

    def channel_rows(self, start: int, stop: int) -> QTensor:
        """Output channels ``start:stop`` of a weight quantized along axis 0, as a QTensor of
        its own (codes, scales, zero points and row-aligned extras sliced; views, no copies).
        Used to dequantize a large weight piece by piece."""
        if self.axis != 0:
            raise ValueError(f"channel_rows needs axis 0, not {self.axis}")
        c = self.channels
        extra = {
            k: (v[start:stop] if v.dim() and v.shape[0] == c else v) for k, v in self.extra.items()
        }
        if "float_cols" in extra:
            extra["float_cols"] = self.extra["float_cols"]  # column indices, not rows
        return replace(
            self,
            qdata=self.qdata[start:stop],
            scale=self.scale[start:stop],
            zero_point=None if self.zero_point is None else self.zero_point[start:stop],
            shape=(min(stop, c) - start, *self.shape[1:]),
            extra=extra,
        )

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

    def validate_values(self) -> None:
        """Check the values a loader must not trust; raises ``ValueError`` naming the piece.

        Every floating piece (``scale``, a float ``zero_point``, float extras, 16-bit codes)
        must be finite. For the standard ``affine`` layout (and every QTensor without a layout
        tag) ``scale`` must also be a float tensor with every value ``> 0`` (observers give an
        all-zero group ``scale = 1``, never 0), and a static activation's ``act_scale`` /
        ``act_zero_point`` must be one positive float and one code in ``[0, 255]``. A
        ``custom`` layout's scheme defines its own scales: only finiteness is checked there.
        Cheap: scales are ``[C, G]``; only 16-bit codes are as large as the weight.
        """
        affine = self.meta.get("layout", "affine") == "affine"
        pieces = dict(self.tensors())
        if self.bits != 16:
            pieces.pop("qdata")
        for role, t in pieces.items():
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise ValueError(f"{role} holds {bad} NaN/Inf value(s)")
        if not affine:
            return
        if not self.scale.is_floating_point():
            raise ValueError(f"scale must be a float tensor, not {self.scale.dtype}")
        if self.scale.numel() and not bool((self.scale > 0).all()):
            bad = int((self.scale <= 0).sum())
            raise ValueError(f"scale holds {bad} value(s) <= 0 (scales must be positive)")
        zp = self.zero_point
        if zp is not None and (zp.dtype == torch.bool or zp.is_complex()):
            raise ValueError(f"zero_point dtype {zp.dtype} is not a number type")
        s, z = self.extra.get("act_scale"), self.extra.get("act_zero_point")
        if s is not None or z is not None:
            if s is None or z is None or s.numel() != 1 or z.numel() != 1:
                raise ValueError("act_scale and act_zero_point must be one value each, together")
            if not s.is_floating_point() or not float(s.reshape(())) > 0:
                raise ValueError(f"act_scale must be a positive float, not {s.reshape(())}")
            if z.is_floating_point() or z.dtype == torch.bool or not 0 <= int(z) <= 255:
                raise ValueError(f"act_zero_point must be an integer code in [0, 255], not {z}")

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


def float_columns(entry: Any, param: str, weight: torch.Tensor) -> torch.Tensor | None:
    """The input columns of ``param`` to keep in float16, from ``entry.options["float_columns"]``
    (sorted unique column indices of the ``weight`` matrix ``[out, in]``; set by a plugin
    before the weights are quantized, e.g. ``outlier``), or None.

    Every implementation of ``monoquant_quantize_weights`` honours it: the core's default
    (``pipeline.quantize_entry_weights``) and ``gptq`` quantize the weight with those columns
    zeroed (:func:`without_columns`) and store them with :func:`attach_float_columns`."""
    cols = entry.options.get("float_columns")
    if not cols or param != "weight" or weight.dim() != 2:
        return None
    return torch.as_tensor(list(cols), dtype=torch.int64, device=weight.device)


def without_columns(weight: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``weight`` with the input columns ``cols`` zeroed (a copy)."""
    rest = weight.detach().clone()
    rest[:, cols] = 0
    return rest


def attach_float_columns(qt: QTensor, values: torch.Tensor, cols: torch.Tensor) -> QTensor:
    """Store the columns ``cols`` of ``values`` (``[out, in]``) in float16 with ``qt``: the
    QTensor's float-columns layout (``float_cols`` / ``float_values`` extras), validated."""
    qt.extra["float_cols"] = cols.cpu().to(qt.qdata.device)
    qt.extra["float_values"] = values.detach()[:, cols].to(torch.float16).contiguous()
    qt.validate()
    return qt
