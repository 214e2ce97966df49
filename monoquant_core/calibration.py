"""Calibration: run batches through a model and feed plugins' collectors with layer inputs.

``Engine.quantize(model, calibration=data)`` and ``Engine.calibrate(model, data)`` come here
after planning. For each selected entry the ``monoquant_collectors`` hook returns named
collectors (anything with ``update(x)``); ONE forward pre-hook per planned module feeds them the
module's first positional input on every batch. The hooks are always removed, the model runs in
``eval()`` mode under ``torch.no_grad()`` and its ``training`` flags are restored, so a failed
calibration leaves the model exactly as it was. The accepted forms of ``data`` are described in
:mod:`monoquant_core.batches`.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .batches import Batch, Materialized, iter_batches, model_device, run_batch, sized
from .errors import MonoQuantError, PluginConflictError, PluginError, UsageError
from .metrics import all_finite
from .options import config_to_dict
from .plan import Plan, PlanEntry
from .progress import Progress
from .selection import check_entry

if TYPE_CHECKING:  # pragma: no cover  (annotations only: Run builds on this module)
    from .run import Run

__all__ = [
    "CalibrationSummary",
    "CalibrationWarning",
    "apply_fallbacks",
    "calibrate_entries",
    "check_calibration_need",
    "gather_collectors",
    "run_calibration",
    "warn_calibration",
]


class CalibrationWarning(UserWarning):
    """Warning category of calibration: too few rows, layers without data, NaN/Inf inputs."""


# --------------------------------------------------------------------------- collectors


def gather_collectors(
    run: Run, entry: PlanEntry, module: nn.Module, only_plugins: Collection[str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Call every plugin's ``monoquant_collectors`` for ``entry`` (with ``only_plugins``,
    only those plugins'): ``(collectors, owners)``.

    Raises:
        PluginConflictError: two plugins returned the same collector name (both named).
        PluginError: an implementation raised, or returned something that is not a dict of
            objects with an ``update`` method.
    """
    out: dict[str, Any] = {}
    owners: dict[str, str] = {}
    hook = "monoquant_collectors"
    for who, res in run.call_each(hook, only_plugins, entry=entry, module=module):
        if res is None:
            continue
        if not isinstance(res, Mapping):
            raise PluginError(
                f"plugin {who!r} returned a {type(res).__name__} from monoquant_collectors",
                "return a dict of name -> collector (an object with update(x)), or None",
            )
        for name, c in res.items():
            if not callable(getattr(c, "update", None)):
                raise PluginError(
                    f"plugin {who!r}: collector {name!r} ({type(c).__name__}) has no update(x)",
                    "give collectors an update(x: torch.Tensor) -> None method",
                )
            if name in owners:
                raise PluginConflictError(
                    f"collector {name!r} for {entry.name!r} is returned by plugin "
                    f"{owners[name]!r} and by plugin {who!r}",
                    "prefix collector names with the plugin name, or disable one with "
                    f"MONOQUANT_DISABLE_PLUGINS={who}",
                )
            owners[name] = who
            out[name] = c
    return out, owners


@dataclass
class _LayerState:
    entry: PlanEntry
    collectors: dict[str, Any]
    owners: dict[str, str]
    batch: list[int]  # the index of the batch running now (shared by every layer)
    rows: int = 0
    nonfinite: int = 0
    calls: int = 0
    handle: Any = None


def _make_hook(st: _LayerState) -> Any:
    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor):
            return
        st.calls += 1
        x = x.detach()
        if not all_finite(x):
            st.nonfinite += 1
            return
        st.rows += x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        for name, c in st.collectors.items():
            try:
                c.update(x)
            except MonoQuantError:
                raise
            except Exception as e:
                plugin = st.owners[name]
                raise PluginError(
                    f"plugin {plugin!r}: collector {name!r} of {st.entry.name!r} raised "
                    f"{type(e).__name__} on calibration batch {st.batch[0]}: {e}",
                    "report it to the plugin's authors, or disable it with "
                    f"MONOQUANT_DISABLE_PLUGINS={plugin}",
                ) from e

    return pre_hook


# --------------------------------------------------------------------------- running


def run_calibration(
    run: Run,
    model: nn.Module,
    entries: list[PlanEntry],
    batches: Iterable[Batch],
    *,
    min_rows: int = 32,
    progress: bool = True,
    total: int | None = None,
    warn: bool = True,
    only_plugins: Collection[str] | None = None,
) -> list[_LayerState]:
    """Feed ``entries``' collectors with ``batches``; fill ``collected`` / ``calibration_rows``.
    ``only_plugins``: only those plugins' collectors (:meth:`Run.calibrate`).

    ``entries`` are selected plan entries of ``model``; each gets one forward pre-hook.
    Warnings (:class:`CalibrationWarning`) for too few rows (< ``min_rows``), layers that saw
    no data, and NaN/Inf inputs.

    Raises:
        UsageError: bad data or a batch the model rejects (one line, the hooks removed).
        PluginError / PluginConflictError: a collector failed or names clash.
    """
    batch = [0]
    states = []
    for entry in entries:
        module = model.get_submodule(entry.name)
        collectors, owners = gather_collectors(run, entry, module, only_plugins)
        states.append(_LayerState(entry, collectors, owners, batch))
    modes = {m: m.training for m in model.modules()}
    bar = Progress(total or 0, total or 0, enabled=progress, label="batches", show_bytes=False)
    try:
        for st in states:
            st.handle = model.get_submodule(st.entry.name).register_forward_pre_hook(
                _make_hook(st), with_kwargs=True
            )
        model.eval()
        with torch.no_grad():
            for i, (args, kwargs) in enumerate(batches):
                batch[0] = i
                run_batch(model, args, kwargs, i)
                bar.advance(f"batch {i}", 1)
    finally:
        for st in states:
            if st.handle is not None:
                st.handle.remove()
        for m, mode in modes.items():
            m.training = mode
        bar.close()
    for st in states:
        st.entry.collected = st.collectors
        st.entry.calibration_rows = st.rows
    if warn:
        warn_calibration(states, min_rows)
    return states


def calibrate_entries(
    run: Run,
    model: nn.Module,
    plan: Plan,
    entries: list[PlanEntry],
    data: Any,
    *,
    min_rows: int = 32,
    progress: bool = True,
    warn: bool = True,
) -> list[_LayerState]:
    """Calibrate ``entries`` with ``data`` (batches, or :class:`Materialized` ones), then switch
    entries that saw no data to their weight-only variant (:func:`apply_fallbacks`)."""
    batches = data if isinstance(data, Materialized) else iter_batches(data, model_device(model))
    states = run_calibration(
        run,
        model,
        entries,
        batches,
        min_rows=min_rows,
        progress=progress,
        total=sized(data),
        warn=warn,
    )
    apply_fallbacks(run, plan, model, entries)
    return states


def check_calibration_need(run: Run, plan: Plan, calibration: Any) -> None:
    """Refuse, before any compute, a plan that needs calibration data when none is given."""
    if calibration is not None:
        return
    for entry in plan.selected:
        cfg, _ = run.entry_configs(entry)
        scheme = run.schemes.get(entry.scheme)
        if scheme.needs_calibration(cfg):
            raise UsageError(
                f"{entry.name or '(root)'}: {entry.scheme} with "
                f"activations={scheme.activations(cfg)!r} needs calibration data",
                "pass calibration=<batches> (CLI: --calibration FILE), or use "
                "activations=dynamic (no data needed)",
            )


def _names(entries: list[str]) -> str:
    shown = ", ".join(repr(n) for n in entries[:5])
    return shown + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def warn_calibration(states: list[_LayerState], min_rows: int) -> None:
    """Emit the :class:`CalibrationWarning` s for ``states`` (one of each kind)."""
    nodata = [st.entry.name for st in states if st.rows == 0 and not st.nonfinite]
    if nodata:
        warnings.warn(
            f"calibration: {len(nodata)} planned layer(s) saw no data: {_names(nodata)} (an "
            "unused branch, or an expert no sample was routed to); layers that need activation "
            "statistics fall back to weight-only (see the plan notes)",
            CalibrationWarning,
            stacklevel=2,
        )
    bad = [f"{st.entry.name!r} ({st.nonfinite})" for st in states if st.nonfinite]
    if bad:
        warnings.warn(
            "calibration: NaN/Inf in the inputs of " + ", ".join(bad[:5]) + " batch(es); "
            "those batches were not fed to the layer's collectors",
            CalibrationWarning,
            stacklevel=2,
        )
    seen = [st.rows for st in states if st.rows > 0]
    if seen and min(seen) < min_rows:
        low = [st.entry.name for st in states if 0 < st.rows < min_rows]
        warnings.warn(
            f"calibration: only {min(seen)} input row(s) reached {_names(low)} (fewer than "
            f"{min_rows}); statistics from so few samples are unreliable. Pass more data, or "
            "lower min_rows (--calibration-min-rows) if this is intended",
            CalibrationWarning,
            stacklevel=2,
        )


def apply_fallbacks(run: Run, plan: Plan, model: nn.Module, entries: list[PlanEntry]) -> None:
    """Entries that need calibration but saw no data become weight-only (reason in the notes).

    The scheme decides (``Scheme.needs_calibration`` / ``Scheme.weight_only``); the backend is
    chosen again for the weight-only variant. A scheme without a weight-only variant keeps the
    layer in float, with the reason.
    """
    for entry in entries:
        if not entry.selected or entry.calibration_rows != 0:
            continue
        scheme = run.schemes.get(entry.scheme)
        cfg, _ = run.entry_configs(entry)
        if not scheme.needs_calibration(cfg):
            continue
        reason = "saw no calibration data"
        wo = scheme.weight_only(cfg)
        if wo is None:
            entry.skip(f"{reason}, and {entry.scheme} has no weight-only variant")
            continue
        opts = {k: v for k, v in config_to_dict(wo).items() if k != "version"}
        entry.options["scheme_options"] = opts
        entry.backend = None
        check_entry(run, entry, model.get_submodule(entry.name), with_backend=True)
        if entry.selected:
            entry.notes.append(f"{reason}: weight-only (activations=none)")


@dataclass
class CalibrationSummary:
    """Per-layer calibration facts for the report's ``extra["calibration"]``."""

    rows: dict[str, int | None] = field(default_factory=dict)
    fallbacks: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, plan: Plan) -> CalibrationSummary:
        out = cls()
        for e in plan.entries:
            if e.calibration_rows is None:
                continue
            out.rows[e.name] = e.calibration_rows
            why = next((n for n in e.notes if n.startswith("saw no calibration data")), None)
            if why or (e.skip_reason or "").startswith("saw no calibration data"):
                out.fallbacks[e.name] = why or e.skip_reason or ""
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"rows": dict(self.rows), "fallbacks": dict(self.fallbacks)}
