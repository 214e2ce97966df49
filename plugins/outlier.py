"""``outlier`` plugin: input columns kept in float16 where the integer path hurts most.

Transformer activations carry a few input features (hidden dimensions) with 20-100x the
typical magnitude. With per-token int8 activations (W8A8) each token's scale is set by those
features, and every other feature of the token loses most of its resolution (LLM.int8()'s
observation). With 4-bit weights the same features multiply their columns' rounding error, so
those few columns carry much of the layer's output error (AWQ's "salient channels"). This
plugin finds those input columns and keeps them out of the integer path: their weight columns
are stored in float16 and computed in floating point, everything else with the entry's scheme.

* ``monoquant_register_options``: :class:`OutlierOptions` (``threshold``, ``max_fraction``).
* ``monoquant_modify_plan``: marks with ``entry.options["outlier"]`` the Linear entries
  quantized with ``int8`` and run-time activations (``dynamic`` / ``dynamic-tensor``), and with
  ``int4=true`` the ``int4-group`` ones too. A rule can mark any Linear entry itself
  (``+outlier``, see :mod:`monoquant_core.rules`), as the ``sensitivity`` plugin's
  ``+outlier`` candidates do (``int4-g128+outlier``).
* ``monoquant_collectors``: with calibration data, the per-column maximum ``|x|`` of each
  marked layer's input (``outlier.absmax``).
* ``monoquant_quantize_weights`` (wrapper): with run-time activations, columns whose maximum
  ``|x|`` reaches the threshold (default 6.0, LLM.int8()'s value) become float columns, at most
  ``max_fraction`` of the input columns (the largest first); weight-only, the ``max_fraction``
  columns with the largest maximum ``|x|`` (no threshold: every layer's inputs have some
  columns that matter most). Without data (or for a layer that saw none) a data-free
  criterion is used instead: columns whose largest ``|w|`` is ``threshold`` times the median
  column's. The weight is re-quantized with the entry's scheme without those columns and
  stored with the ``float_cols`` / ``float_values`` extras (the QTensor's float-columns layout)
  and the ``outlier_threshold`` / ``outlier_source`` metadata, so a saved model loads with its
  split. Each float column costs 16 bits per output row on top of the codes.

Enable it like any plugin with options: ``plugin_options={"outlier": {}}`` (the defaults) or
``{"threshold": 6.0, "max_fraction": 0.01}`` in Python; ``--outlier`` and
``--outlier-opt threshold=6`` on the command line (``--outlier-threshold T`` and
``--outlier-max-fraction F`` are kept as shorter spellings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from monoquant_core import PluginOptions, UsageError, hookimpl
from monoquant_core.qtensor import attach_float_columns, without_columns

COLLECTOR = "outlier.absmax"
_ACTIVATIONS = ("dynamic", "dynamic-tensor")
_SCHEMES = ("int8", "int4-group")

#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "outlier"


@dataclass(frozen=True)
class OutlierOptions(PluginOptions):
    """Input columns kept in float16: outlier activations of int8 Linear layers with
    activations=dynamic or dynamic-tensor (and, with ``int4``, the salient columns of
    int4-group ones).

    Attributes:
        threshold: activation magnitude that makes an input column an outlier (LLM.int8()'s
            6.0; run-time activations only); without calibration data, the ratio of a
            column's largest ``|w|`` to the median column's.
        max_fraction: most input columns per layer kept in float16, the largest first (for
            weight-only layers with calibration data: exactly this many).
        int4: also mark the ``int4-group`` Linear layers: weight-only, the ``max_fraction``
            columns with the largest inputs (AWQ's salient channels; 0.12-0.16 more bits per
            weight at 1% of 384-1536 inputs); with ``activations=dynamic``, the outliers.
    """

    threshold: float = 6.0
    max_fraction: float = 0.01
    int4: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.threshold) and self.threshold > 0):
            raise ValueError(f"threshold {self.threshold} is not a positive number (e.g. 6.0)")
        if not 0.0 < self.max_fraction <= 1.0:
            raise ValueError(f"max_fraction {self.max_fraction} is not in (0, 1] (e.g. 0.01)")


class ColumnAbsMax:
    """Collector: the running maximum ``|x|`` of every input column (last dimension)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        a = x.reshape(-1, x.shape[-1]).abs().amax(0).to(torch.float32).cpu()
        self.value = a if self.value is None else torch.maximum(self.value, a)


@hookimpl
def monoquant_register_options(register):
    register(OutlierOptions)


@hookimpl
def monoquant_add_cli_options(group):
    group.add_option("--outlier-enable", is_flag=True, default=None, help="Same as --outlier.")
    group.add_option(
        "--outlier-threshold",
        type=float,
        default=None,
        help="Same as --outlier-opt threshold=T (default 6.0).",
    )
    group.add_option(
        "--outlier-max-fraction",
        type=float,
        default=None,
        help="Same as --outlier-opt max_fraction=F (default 0.01).",
    )


@hookimpl
def monoquant_modify_plan(plan, model, run):
    opts = run.options("outlier")
    if opts is None:
        return
    if model is None:
        raise UsageError(
            "the outlier decomposition needs a model (checkpoint mode is weight-only)",
            "pass --model PKG.MODULE:FACTORY --weights FILE, or drop --outlier",
        )
    marked = 0
    for entry in plan.selected:
        scheme = entry.scheme or run.config.scheme
        if scheme not in _SCHEMES or not isinstance(model.get_submodule(entry.name), nn.Linear):
            continue
        if scheme == "int4-group" and not opts.int4:
            continue
        cfg = run.entry_configs(entry)[0] if entry.scheme else run.config.scheme_config
        act = getattr(cfg, "activations", "none")
        if act not in _ACTIVATIONS and scheme != "int4-group":
            entry.notes.append(f"outlier: not applied (activations={act!r})")
            continue
        entry.options["outlier"] = {"threshold": opts.threshold, "max_fraction": opts.max_fraction,
                                    "int4": opts.int4}  # fmt: skip
        entry.notes.append(
            f"outlier decomposition (threshold {opts.threshold:g})"
            if act in _ACTIVATIONS
            else f"outlier: salient columns in float (max_fraction {opts.max_fraction:g})"
        )
        marked += 1
    if not marked:
        raise UsageError(
            "the outlier decomposition applies to int8 Linear layers with activations=dynamic "
            "or dynamic-tensor (and with int4=true to int4-group ones), and this plan has none",
            "add --scheme int8 --scheme-opt activations=dynamic (or --outlier-opt int4=true "
            "for int4-group), or drop --outlier",
        )


@hookimpl
def monoquant_collectors(entry):
    if "outlier" not in entry.options:
        return None
    return {COLLECTOR: ColumnAbsMax()}


def select_columns(score: torch.Tensor, threshold: float, max_fraction: float) -> torch.Tensor:
    """Sorted int64 indices of the columns whose ``score >= threshold``, the largest first
    when more than ``max_fraction`` of the columns qualify."""
    cap = max(1, int(max_fraction * score.numel()))
    hits = torch.nonzero(score >= threshold).reshape(-1)
    if hits.numel() > cap:
        hits = hits[torch.argsort(score[hits], descending=True, stable=True)[:cap]]
    return torch.sort(hits).values.to(torch.int64)


def weight_score(weight: torch.Tensor) -> torch.Tensor:
    """Data-free criterion: each column's largest ``|w|`` over the median column's."""
    colmax = weight.detach().abs().amax(0).to(torch.float32)
    med = colmax.median()
    return colmax / med if float(med) > 0 else torch.zeros_like(colmax)


@hookimpl(wrapper=True)
def monoquant_quantize_weights(entry, module, run):
    """Choose the outlier columns and ask for them in float (``entry.options["float_columns"]``,
    which the core's default and ``gptq`` honour: the weight quantized with those columns
    zeroed, the columns stored in float16); then note them."""
    opts = entry.options.get("outlier")
    if not opts or not isinstance(module, nn.Linear):
        return (yield)
    weight = module.weight.detach()
    scheme_cfg, observer_cfg = run.entry_configs(entry)
    salient = run.schemes.get(entry.scheme).activations(scheme_cfg) not in _ACTIVATIONS
    col = entry.collected.get(COLLECTOR)
    if col is not None and col.value is not None and entry.calibration_rows:
        score, source = col.value, "calibration"
    else:
        score, source = weight_score(weight), "weight-magnitude"
    # weight-only with data: the max_fraction columns with the largest inputs (threshold 0)
    threshold = 0.0 if salient and source == "calibration" else opts["threshold"]
    cols = select_columns(score, threshold, opts["max_fraction"]).to(weight.device)
    if cols.numel():
        entry.options["float_columns"] = cols.tolist()
    try:
        result = yield
    finally:
        entry.options.pop("float_columns", None)
    if result is None:
        return result
    result.metrics["outlier_columns"] = int(cols.numel())
    result.metrics["outlier_fraction"] = cols.numel() / weight.shape[1]
    result.metrics["outlier_source"] = source
    if cols.numel() == 0:
        return result
    n = int(cols.numel())
    result.notes.append(
        f"{n} outlier column{'s' * (n != 1)} kept in float "
        f"({100 * n / weight.shape[1]:.1f}% of the inputs, from {source.replace('-', ' ')})"
    )
    qt = result.qtensors["weight"]
    if not qt.has_float_columns:  # an implementation that ignored the request: do it here
        name = f"{entry.name}.weight" if entry.name else "weight"
        rest = without_columns(weight, cols)
        qt = run.quantize_weight(rest, entry.scheme, entry.observer, 0, scheme_cfg,
                                 observer_cfg, name)  # fmt: skip
        attach_float_columns(qt, weight, cols)
        result.qtensors["weight"] = qt
    qt.meta["outlier_threshold"] = opts["threshold"]
    qt.meta["outlier_source"] = source
    return result
