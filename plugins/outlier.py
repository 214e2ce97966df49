"""``outlier`` plugin: LLM.int8()-style mixed decomposition for int8 activations.

Transformer activations carry a few input features (hidden dimensions) with 20-100x the
typical magnitude. With per-token int8 activations (W8A8) each token's scale is set by those
features, and every other feature of the token loses most of its resolution. This plugin finds
those input columns and keeps them out of the integer path: their weight columns are stored in
float16 and computed in floating point, everything else in int8.

* ``monoquant_modify_plan``: marks the Linear entries quantized with ``int8`` and run-time
  activations (``dynamic`` / ``dynamic-tensor``) with ``entry.options["outlier"]``.
* ``monoquant_collectors``: with calibration data, the per-column maximum ``|x|`` of each
  marked layer's input (``outlier.absmax``).
* ``monoquant_quantize_module`` (wrapper): columns whose maximum ``|x|`` reaches the threshold
  (default 6.0, LLM.int8()'s value) become float columns, at most ``max_fraction`` of the input
  columns (the largest first). Without data (or for a layer that saw none) a data-free
  criterion is used instead: columns whose largest ``|w|`` is ``threshold`` times the median
  column's. The weight is re-quantized without those columns and stored with the
  ``float_cols`` / ``float_values`` extras (the QTensor's float-columns layout) and the
  ``outlier_threshold`` / ``outlier_source`` metadata, so a saved model loads with its split.

Any of its options enables it: ``plugin_options={"outlier": {"enable": True}}`` (threshold 6.0),
``{"threshold": 6.0, "max_fraction": 0.01}`` in Python; ``--outlier-enable``,
``--outlier-threshold T``, ``--outlier-max-fraction F`` on the command line.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from monoquant_core import UsageError, hookimpl

COLLECTOR = "outlier.absmax"
DEFAULT_THRESHOLD = 6.0
DEFAULT_MAX_FRACTION = 0.01
_ACTIVATIONS = ("dynamic", "dynamic-tensor")


class ColumnAbsMax:
    """Collector: the running maximum ``|x|`` of every input column (last dimension)."""

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        a = x.reshape(-1, x.shape[-1]).abs().amax(0).to(torch.float32).cpu()
        self.value = a if self.value is None else torch.maximum(self.value, a)


def _options(config: Any) -> dict[str, Any] | None:
    """The plugin's options when it is enabled for this run, else None."""
    raw = dict(config.plugin_options.get("outlier", {}) or {})
    unknown = set(raw) - {"enable", "threshold", "max_fraction"}
    if unknown:
        raise UsageError(
            f"unknown outlier option(s) {sorted(unknown)}",
            "use enable, threshold, max_fraction (--outlier-enable, --outlier-threshold, "
            "--outlier-max-fraction)",
        )
    threshold = raw.get("threshold")
    if not raw.get("enable") and threshold is None and raw.get("max_fraction") is None:
        return None
    threshold = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    frac = raw.get("max_fraction")
    frac = DEFAULT_MAX_FRACTION if frac is None else float(frac)
    if not (math.isfinite(threshold) and threshold > 0):
        raise UsageError(
            f"--outlier-threshold {threshold} is not a positive number", "use e.g. 6.0"
        )
    if not 0.0 < frac <= 1.0:
        raise UsageError(
            f"--outlier-max-fraction {frac} is not in (0, 1]", "use e.g. 0.01 (1% of columns)"
        )
    return {"threshold": threshold, "max_fraction": frac}


@hookimpl
def monoquant_add_cli_options(group):
    group.add_option(
        "--outlier-enable",
        is_flag=True,
        default=False,
        help="LLM.int8()-style decomposition: input columns with outlier activations stay in "
        "float16 (needs int8 with activations=dynamic or dynamic-tensor).",
    )
    group.add_option(
        "--outlier-threshold",
        type=float,
        default=None,
        help=f"Activation magnitude that makes a column an outlier (default "
        f"{DEFAULT_THRESHOLD}; implies --outlier-enable).",
    )
    group.add_option(
        "--outlier-max-fraction",
        type=float,
        default=None,
        help=f"Most input columns per layer kept in float16, the largest first (default "
        f"{DEFAULT_MAX_FRACTION}; implies --outlier-enable).",
    )


@hookimpl
def monoquant_modify_plan(plan, model, config):
    opts = _options(config)
    if opts is None:
        return
    if model is None:
        raise UsageError(
            "the outlier decomposition needs a model (checkpoint mode is weight-only)",
            "pass --model PKG.MODULE:FACTORY --weights FILE, or drop --outlier-*",
        )
    marked = 0
    for entry in plan.selected:
        scheme = entry.scheme or plan.config.scheme
        if scheme != "int8" or not isinstance(model.get_submodule(entry.name), nn.Linear):
            continue
        if "scheme_options" in entry.options:  # a rule's options replace the run's
            act = (entry.options["scheme_options"] or {}).get("activations", "none")
        elif scheme == plan.config.scheme:
            act = getattr(plan.config.scheme_config, "activations", "none")
        else:
            act = "none"
        if act not in _ACTIVATIONS:
            entry.notes.append(f"outlier: not applied (activations={act!r})")
            continue
        entry.options["outlier"] = dict(opts)
        entry.notes.append(f"outlier decomposition (threshold {opts['threshold']:g})")
        marked += 1
    if not marked:
        raise UsageError(
            "the outlier decomposition applies to int8 Linear layers with activations=dynamic "
            "or dynamic-tensor, and this plan has none",
            "add --scheme int8 --scheme-opt activations=dynamic, or drop --outlier-*",
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
def monoquant_quantize_module(entry, module, engine):
    result = yield
    opts = entry.options.get("outlier")
    if result is None or not opts or entry.scheme != "int8":
        return result
    weight = module.weight.detach()
    col = entry.collected.get(COLLECTOR)
    if col is not None and col.value is not None and entry.calibration_rows:
        score, source = col.value, "calibration"
    else:
        score, source = weight_score(weight), "weight-magnitude"
    cols = select_columns(score, opts["threshold"], opts["max_fraction"]).to(weight.device)
    k = weight.shape[1]
    result.metrics["outlier_columns"] = int(cols.numel())
    result.metrics["outlier_fraction"] = cols.numel() / k
    result.metrics["outlier_source"] = source
    if cols.numel() == 0:
        return result
    rest = weight.clone()
    rest[:, cols] = 0
    scheme_cfg, observer_cfg = engine.component_configs(entry)
    qt = engine.quantize_weight(
        rest,
        entry.scheme,
        entry.observer,
        axis=0,
        scheme_config=scheme_cfg,
        observer_config=observer_cfg,
        name=f"{entry.name}.weight" if entry.name else "weight",
    )
    qt.extra["float_cols"] = cols.cpu().to(qt.qdata.device)
    qt.extra["float_values"] = weight[:, cols].to(torch.float16).contiguous()
    qt.meta["outlier_threshold"] = opts["threshold"]
    qt.meta["outlier_source"] = source
    qt.validate()
    result.qtensors["weight"] = qt
    result.module = engine.replacers.get(entry.replacer).replace(
        module, result.qtensors, engine.backends.get(entry.backend), engine.schemes.get("int8")
    )
    return result
