"""Calibration: run batches through a model and feed plugins' collectors with layer inputs.

``Engine.quantize(model, calibration=data)`` and ``Engine.calibrate(model, data)`` come here
after planning. For each selected entry the ``monoquant_collectors`` hook returns named
collectors (anything with ``update(x)``); ONE forward pre-hook per planned module feeds them the
module's first positional input on every batch. The hooks are always removed, the model runs in
``eval()`` mode under ``torch.no_grad()`` and its ``training`` flags are restored, so a failed
calibration leaves the model exactly as it was.

``data`` may be a tensor (one batch), a dict (one batch of keyword inputs), or any iterable of
batches (a list, a generator, a ``DataLoader``): each batch is a tensor (``model(x)``), a tuple
or list (``model(*batch)``) or a dict (``model(**batch)``). Tensors are moved to the model's
device.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .config import config_to_dict
from .errors import MonoQuantError, PluginConflictError, PluginError, UsageError
from .progress import Progress

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine
    from .plan import Plan, PlanEntry

__all__ = [
    "CalibrationWarning",
    "apply_fallbacks",
    "gather_collectors",
    "iter_batches",
    "model_device",
    "run_batch",
    "run_calibration",
    "warn_calibration",
]

Batch = tuple[tuple[Any, ...], dict[str, Any]]

_BATCH_FIX = (
    "give a tensor, or an iterable whose batches are tensors (model(x)), tuples "
    "(model(*batch)) or dicts (model(**batch))"
)


class CalibrationWarning(UserWarning):
    """Warning category of calibration: too few rows, layers without data, NaN/Inf inputs."""


# --------------------------------------------------------------------------- batches


def iter_batches(data: Any, device: torch.device | None = None) -> Iterator[Batch]:
    """Normalise calibration ``data`` into ``(args, kwargs)`` batches (see the module doc).

    Raises:
        UsageError: ``data`` is not a tensor / iterable, a batch has an unsupported type, the
            iterable raised while producing a batch, or it produced no batch at all.
    """
    if isinstance(data, torch.Tensor):
        yield _batch(data, 0, device)
        return
    if isinstance(data, Mapping):
        yield _batch(data, 0, device)
        return
    if data is None or isinstance(data, (str, bytes)):
        raise UsageError(
            f"calibration data is a {type(data).__name__}, not a tensor or batches", _BATCH_FIX
        )
    try:
        it = iter(data)
    except TypeError:
        raise UsageError(
            f"calibration data of type {type(data).__name__} is not a tensor or an iterable "
            "of batches",
            _BATCH_FIX,
        ) from None
    i = 0
    while True:
        try:
            item = next(it)
        except StopIteration:
            break
        except MonoQuantError:
            raise
        except Exception as e:
            raise UsageError(
                f"calibration data raised {type(e).__name__} while producing batch {i}: "
                f"{_first_line(e)}",
                "fix the data source; nothing was quantized and the model is unchanged",
            ) from e
        yield _batch(item, i, device)
        i += 1
    if i == 0:
        raise UsageError(
            "calibration data is empty (it produced no batch)",
            "pass at least one batch of model inputs (a few hundred rows is typical)",
        )


def _batch(item: Any, i: int, device: torch.device | None) -> Batch:
    def move(v: Any) -> Any:
        return v.to(device) if isinstance(v, torch.Tensor) and device is not None else v

    if isinstance(item, torch.Tensor):
        return (move(item),), {}
    if isinstance(item, (tuple, list)):
        return tuple(move(v) for v in item), {}
    if isinstance(item, Mapping):
        return (), {str(k): move(v) for k, v in item.items()}
    raise UsageError(f"calibration batch {i} is a {type(item).__name__}", _BATCH_FIX)


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter (or buffer); None for a stateless model."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


# --------------------------------------------------------------------------- collectors


def gather_collectors(
    engine: Engine, entry: PlanEntry, module: nn.Module
) -> tuple[dict[str, Any], dict[str, str]]:
    """Call every plugin's ``monoquant_collectors`` for ``entry``: ``(collectors, owners)``.

    Raises:
        PluginConflictError: two plugins returned the same collector name (both named).
        PluginError: an implementation raised, or returned something that is not a dict of
            objects with an ``update`` method.
    """
    kwargs = {"entry": entry, "module": module, "config": engine.config, "engine": engine}
    out: dict[str, Any] = {}
    owners: dict[str, str] = {}
    caller = engine.pm.hook.monoquant_collectors
    for impl in reversed(caller.get_hookimpls()):  # pluggy's call order
        if getattr(impl, "wrapper", False) or getattr(impl, "hookwrapper", False):
            continue
        who = impl.plugin_name
        try:
            res = impl.function(*[kwargs[a] for a in impl.argnames])
        except MonoQuantError:
            raise
        except Exception as e:
            raise PluginError(
                f"plugin {who!r} raised {type(e).__name__} in monoquant_collectors for "
                f"{entry.name!r}: {e}",
                f"report it to the plugin's authors, or disable it with "
                f"MONOQUANT_DISABLE_PLUGINS={who}",
            ) from e
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
    rows: int = 0
    nonfinite: int = 0
    calls: int = 0
    handle: Any = None


class _CollectorFailure(Exception):
    def __init__(self, plugin: str, name: str, layer: str, exc: BaseException):
        super().__init__(f"{plugin}:{name}")
        self.plugin, self.name, self.layer, self.exc = plugin, name, layer, exc


def _finite(x: torch.Tensor) -> bool:
    if x.numel() == 0 or not x.is_floating_point():
        return True
    return bool(torch.isfinite(torch.stack([x.amin(), x.amax()])).all())


def _make_hook(st: _LayerState) -> Any:
    def pre_hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        x = args[0] if args else next(iter(kwargs.values()), None)
        if not isinstance(x, torch.Tensor):
            return
        st.calls += 1
        x = x.detach()
        if not _finite(x):
            st.nonfinite += 1
            return
        st.rows += x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
        for name, c in st.collectors.items():
            try:
                c.update(x)
            except MonoQuantError:
                raise
            except Exception as e:
                raise _CollectorFailure(st.owners[name], name, st.entry.name, e) from e

    return pre_hook


# --------------------------------------------------------------------------- running


def run_calibration(
    engine: Engine,
    model: nn.Module,
    entries: list[PlanEntry],
    batches: Iterable[Batch],
    *,
    min_rows: int = 32,
    progress: bool = True,
    total: int | None = None,
    warn: bool = True,
) -> list[_LayerState]:
    """Feed ``entries``' collectors with ``batches``; fill ``collected`` / ``calibration_rows``.

    Called after ``engine.config`` is set (inside a run). ``entries`` are selected plan entries
    of ``model``; each gets one forward pre-hook. Warnings (:class:`CalibrationWarning`) for
    too few rows (< ``min_rows``), layers that saw no data, and NaN/Inf inputs.

    Raises:
        UsageError: bad data or a batch the model rejects (one line, the hooks removed).
        PluginError / PluginConflictError: a collector failed or names clash.
    """
    states = []
    for entry in entries:
        module = model.get_submodule(entry.name)
        collectors, owners = gather_collectors(engine, entry, module)
        states.append(_LayerState(entry, collectors, owners))
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


def run_batch(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], i: int) -> None:
    """``model(*args, **kwargs)``; a failure becomes a one-line error naming batch ``i``."""
    try:
        model(*args, **kwargs)
    except _CollectorFailure as f:
        raise PluginError(
            f"plugin {f.plugin!r}: collector {f.name!r} of {f.layer!r} raised "
            f"{type(f.exc).__name__} on calibration batch {i}: {f.exc}",
            "report it to the plugin's authors, or disable it with "
            f"MONOQUANT_DISABLE_PLUGINS={f.plugin}",
        ) from f.exc
    except MonoQuantError:
        raise
    except Exception as e:
        shapes = ", ".join(
            "x".join(map(str, v.shape)) if isinstance(v, torch.Tensor) else type(v).__name__
            for v in [*args, *kwargs.values()]
        )
        raise UsageError(
            f"calibration batch {i} (inputs {shapes or 'none'}) failed in the model: "
            f"{type(e).__name__}: {_first_line(e)}",
            "give batches shaped like the model's inputs; nothing was quantized and the model "
            "is unchanged",
        ) from e


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


def apply_fallbacks(engine: Engine, plan: Plan, model: nn.Module, entries: list[PlanEntry]) -> None:
    """Entries that need calibration but saw no data become weight-only (reason in the notes).

    The scheme decides (``Scheme.needs_calibration`` / ``Scheme.weight_only``); the backend is
    chosen again for the weight-only variant. A scheme without a weight-only variant keeps the
    layer in float, with the reason.
    """
    from .selection import _finish

    for entry in entries:
        if not entry.selected or entry.calibration_rows != 0:
            continue
        scheme = engine.schemes.get(entry.scheme)
        cfg, _ = engine.component_configs(entry)
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
        _finish(engine, plan.config, entry, model.get_submodule(entry.name), with_backend=True)
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
