"""``int4-group`` scheme: 4-bit codes with one scale (and zero point) per group of inputs.

Groups of ``group_size`` consecutive input features share a scale and, by default, a float
zero point (``w = (q - z) * s`` with ``q`` in 0..15), both stored in float16: 4.25 bits per
weight at g128. On top of the observer's range, a data-free optimiser picks better parameters
than round-to-nearest (``method``):

* ``lsq`` (default): candidate scales + closed-form least-squares refit + Lloyd steps.
* ``hqq``: half-quadratic optimisation of the float zero point (scale fixed).
* ``rtn``: round-to-nearest with the observer's parameters.

``zero = "int"`` rounds zero points to integers (as GPTQ/AWQ packers expect; still stored as
float16) at some accuracy
cost; ``symmetric = true`` stores signed codes -8..7 and no zero point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from monoquant_core import (
    Capabilities,
    CapabilityError,
    ComponentConfig,
    QParams,
    QTensor,
    QuantSpec,
    Scheme,
    hookimpl,
)
from monoquant_core.affine import MIN_SCALE, Scratch, params_bounded, params_fit, round_params
from monoquant_core.layout import to_groups

from .weight_optimizers import hqq, lloyd, ls_refit, ls_refit_symmetric

GROUP_SIZES = (32, 64, 128, 256)
_BLOCK_ELEMS = 1 << 19
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass(frozen=True)
class Int4GroupConfig(ComponentConfig):
    """Options of the ``int4-group`` scheme.

    Attributes:
        group_size: inputs per group: 32, 64, 128 (default) or 256.
        symmetric: signed codes without zero point (about 2.5 dB lower than asymmetric on
            the Student-t matrices of bench/accuracy.py; uses its own 19-candidate scale
            search, so ``lsq_steps``/``lloyd_steps`` do not apply).
        zero: ``float`` (default; needed by ``lsq``/``hqq`` for their gain) or ``int``.
        method: ``lsq`` (default), ``hqq`` or ``rtn``.
        lsq_steps: candidate scales tried by ``lsq``.
        lloyd_steps: reassign/refit iterations after the ``lsq`` search.
        scale_dtype: storage of scale and zero: ``float16`` (default), ``bfloat16``,
            ``float32``. A tensor whose parameters do not fit float16 falls back to float32.
        activations: ``none`` (weight-only, default) or ``dynamic``: the layer's inputs are
            quantized to int8 per token on every call (W4A8), which lets the ``cpu-vnni``
            backend multiply in integers at close to the memory bandwidth (about 1e-2 extra
            relative error, small next to the 4-bit weights' own; docs/performance.md).
    """

    group_size: int = 128
    symmetric: bool = False
    zero: Literal["float", "int"] = "float"
    method: Literal["lsq", "hqq", "rtn"] = "lsq"
    lsq_steps: int = 11
    lloyd_steps: int = 1
    scale_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    activations: Literal["none", "dynamic"] = "none"

    def __post_init__(self) -> None:
        if self.lsq_steps < 1 or self.lloyd_steps < 0:
            raise ValueError("lsq_steps must be >= 1 and lloyd_steps >= 0")


class Int4GroupScheme(Scheme):
    """Group-wise 4-bit weights along the input dimension."""

    name = "int4-group"
    config_class = Int4GroupConfig
    capabilities = Capabilities(
        bits=(4,),
        group_sizes=GROUP_SIZES,
        symmetric=(True, False),
        granularities=("group",),
    )
    default_observer = "minmax"

    def activations(self, config):
        return config.activations

    def cost_per_element(self, config: Int4GroupConfig) -> float:
        # relative to int8's min/max + rounding; `python bench/checkpoint.py --costs` measures
        # them (hqq's iterations and lsq's refits dominate)
        return _COST[config.method]

    def validate_config(self, config: Int4GroupConfig) -> None:
        self.capabilities.require("scheme 'int4-group'", "group_sizes", config.group_size)
        if config.method == "hqq" and (config.symmetric or config.zero == "int"):
            raise CapabilityError(
                "method=hqq optimises a float zero point, so it needs symmetric=false and "
                "zero=float",
                "use method=lsq, or drop symmetric/zero=int",
            )

    def spec(self, shape, axis, config):
        return QuantSpec(
            bits=4,
            symmetric=config.symmetric,
            axis=axis,
            group_size=config.group_size,
            float_zero=config.zero == "float",
            param_dtype=_DTYPES[config.scale_dtype],
        )

    def check(self, shape, config):
        """The short-row rule: a row padded to ``group_size`` must not cost over 8 bits per
        weight (int8's price); ``shape`` is ``[out, in, ...]`` (channel axis first)."""
        if len(shape) < 2:
            return f"{len(shape)}-D weight: group-wise quantization needs a matrix"
        k = math.prod(shape[1:])
        bpw = _bits_per_weight(k, config.group_size, config.symmetric)
        if bpw > 8:
            return (
                f"only {k} inputs per row: padding to group_size {config.group_size} would "
                f"store {bpw:.1f} bits per weight; use int8 for this layer (e.g. a rule) or a "
                "smaller group_size"
            )
        return None

    def notes(self, shape, config):
        """A warning when padding rows to ``group_size`` costs more bits per weight than a
        smaller supported group size would (g256 on 384 inputs: 5.50 vs g128's 4.25)."""
        if len(shape) < 2:
            return []
        k, gs = math.prod(shape[1:]), config.group_size
        bpw = _bits_per_weight(k, gs, config.symmetric)
        smaller = [g for g in GROUP_SIZES if g < gs]
        best = min(smaller, key=lambda g: _bits_per_weight(k, g, config.symmetric), default=None)
        if best is None or _bits_per_weight(k, best, config.symmetric) >= bpw:
            return []
        padded = -(-k // gs) * gs
        return [
            f"warning: group_size {gs} pads rows of {k} inputs to {padded}: {bpw:.2f} bits "
            f"per weight, more than group_size {best} "
            f"({_bits_per_weight(k, best, config.symmetric):.2f}, and more accurate); set "
            "group_size for this layer with a rule"
        ]

    def quantize(self, weight, qparams, spec, config):
        groups = to_groups(weight.to(torch.float32), spec.axis, spec.group_size)
        qp = self._optimise(groups, qparams, spec, config)
        dtype, meta = spec.param_dtype, {}
        if not _params_fit(qp, spec, dtype):
            dtype, meta = torch.float32, {"param_dtype_fallback": "float32"}
        if config.activations != "none":
            meta["activations"] = config.activations
        qp = round_params(qp, dtype)
        packed = _pack_codes(groups, qp, spec)
        return QTensor(
            qdata=packed,
            scale=qp.scale.to(dtype),
            zero_point=None if qp.zero_point is None else qp.zero_point.to(dtype),
            bits=4,
            group_size=spec.group_size,
            axis=spec.axis,
            shape=tuple(weight.shape),
            dtype=weight.dtype,
            scheme=self.name,
            meta=meta,
        )

    def _optimise(self, groups, qparams, spec, config) -> QParams:
        if config.method == "rtn":
            return qparams
        c, ng, gs = groups.shape
        rows = max(1, _BLOCK_ELEMS // max(ng * gs, 1))
        scale = torch.empty(c, ng)
        zero = None if spec.symmetric else torch.empty(c, ng)
        numerators = _numerators(spec.qmax - spec.qmin, config.lsq_steps)
        scratch = Scratch()
        extreme = _extreme(qparams.scale)
        for r0 in range(0, c, rows):
            x, s0 = groups[r0 : r0 + rows], qparams.scale[r0 : r0 + rows]
            z0 = None if spec.symmetric else qparams.zero_point[r0 : r0 + rows]
            unit = None
            if extreme:
                x, s0, unit = _normalised(x, s0)
            if spec.symmetric:
                s, z = ls_refit_symmetric(x, s0 * spec.qmax, spec.qmin, spec.qmax), None
            elif config.method == "hqq":
                s, z = hqq(x, s0, z0, spec.qmax)
            else:
                lo, hi = (spec.qmin - z0) * s0, (spec.qmax - z0) * s0
                s, z = ls_refit(x, lo, hi, spec.qmax, numerators, scratch)
                s, z = lloyd(x, s, z, spec.qmax, config.lloyd_steps, scratch)
                if not spec.float_zero:
                    s, z = _integer_zero(x, s, z, spec.qmax)
            scale[r0 : r0 + rows] = s if unit is None else s.to(torch.float64) * unit
            if zero is not None:
                zero[r0 : r0 + rows] = z
        return _valid_or(QParams(scale, zero), qparams, spec)


#: work per element relative to int8, by optimiser (see ``cost_per_element``)
_COST = {"rtn": 1.6, "lsq": 8.0, "hqq": 70.0}

#: observer scales outside ``[2**-50, 2**50]`` make the optimisers' sums of squares overflow or
#: underflow float32: such weights are optimised on groups rescaled by a power of two
_NORMAL_SCALES = (2.0**-50, 2.0**50)


def _extreme(scale: torch.Tensor) -> bool:
    lo, hi = _NORMAL_SCALES
    return bool(scale.numel()) and not (float(scale.amin()) >= lo and float(scale.amax()) <= hi)


def _normalised(x: torch.Tensor, s0: torch.Tensor):
    """``(x, s0, unit)`` of a row block of an extreme weight: every group divided by ``unit``,
    the power of two just above its scale (exact, in float64), so its codes are unchanged and
    its optimised scale times ``unit`` is the real one."""
    unit = torch.ldexp(torch.ones_like(s0, dtype=torch.float64), torch.frexp(s0.double())[1])
    xn = (x.to(torch.float64) / unit.unsqueeze(-1)).to(torch.float32)
    return xn, (s0.to(torch.float64) / unit).to(torch.float32), unit


def _valid_or(qp: QParams, fallback: QParams, spec: QuantSpec) -> QParams:
    """``qp``, with the observer's parameters (``fallback``) in every group where ``qp`` is
    not usable (non-finite, a scale below :data:`MIN_SCALE`, or codes that dequantize to
    inf): such groups get round-to-nearest, never a broken scale."""
    ok = params_bounded(qp, spec) & (qp.scale >= MIN_SCALE)
    if bool(ok.all()):
        return qp
    scale = torch.where(ok, qp.scale, fallback.scale)
    zero = None if qp.zero_point is None else torch.where(ok, qp.zero_point, fallback.zero_point)
    return QParams(scale, zero)


def _params_fit(qp: QParams, spec: QuantSpec, dtype: torch.dtype) -> bool:
    """True when ``qp`` stored in ``dtype`` keeps every value (no overflow, no flush to 0)
    and every code still dequantizes to a finite value."""
    if not params_fit(qp.scale, dtype):
        return False
    if qp.zero_point is not None and not params_fit(qp.zero_point, dtype):
        return False
    if torch.finfo(dtype).max < 1e19:  # float16: (|z| + 15) * s cannot overflow float32
        return True
    return dtype == torch.float32 or bool(params_bounded(round_params(qp, dtype), spec).all())


def _pack_codes(groups: torch.Tensor, qp: QParams, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest codes packed two per byte, in row blocks, straight to ``uint8``.

    Same arithmetic as :func:`monoquant_core.qtensor.quantize_groups` (half-up rounding), but
    offset to ``0..15`` so the cast truncates (= floors) and no float code tensor is kept;
    signed codes become two's complement nibbles with ``u ^ 8``.
    """
    c, ng, gs = groups.shape
    packed = torch.empty(c, ng * gs // 2, dtype=torch.uint8)
    rows = max(1, _BLOCK_ELEMS // max(ng * gs, 1))
    span = spec.qmax - spec.qmin
    scratch = Scratch()
    for r0 in range(0, c, rows):
        inv = qp.scale[r0 : r0 + rows].reciprocal().unsqueeze(-1)
        shift = 0.5 - spec.qmin
        if qp.zero_point is None:
            off = torch.full_like(inv, shift)
        else:
            off = qp.zero_point[r0 : r0 + rows].unsqueeze(-1) + shift
        blk = groups[r0 : r0 + rows]
        f = torch.mul(blk, inv, out=scratch.get("f", tuple(blk.shape)))
        f.add_(off).clamp_(0, span + 0.5)
        u = scratch.get("u", (blk.shape[0], ng * gs), torch.uint8)
        u.copy_(f.view(blk.shape[0], -1))  # truncation of values >= 0 = floor
        if spec.symmetric:
            u.bitwise_xor_(8)
        hi = torch.bitwise_left_shift(
            u[:, 1::2], 4, out=scratch.get("hi", (u.shape[0], ng * gs // 2), torch.uint8)
        )
        torch.bitwise_or(u[:, 0::2], hi, out=packed[r0 : r0 + rows])
    return packed


def _bits_per_weight(k: int, group_size: int, symmetric: bool) -> float:
    """Stored bits per weight of a row of ``k`` inputs padded to whole groups: 4-bit codes
    and a 16-bit scale (and zero point) per group."""
    groups = -(-k // group_size)
    return groups * (group_size * 4 + (1 if symmetric else 2) * 16) / max(k, 1)


def _numerators(levels: int, steps: int) -> list[float]:
    """``steps`` candidate numerators spanning ``levels - 1 .. levels + 1`` (llama.cpp Q4_K)."""
    if steps == 1:
        return [float(levels)]
    return [levels - 1 + 2.0 * k / (steps - 1) for k in range(steps)]


def _integer_zero(x, scale, zero, qmax):
    """Round the zero point to an integer and refit the scale for it (one least-squares step)."""
    z = zero.round().clamp(0, qmax)
    codes = x * scale.reciprocal().unsqueeze(-1)
    centred = codes.add_(z.unsqueeze(-1)).clamp_(0, qmax).round_().sub_(z.unsqueeze(-1))
    den = torch.linalg.vector_norm(centred, dim=-1).square_()
    s = torch.where(den > 0, torch.linalg.vecdot(centred, x) / den.clamp_min(1e-30), scale)
    return torch.where(s > 0, s, scale), z


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "int4-group"


@hookimpl
def monoquant_register_schemes(register):
    register(Int4GroupScheme())
