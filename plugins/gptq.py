"""``gptq`` plugin: calibration-based error-feedback rounding (GPTQ, Frantar et al. 2022).

For every planned Linear, Conv1d/Conv2d and GPT-2 ``Conv1D`` it accumulates the input Hessian
``H = 2 X^T X / rows`` during calibration (:class:`~.gptq_hessian.HessianCollector`, fed by the
core through ``monoquant_collectors``), then quantizes the weight column by column, spreading
each column's rounding error over the columns not yet quantized
(:func:`~.gptq_solver.gptq_solve`). The result is an ordinary ``int4-group`` or ``int8``
QTensor packed by the scheme's own ``quantize``: a file written with GPTQ loads and runs without
this plugin.

Enable it with ``--gptq`` (CLI) or ``plugin_options={"gptq": {}}`` (Python); it needs
calibration data (``--calibration`` / ``calibration=``). See docs/schemes/gptq.md. Per-run
state (the options, per-layer results, memory peaks) lives in ``run.state["gptq"]``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Literal

import torch

from monoquant_core import ModuleResult, PluginOptions, QParams, UsageError, hookimpl
from monoquant_core.metrics import all_finite
from monoquant_core.options import config_to_dict
from monoquant_core.qtensor import attach_float_columns, float_columns, without_columns

from .gptq_hessian import HessianCollector
from .gptq_solver import GptqResult, gptq_solve

__all__ = [
    "GptqOptions",
    "GptqResult",
    "GptqWarning",
    "HessianCollector",
    "gptq_solve",
]

#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "gptq"

_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_SCHEMES = {"int4-group", "int8"}
_COLLECTOR = "gptq.hessian"


@dataclass(frozen=True)
class GptqOptions(PluginOptions):
    """GPTQ for int4-group / int8 weights (needs calibration data).

    Enabled with ``plugin_options={"gptq": {...}}`` (Python) or ``--gptq`` /
    ``--gptq-opt KEY=VALUE`` (CLI).

    Attributes:
        damp: damping added to the Hessian's diagonal, as a fraction of its mean diagonal.
        block_size: columns per lazy-update block (rounded up to a multiple of the group size
            and of 32).
        act_order: quantize columns in decreasing order of ``diag(H)`` (default; implies
            static groups, so the saved layout stays the standard one). ``false`` gives
            classic GPTQ with group parameters recomputed from the error-updated weights.
        static_groups: compute every group's scale/zero from the original weight up front
            instead of from the error-updated weights when the group starts.
        grid: how a group's scale/zero point are chosen: ``scheme`` (default: the observer's
            range refined by the scheme's own search, e.g. ``int4-group``'s ``method``, ``lsq``
            by default) or ``observer`` (the observer's range only, as in the GPTQ paper).
        hessian_dtype: ``float32`` (default) or ``float64`` accumulation and factorization.
        retries: how many times the damping is multiplied by 10 when the Cholesky factorization
            fails, before the layer falls back to round-to-nearest.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False
    grid: Literal["observer", "scheme"] = "scheme"
    hessian_dtype: Literal["float32", "float64"] = "float32"
    retries: int = 3

    def __post_init__(self) -> None:
        if not (self.damp > 0 and math.isfinite(self.damp)):
            raise ValueError(f"damp must be a positive number, not {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, not {self.block_size}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, not {self.retries}")


class GptqWarning(UserWarning):
    """A layer was quantized without GPTQ (its reason is also in ``report.extra["gptq"]``)."""


@dataclass
class _State:
    """What one run of the plugin keeps (``run.state["gptq"]``)."""

    options: GptqOptions
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    live: int = 0
    peak: int = 0
    solver_peak: int = 0

    def alloc(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)


def _kind(module: torch.nn.Module) -> tuple[str, int] | None:
    """``(kind, K)`` for the module types GPTQ handles, else None."""
    if isinstance(module, torch.nn.Linear):
        return "linear", module.in_features
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        k = math.prod(module.weight.shape[1:])
        return ("conv2d" if isinstance(module, torch.nn.Conv2d) else "conv1d"), k
    qual = f"{type(module).__module__}.{type(module).__qualname__}"
    if qual in ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"):
        return "linear", module.weight.shape[0]
    return None


def _skip_reason(entry: Any, module: torch.nn.Module) -> str | None:
    if entry.scheme not in _SCHEMES:
        return f"scheme {entry.scheme!r}: GPTQ supports int4-group and int8"
    if _kind(module) is None:
        return f"{type(module).__name__}: GPTQ handles Linear, Conv1d/Conv2d and GPT-2 Conv1D"
    return None


@hookimpl
def monoquant_register_options(register):
    register(GptqOptions)


@hookimpl
def monoquant_configure(run):
    opts = run.options("gptq")
    if opts is not None:
        run.state["gptq"] = _State(opts)


@hookimpl
def monoquant_modify_plan(plan, model, run):
    if "gptq" not in run.state:
        return
    if model is None:
        raise UsageError(
            "GPTQ needs a model to run calibration data through, and checkpoint mode (a file "
            "SOURCE) has none",
            "pass --model PKG.MODULE:FACTORY --weights FILE --calibration DATA instead of "
            "SOURCE, or drop --gptq",
        )
    for entry in plan.selected:
        why = _skip_reason(entry, model.get_submodule(entry.name))
        entry.notes.append(f"gptq: no ({why})" if why else "gptq")


@hookimpl
def monoquant_collectors(entry, module, run):
    state = run.state.get("gptq")
    if state is None or _skip_reason(entry, module) is not None:
        return None
    kind, k = _kind(module)
    dtype = _DTYPES[state.options.hessian_dtype]
    return {_COLLECTOR: HessianCollector(k, kind, module, dtype, state.alloc)}


@hookimpl
def monoquant_quantize_weights(entry, module, run):
    state = run.state.get("gptq")
    if state is None:
        return None
    if entry.calibration_rows is None:
        raise UsageError(
            "GPTQ needs calibration data, and this run has none",
            "pass --calibration FILE (Python: Engine.quantize(..., calibration=batches)), "
            "or drop --gptq / plugin_options['gptq']",
        )
    why = _skip_reason(entry, module)
    col = entry.collected.get(_COLLECTOR)
    if why is None and col is None:
        why = "no Hessian was collected for this layer"
    if why is None:
        try:
            result, why = _quantize(entry, module, run, state, col)
        finally:
            col.release()
        if result is not None:
            return result
    state.layers[entry.name] = {"method": "default", "reason": why}
    if not why.startswith("scheme") and _kind(module) is not None:
        warnings.warn(
            f"gptq: {entry.name or type(module).__name__}: {why}; quantized without GPTQ "
            f"({entry.scheme} with the {entry.observer} observer)",
            GptqWarning,
            stacklevel=2,
        )
    return None


def _quantize(entry, module, run, state, col):
    """``(ModuleResult, None)``, or ``(None, reason)`` when the layer falls back."""
    cfg = state.options
    hessian = col.hessian()
    if hessian is None:
        if col.nonfinite:
            return None, f"every calibration row ({col.nonfinite}) held NaN/Inf"
        return None, "saw no calibration data"
    replacer = run.replacers.get(entry.replacer)
    scheme_cfg, obs_cfg = run.entry_configs(entry)
    scheme, obs_cls = run.schemes.get(entry.scheme), run.observers.get(entry.observer)
    originals = replacer.weights(module)
    weight = originals["weight"].detach()
    # input columns another plugin keeps in float (``outlier``): solved as zero weights with no
    # error to pass on (their Hessian rows and columns decoupled), stored in float16 after
    floats = float_columns(entry, "weight", weight)
    if floats is not None:
        weight = without_columns(weight, floats)
    axis = replacer.channel_axis(module, "weight")
    spec = scheme.spec(tuple(weight.shape), axis, scheme_cfg)
    if not all_finite(weight):
        return None, "the weight holds NaN/Inf"
    moved = weight.movedim(axis, 0)
    wm = moved.reshape(moved.shape[0], -1).to(torch.float32)
    int4 = entry.scheme == "int4-group"
    grid_cfg = scheme_cfg
    if int4 and cfg.grid == "observer":
        grid_cfg = dataclasses.replace(scheme_cfg, method="rtn")

    def grid(cols: torch.Tensor) -> QParams:
        sp = scheme.spec(tuple(cols.shape), 0, grid_cfg)
        obs = obs_cls(sp, obs_cfg)
        obs.update(cols)
        qt = scheme.quantize(cols.contiguous(), obs.qparams(), sp, grid_cfg)
        z = None if qt.zero_point is None else qt.zero_point.to(torch.float32)
        return QParams(qt.scale.to(torch.float32), z)

    static = spec.group_size is None or cfg.act_order or cfg.static_groups
    params = grid(wm) if static else None
    shift = -spec.qmin if int4 else 0
    hs = hessian if hessian.dim() == 3 else hessian.unsqueeze(0)
    g, c = hs.shape[0], wm.shape[0]
    if hs.shape[-1] != wm.shape[1] or c % g:
        return None, f"the Hessian ({tuple(hs.shape)}) does not match the weight {tuple(wm.shape)}"
    if floats is not None:
        diag = hs[:, floats, floats].clone()
        hs = hs.clone()
        hs[:, floats, :] = 0
        hs[:, :, floats] = 0
        hs[:, floats, floats] = diag
    state.solver_peak = max(state.solver_peak, _solver_bytes(c // g, hs.shape[-1]))
    solved = _solve_groups(wm, hs, spec, None if static else grid, params, cfg, shift)
    if isinstance(solved, str):
        return None, solved
    ws, ss, zs, damps = solved
    if params is None:
        params = QParams(torch.cat(ss), None if zs[0] is None else torch.cat(zs))
    wq = torch.cat(ws).reshape(moved.shape).movedim(0, axis)
    final_cfg = dataclasses.replace(scheme_cfg, method="rtn") if int4 else scheme_cfg
    qt = scheme.quantize(wq.contiguous(), params, spec, final_cfg)
    if floats is not None:
        attach_float_columns(qt, originals["weight"], floats)
    info = {
        "method": "gptq",
        "damp": max(damps),
        "rows": col.rows,
        "act_order": cfg.act_order,
        "static_groups": bool(static and spec.group_size is not None),
        "hessian_bytes": col.nbytes,
    }
    qt.meta["gptq"] = {k: v for k, v in info.items() if k in ("damp", "rows", "act_order")}
    others = {p: w for p, w in originals.items() if p != "weight"}
    qweights = {"weight": qt, **run.quantize_entry_weights(entry, module, others)}
    state.layers[entry.name] = info
    return ModuleResult(entry=entry, qtensors=qweights, originals=originals), None


def _solve_groups(wm, hs, spec, grid, params, cfg, shift):
    """``gptq_solve`` per convolution group (one group for Linear): the rounded weights,
    scales, zero points and damps, or the reason a group fell back."""
    g, c = hs.shape[0], wm.shape[0]
    rows = c // g
    ws, ss, zs, damps = [], [], [], []
    for gi in range(g):
        sl = slice(gi * rows, (gi + 1) * rows)
        p = None
        if params is not None:
            p = params if params.scale.shape[0] == 1 else _rows(params, sl)
        res = gptq_solve(
            wm[sl],
            hs[gi],
            spec,
            grid=grid,
            params=p,
            block_size=cfg.block_size,
            damp=cfg.damp,
            act_order=cfg.act_order,
            retries=cfg.retries,
            code_shift=shift,
        )
        if res.fallback is not None:
            return res.fallback
        ws.append(res.weight)
        ss.append(res.params.scale)
        zs.append(res.params.zero_point)
        damps.append(res.damp)
    return ws, ss, zs, damps


def _rows(p: QParams, sl: slice) -> QParams:
    return QParams(p.scale[sl], None if p.zero_point is None else p.zero_point[sl])


def _solver_bytes(c: int, k: int) -> int:
    """float32 working set of one solve: reversed H, its factor, R, and two [K, C] buffers."""
    return 4 * (3 * k * k + 2 * k * c)


@hookimpl
def monoquant_report(report, run):
    state = run.state.get("gptq")
    if state is None:
        return
    report.extra["gptq"] = {
        "config": {k: v for k, v in config_to_dict(state.options).items() if k != "version"},
        "layers": state.layers,
        "hessian_peak_bytes": state.peak,
        "solver_peak_bytes": state.solver_peak,
    }
