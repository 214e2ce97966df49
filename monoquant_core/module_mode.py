"""Module mode: plan, calibrate and quantize an ``nn.Module``.

Transactional by default: every plan entry is quantized first and the replacement modules are
swapped in only after every entry (and ``monoquant_report``) succeeded, so an error leaves the
model untouched. Sequential mode quantizes one layer at a time in execution order, each layer
calibrated with every earlier one already quantized; it swaps as it goes and puts every float
module back if anything fails.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from .batches import Materialized, iter_batches, model_device, run_batch
from .calibration import (
    CalibrationSummary,
    calibrate_entries,
    check_calibration_need,
    warn_calibration,
)
from .errors import PluginError, UsageError, WeightNotRepresentable
from .pipeline import check_representable, provenance
from .plan import ModuleResult, Plan, PlanEntry, QuantResult
from .quantized_module import QuantizedModule
from .registry import ranked_backends
from .report import build_report
from .run import Run
from .selection import build_module_plan, picked_modules, require_selected, validate_plan
from .swap import state_bytes, swap_module

__all__ = ["calibrate_model", "plan_model", "quantize_entry", "quantize_model"]


def plan_model(run: Run, model: nn.Module) -> Plan:
    """The default plan, edited by ``monoquant_modify_plan``, then validated (backends chosen)."""
    plan = build_module_plan(run, model)
    run.call_each("monoquant_modify_plan", plan=plan, model=model)
    validate_plan(run, plan, model)
    return plan


def calibrate_model(
    run: Run, model: nn.Module, data: Any, *, min_rows: int = 32, progress: bool = True
) -> Plan:
    """Plan ``model`` and run calibration only (the model is not changed)."""
    plan = plan_model(run, model)
    calibrate_entries(run, model, plan, plan.selected, data, min_rows=min_rows, progress=progress)
    return plan


def quantize_model(
    run: Run,
    model: nn.Module,
    *,
    calibration: Any = None,
    sequential: bool = False,
    min_rows: int = 32,
    progress: bool = True,
) -> QuantResult:
    """Quantize ``model`` (see :meth:`monoquant_core.Engine.quantize`)."""
    if sequential and calibration is None:
        raise UsageError(
            "sequential=True needs calibration data",
            "pass calibration=<batches> (CLI: --calibration FILE), or drop --sequential",
        )
    t0 = time.perf_counter()
    swapped: list[tuple[str, nn.Module]] = []
    original = model
    calib = {"min_rows": min_rows, "progress": progress}
    try:
        run.calibration = calibration
        plan = plan_model(run, model)
        picked = picked_modules(run.config, plan)
        require_selected(plan, picked)
        check_calibration_need(run, plan, calibration)
        before = state_bytes(model)
        if sequential:
            results, model = _quantize_sequential(run, model, plan, calibration, swapped, calib)
            after = state_bytes(model)
        else:
            if calibration is not None:
                calibrate_entries(run, model, plan, plan.selected, calibration, **calib)
            results = [r for e in plan.selected if (r := _quantize_or_keep(run, model, e))]
            after = before + sum(
                state_bytes(r.module) - state_bytes(model.get_submodule(r.entry.name))
                for r in results
            )
        require_selected(plan, picked)  # every selected weight may have been refused
        report = build_report(run.schemes, plan, results, before, after)
        if calibration is not None:
            report.extra["calibration"] = CalibrationSummary.of(plan).to_dict()
        report.time_s = time.perf_counter() - t0
        run.call_each("monoquant_report", report=report)
        if not sequential:  # the only change to the model, after every hook succeeded
            for res in results:
                model = swap_module(model, res.entry.name, res.module)
        swapped.clear()  # committed: integrations see the quantized model
        run.call_each("monoquant_model_ready", model=model)
        return QuantResult(model, report)
    except BaseException:
        for name, old in reversed(swapped):  # sequential: put every float module back
            if name:
                swap_module(original, name, old)
        raise


def _quantize_or_keep(run: Run, model: nn.Module, entry: PlanEntry) -> ModuleResult | None:
    """:func:`quantize_entry`, or None with the entry kept in float (and the reason in the
    plan and the report) when a weight of it cannot be represented."""
    try:
        return quantize_entry(run, model, entry)
    except WeightNotRepresentable as e:
        entry.skip(f"kept in float: {e.problem}")
        return None


def quantize_entry(run: Run, model: nn.Module, entry: PlanEntry) -> ModuleResult:
    """Quantize one entry's weights (``monoquant_quantize_weights``), build its replacement
    with the entry's replacer, then ``monoquant_module_done``. The model is not changed."""
    module = model.get_submodule(entry.name)
    replacer = run.replacers.get(entry.replacer)
    t1 = time.perf_counter()
    res = run.call("monoquant_quantize_weights", entry=entry, module=module)
    if not isinstance(res, ModuleResult):
        raise PluginError(
            f"monoquant_quantize_weights returned {type(res).__name__} for {entry.name!r}, "
            "expected a ModuleResult",
            "return the ModuleResult (or None to defer) from every implementation",
        )
    wanted = set(replacer.weights(module))
    if set(res.qtensors) != wanted:
        raise PluginError(
            f"monoquant_quantize_weights returned weights {sorted(res.qtensors)} for "
            f"{entry.name!r}, but replacer {entry.replacer!r} needs {sorted(wanted)}",
            "return a QTensor for every weight the replacer names (run.quantize_entry_weights "
            "quantizes the ones a plugin does not compute itself)",
        )
    _stamp(run, entry, res)
    for param, qt in res.qtensors.items():  # also the ones a plugin computed itself
        check_representable(qt, f"{entry.name}.{param}" if entry.name else param)
    res.module = replacer.replace(
        module, res.qtensors, run.backends.get(entry.backend), run.schemes.get(entry.scheme)
    )
    if isinstance(res.module, QuantizedModule):
        res.module.backend_candidates = ranked_backends(run.backends)
        res.module.prepare()  # kernel layouts now, so the first forward pays nothing
    res.time_s = time.perf_counter() - t1
    run.call_each("monoquant_module_done", entry=entry, result=res)
    return res


def _stamp(run: Run, entry: PlanEntry, res: ModuleResult) -> None:
    """Give each QTensor a plugin computed itself the provenance the core path records."""
    configs = None
    for param, qt in res.qtensors.items():
        if "plugin" in qt.meta:
            continue
        if qt.scheme != entry.scheme:
            raise PluginError(
                f"{entry.name}.{param}: a plugin returned a {qt.scheme} QTensor for an "
                f"{entry.scheme} entry without its provenance",
                "quantize it with run.quantize_weight (which records it), or keep the scheme",
            )
        configs = configs or run.entry_configs(entry)
        prov = provenance(run.registries, qt.scheme, configs[0], entry.observer, configs[1])
        qt.meta = {**prov, **qt.meta}


def _quantize_sequential(
    run: Run,
    model: nn.Module,
    plan: Plan,
    data: Any,
    swapped: list[tuple[str, nn.Module]],
    calib: dict[str, Any],
) -> tuple[list[ModuleResult], nn.Module]:
    """Layer by layer in execution order; each swapped in (and recorded) when done."""
    batches = Materialized(iter_batches(data, model_device(model)))
    order = _execution_order(model, plan.selected, batches[0])
    results, states = [], []
    for entry in order:
        states += calibrate_entries(run, model, plan, [entry], batches, warn=False, **calib)
        if not entry.selected:
            continue
        res = _quantize_or_keep(run, model, entry)
        if res is None:
            continue
        old = model.get_submodule(entry.name)
        model = swap_module(model, entry.name, res.module)
        swapped.append((entry.name, old))
        results.append(res)
    warn_calibration(states, calib["min_rows"])
    return results, model


def _execution_order(model: nn.Module, entries: list[PlanEntry], batch: Any) -> list[PlanEntry]:
    """``entries`` in the order their modules first run on ``batch`` (unseen ones last)."""
    seen: list[str] = []
    handles = []
    modes = {m: m.training for m in model.modules()}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in seen:
                seen.append(name)

        return hook

    try:
        for e in entries:
            handles.append(model.get_submodule(e.name).register_forward_pre_hook(record(e.name)))
        model.eval()
        with torch.no_grad():
            run_batch(model, batch[0], batch[1], 0)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    by_name = {e.name: e for e in entries}
    return [by_name[n] for n in seen] + [e for e in entries if e.name not in seen]
