"""``int8`` scheme: 8-bit integer weights, symmetric per-channel by default.

With ``activations="static"`` the plugin also collects the layer's input range during
calibration (``monoquant_collectors``: an instance of the entry's observer on a per-tensor
asymmetric 8-bit spec) and, in a ``monoquant_quantize_weights`` wrapper, stores the resulting
``act_scale`` / ``act_zero_point`` with the weight (saved and loaded with the model).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from monoquant_core import (
    Capabilities,
    ComponentConfig,
    QParams,
    QTensor,
    QuantSpec,
    Scheme,
    UsageError,
    hookimpl,
)
from monoquant_core.affine import quantize_groups
from monoquant_core.layout import to_groups

#: the collector name of the static activation observer in ``entry.collected``
ACT_COLLECTOR = "int8.activations"
#: how static activations are quantized: one uint8 scale / zero point per tensor (fbgemm's)
ACT_SPEC = QuantSpec(bits=8, symmetric=False, axis=None)


@dataclass(frozen=True)
class Int8Config(ComponentConfig):
    """Options of the ``int8`` scheme.

    Attributes:
        granularity: ``per-channel`` (one scale per output channel, default) or ``per-tensor``
            (one scale for the whole weight: 38.8 vs 41.6 dB on Gaussian, 17.7 vs 33.2 dB on
            Student-t matrices in bench/accuracy.py).
        symmetric: signed codes without a zero point (default) or unsigned codes with an
            integer zero point (better on skewed rows).
        activations: ``none`` (weight-only, default); ``dynamic``: the layer's inputs are
            quantized to int8 per token on every call (W8A8); ``dynamic-tensor``: one scale
            per call for the whole input (less accurate when tokens differ in range, but the
            fastest CPU kernel at every batch size); ``static``: one uint8 scale and zero point
            per layer input, fixed from calibration data by the run's observer (``minmax``,
            ``minmax`` with ``averaging_constant`` = moving average, or ``histogram``), stored
            with the weight as ``act_scale`` / ``act_zero_point``. ``static`` needs
            calibration data (``calibration=...`` / ``--calibration``).
    """

    granularity: Literal["per-channel", "per-tensor"] = "per-channel"
    symmetric: bool = True
    activations: Literal["none", "dynamic", "dynamic-tensor", "static"] = "none"


class Int8Scheme(Scheme):
    """Round-to-nearest 8-bit codes with the observer's scale (and zero point)."""

    name = "int8"
    config_class = Int8Config
    capabilities = Capabilities(
        bits=(8,),
        group_sizes=(None,),
        symmetric=(True, False),
        granularities=("per-channel", "per-tensor"),
    )
    default_observer = "minmax"

    def activations(self, config):
        return config.activations

    def spec(self, shape, axis, config):
        per_tensor = config.granularity == "per-tensor"
        return QuantSpec(bits=8, symmetric=config.symmetric, axis=None if per_tensor else axis)

    def quantize(self, weight, qparams, spec, config):
        dtype = torch.int8 if spec.symmetric else torch.uint8
        zero = None if spec.symmetric else qparams.zero_point.to(torch.uint8)
        groups = to_groups(weight, spec.axis, None)  # [C, 1, K], a view when it can be
        return QTensor(
            qdata=_codes(groups, qparams, spec, dtype),
            scale=qparams.scale.to(torch.float32).contiguous(),
            zero_point=zero,
            bits=8,
            group_size=None,
            axis=spec.axis,
            shape=tuple(weight.shape),
            dtype=weight.dtype,
            scheme=self.name,
            meta={"activations": config.activations} if config.activations != "none" else {},
        )


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "int8"


def _codes(groups: torch.Tensor, qp: QParams, spec: QuantSpec, dtype: torch.dtype) -> torch.Tensor:
    """``[C, K]`` codes computed a block at a time (float32 temporaries of about 2 MiB, so no
    weight-sized temporary pays page faults), written straight into the ``dtype`` result."""
    c, _, k = groups.shape
    out = torch.empty(c, k, dtype=dtype)
    if c == 1:  # per tensor: blocks of columns
        for i in range(0, k, _BLOCK):
            part = groups[:, :, i : i + _BLOCK].to(torch.float32)
            out[:, i : i + _BLOCK] = quantize_groups(part, qp, spec).reshape(1, -1)
        return out
    rows = max(1, _BLOCK // max(k, 1))
    for r0 in range(0, c, rows):
        r1 = min(r0 + rows, c)
        part = groups[r0:r1].to(torch.float32)
        sub = QParams(qp.scale[r0:r1], None if qp.zero_point is None else qp.zero_point[r0:r1])
        out[r0:r1] = quantize_groups(part, sub, spec).reshape(r1 - r0, k)
    return out


_BLOCK = 1 << 19  # elements per block


@hookimpl
def monoquant_register_schemes(register):
    register(Int8Scheme())


def _static(entry, run) -> bool:
    if entry.scheme != "int8":
        return False
    cfg, _ = run.entry_configs(entry)
    return cfg.activations == "static"


@hookimpl
def monoquant_collectors(entry, run):
    """The static activation observer: the entry's observer on :data:`ACT_SPEC`."""
    if not _static(entry, run):
        return None
    _, obs_cfg = run.entry_configs(entry)
    return {ACT_COLLECTOR: run.observers.get(entry.observer)(ACT_SPEC, obs_cfg)}


@hookimpl(wrapper=True)
def monoquant_quantize_weights(entry, run):
    """Attach the calibrated ``act_scale`` / ``act_zero_point`` to a static int8 weight."""
    result = yield
    if result is None or not _static(entry, run):
        return result
    observer = entry.collected.get(ACT_COLLECTOR)
    if observer is None:
        raise UsageError(
            f"{entry.name}: int8 activations='static' but no activation statistics were collected",
            "pass calibration data (calibration=... / --calibration FILE)",
        )
    qp = observer.qparams()
    scale = qp.scale.reshape(1).to(torch.float32)
    zero = qp.zero_point.reshape(1).round().clamp(0, 255).to(torch.uint8)
    for qt in result.qtensors.values():
        qt.extra["act_scale"] = scale.clone()
        qt.extra["act_zero_point"] = zero.clone()
    result.metrics["act_scale"] = float(scale)
    result.metrics["act_zero_point"] = int(zero)
    result.notes.append(f"static activation scale {float(scale):.4g}, zero point {int(zero)}")
    return result
