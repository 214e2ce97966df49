"""The plan types: what will be quantized, how, and why not; and what quantizing produced.

Every module that owns parameters appears in the plan: either selected (scheme, observer,
backend) or skipped with a human-readable ``skip_reason``. Nothing is touched silently.
:class:`ModuleResult` is what quantizing one entry gives, :class:`QuantResult` what
``Engine.quantize`` returns.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from .config import Config
from .qtensor import QTensor
from .tables import format_table

if TYPE_CHECKING:  # pragma: no cover
    from .report import QuantReport

__all__ = ["ModuleResult", "Plan", "PlanEntry", "QuantResult"]


@dataclass
class PlanEntry:
    """One module and what happens to it.

    Attributes:
        name: module name in ``model.named_modules()`` ("" is the root module).
        module_type: the module's class name.
        scheme / observer / backend: chosen components (None when skipped).
        replacer: name of the replacer that will swap the module.
        params: parameter names to quantize, with their shapes.
        options: per-entry options (plugins may add their own keys).
        skip_reason: None when selected, else why the module stays in float.
        notes: extra remarks shown in the plan (e.g. why a backend was chosen).
        kernels: the backend's kernel per range of input rows (``"M 1-31: ..."``), set with
            the backend.
        collected: calibration collectors by name (see ``monoquant_collectors``), filled when
            calibration ran; not printed, not in ``to_dict``, not compared.
        calibration_rows: None when no calibration ran, else the number of input rows the
            module saw (``numel // last dim`` of its first input, summed over batches).
    """

    name: str
    module_type: str
    scheme: str | None = None
    observer: str | None = None
    backend: str | None = None
    replacer: str | None = None
    params: dict[str, tuple[int, ...]] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)
    skip_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    kernels: list[str] = field(default_factory=list)
    collected: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    calibration_rows: int | None = None

    @property
    def selected(self) -> bool:
        return self.skip_reason is None

    def skip(self, reason: str) -> None:
        """Mark the entry as kept in float, with ``reason`` (plugins call this too)."""
        self.skip_reason = reason
        self.scheme = self.observer = self.backend = None
        self.kernels = []

    def to_dict(self) -> dict[str, Any]:
        rows = {} if self.calibration_rows is None else {"calibration_rows": self.calibration_rows}
        return {
            "name": self.name,
            "module_type": self.module_type,
            "action": "quantize" if self.selected else "skip",
            "scheme": self.scheme,
            "observer": self.observer,
            "backend": self.backend,
            "replacer": self.replacer,
            "params": {k: list(v) for k, v in self.params.items()},
            "options": self.options,
            "skip_reason": self.skip_reason,
            "notes": list(self.notes),
            "kernels": list(self.kernels),
            **rows,
        }


@dataclass
class Plan:
    """The ordered list of :class:`PlanEntry` for one run.

    ``config`` records the run's :class:`Config` for whoever receives the plan (``monoquant
    plan --json`` prints it); plugins read the configuration from ``run.config``.
    """

    entries: list[PlanEntry]
    config: Config
    unit: str = "modules"  # "tensors" in checkpoint mode

    def __iter__(self) -> Iterator[PlanEntry]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, name: str) -> PlanEntry:
        for e in self.entries:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def selected(self) -> list[PlanEntry]:
        return [e for e in self.entries if e.selected]

    @property
    def skipped(self) -> list[PlanEntry]:
        return [e for e in self.entries if not e.selected]

    def render(self) -> str:
        """The ``monoquant plan`` table."""
        rows = []
        for e in self.entries:
            shapes = ", ".join("x".join(map(str, s)) for s in e.params.values())
            if e.selected:
                action = f"{e.scheme} / {e.observer}" + (f" / {e.backend}" if e.backend else "")
                shown = e.kernels if len(e.kernels) > 1 else []  # one kernel: the backend says it
                why = "; ".join([*e.notes, *shown])
            else:
                action, why = "keep float", e.skip_reason or ""
            rows.append([e.name or "(root)", e.module_type, shapes, action, why])
        first = "module" if self.unit == "modules" else "tensor"
        table = format_table([first, "type", "shape", "scheme / observer / backend", "why"], rows)
        n_sel = len(self.selected)
        return f"{table}\n\n{n_sel} of {len(self.entries)} {self.unit} will be quantized."

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "entries": [e.to_dict() for e in self.entries]}


@dataclass
class ModuleResult:
    """What quantizing one plan entry produced (``monoquant_quantize_weights`` returns it).

    Attributes:
        entry: the plan entry.
        qtensors: quantized weights by parameter name (every weight the entry's replacer names).
        originals: the float weights they came from (for the report's error metrics).
        metrics: free-form per-module values plugins may add (reported under
            ``report.extra["modules"][entry.name]``).
        notes: one-line facts about this layer a user should read in the text report (e.g.
            ``"3 outlier columns kept in float"``); the report lists them as
            ``layer: note`` under its table, and in the JSON under ``notes``.
        module: the replacement module; the core builds it with the entry's replacer after the
            hook returned (None until then). It is swapped in after every entry succeeded.
        time_s: seconds spent quantizing the entry (set by the core).
    """

    entry: PlanEntry
    qtensors: dict[str, QTensor]
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    module: nn.Module | None = None
    time_s: float = 0.0


class QuantResult(NamedTuple):
    """``Engine.quantize`` result: unpack as ``model, report = engine.quantize(...)``."""

    model: nn.Module
    report: QuantReport
