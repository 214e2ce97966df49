"""The default per-weight quantization (observe -> quantize) and the core's own plugin.

:func:`quantize_weight` is the single per-tensor code path: module mode, checkpoint mode and
plugins that quantize some weights themselves all go through it. The core plugin (registered by
every host under the name ``core``) implements ``monoquant_quantize_weights`` as the ``trylast``
default, so any plugin can take over an entry first (return a result) or wrap it
(``wrapper=True``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .affine import params_bounded
from .components import Scheme
from .config import scheme_config as _scheme_config
from .errors import MonoQuantError, UsageError, WeightNotRepresentable
from .markers import hookimpl
from .metrics import all_finite, count_nonfinite
from .options import config_to_dict
from .plan import ModuleResult, PlanEntry
from .qtensor import QParams, QTensor, attach_float_columns, float_columns, without_columns
from .registry import Registries, Registry

if TYPE_CHECKING:  # pragma: no cover
    from .run import Run

__all__ = [
    "ComponentAccess",
    "check_representable",
    "monoquant_quantize_weights",
    "provenance",
    "quantize_entry_weights",
    "quantize_weight",
]

#: this module is the core plugin; its name is fixed
monoquant_plugin_name = "core"


def provenance(
    registries: Registries,
    scheme: str,
    scheme_config: Any,
    observer: str | None,
    observer_config: Any,
) -> dict[str, Any]:
    """The metadata every stored QTensor carries: producing plugin, layout and configs."""
    reg = registries.schemes.entry(scheme)
    return {
        "plugin": reg.plugin,
        "layout": "affine" if type(reg.component).dequantize is Scheme.dequantize else "custom",
        "scheme_config": config_to_dict(scheme_config),
        "observer": observer,
        "observer_config": config_to_dict(observer_config),
    }


def quantize_weight(
    registries: Registries,
    weight: torch.Tensor,
    scheme: str,
    observer: str,
    axis: int = 0,
    scheme_config: Any = None,
    observer_config: Any = None,
    name: str = "weight",
) -> QTensor:
    """Observe and quantize one float tensor, and stamp its provenance.

    Raises:
        UsageError: the weight holds NaN or Inf (named in the message).
        WeightNotRepresentable: the scheme's result cannot be stored
            (:func:`check_representable`).
    """
    sch = registries.schemes.get(scheme)
    obs_cls = registries.observers.get(observer)
    scheme_config = scheme_config or sch.config_class()
    observer_config = observer_config or obs_cls.config_class()
    w = weight.detach()
    if not all_finite(w):
        raise UsageError(
            f"weight {name!r} contains {count_nonfinite(w)} NaN/Inf value(s); quantizing it "
            "would hide a broken model",
            f"fix the weights, or exclude it with --skip '{name.rsplit('.', 1)[0]}'",
        )
    try:
        with torch.no_grad():
            spec = sch.spec(tuple(w.shape), axis, scheme_config)
            obs = obs_cls(spec, observer_config)
            obs.update(w)
            qt = sch.quantize(w, obs.qparams(), spec, scheme_config)
    except MonoQuantError as e:  # name the tensor in a component's error
        raise type(e)(f"{name}: {e.problem}", e.fix) from None
    qt.meta = {
        **provenance(registries, scheme, scheme_config, observer, observer_config),
        **qt.meta,
    }
    check_representable(qt, name)
    return qt


def check_representable(qt: QTensor, name: str) -> None:
    """Refuse a QTensor whose scale or zero point is not finite (or a scale not positive), or
    whose codes dequantize to inf: it would be written, load, and compute garbage.

    Parameter-sized work only. The ``affine`` layout is checked code range included
    (:func:`~monoquant_core.affine.params_bounded`); a ``custom`` layout and 16-bit casts
    only for finite parameters.

    Raises:
        WeightNotRepresentable: naming ``name`` and how many groups fail.
    """
    scale, zero = qt.scale, qt.zero_point
    if qt.meta.get("layout", "affine") == "affine" and qt.bits < 16:
        ok = params_bounded(QParams(scale, zero), qt.spec)
    else:
        ok = (
            torch.isfinite(scale)
            if scale.is_floating_point()
            else torch.ones_like(scale, dtype=torch.bool)
        )
        if zero is not None and zero.is_floating_point():
            ok = ok & torch.isfinite(zero)
    if bool(ok.all()):
        return
    module = name.rsplit(".", 1)[0]
    raise WeightNotRepresentable(
        f"{name}: {qt.scheme} gives {int((~ok).sum())} of {ok.numel()} group(s) a scale or "
        "zero point that is not finite, or codes that dequantize to inf",
        f"keep it in float (--skip '{module}'), or use another scheme for it (a rule)",
    )


class ComponentAccess:
    """The registries and the per-tensor path, for anything that holds ``self.registries``
    (the plugin host and the run context)."""

    registries: Registries

    @property
    def observers(self) -> Registry:
        return self.registries.observers

    @property
    def schemes(self) -> Registry:
        return self.registries.schemes

    @property
    def replacers(self) -> Any:
        return self.registries.replacers

    @property
    def serializers(self) -> Registry:
        return self.registries.serializers

    @property
    def backends(self) -> Registry:
        return self.registries.backends

    def scheme_config(self, scheme: str, options: Any = None) -> Any:
        """Parse and validate ``options`` for ``scheme`` into its ``config_class``."""
        return _scheme_config(self.schemes, scheme, options)

    def quantize_weight(
        self,
        weight: torch.Tensor,
        scheme: str,
        observer: str,
        axis: int = 0,
        scheme_config: Any = None,
        observer_config: Any = None,
        name: str = "weight",
    ) -> QTensor:
        """Observe and quantize one float tensor (:func:`quantize_weight`)."""
        return quantize_weight(
            self.registries, weight, scheme, observer, axis, scheme_config, observer_config, name
        )


def quantize_entry_weights(
    run: Run,
    entry: PlanEntry,
    module: nn.Module,
    weights: dict[str, torch.Tensor] | None = None,
) -> dict[str, QTensor]:
    """Quantize ``weights`` (default: every weight the entry's replacer names on ``module``)
    as the plan entry says: its scheme, observer, options and channel axes.

    A plugin that computes some weights itself (e.g. ``gptq``, the ``weight``) quantizes the
    others with this (``run.quantize_entry_weights``).
    """
    replacer = run.replacers.get(entry.replacer)
    scheme_cfg, observer_cfg = run.entry_configs(entry)
    if weights is None:
        weights = replacer.weights(module)
    out = {}
    for param, weight in weights.items():
        cols = float_columns(entry, param, weight)
        out[param] = quantize_weight(
            run.registries,
            weight if cols is None else without_columns(weight, cols),
            entry.scheme,
            entry.observer,
            axis=replacer.channel_axis(module, param),
            scheme_config=scheme_cfg,
            observer_config=observer_cfg,
            name=f"{entry.name}.{param}" if entry.name else param,
        )
        if cols is not None:
            attach_float_columns(out[param], weight, cols)
    return out


@hookimpl(trylast=True)
def monoquant_quantize_weights(entry: PlanEntry, module: nn.Module, run: Run) -> ModuleResult:
    """The default: every weight of the entry through :func:`quantize_weight`."""
    originals = run.replacers.get(entry.replacer).weights(module)
    return ModuleResult(
        entry=entry,
        qtensors=quantize_entry_weights(run, entry, module, originals),
        originals=originals,
    )
