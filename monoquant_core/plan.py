"""Plan / PlanEntry: what will be quantized, how, and why not.

Every module that owns parameters appears in the plan: either selected (scheme, observer,
backend) or skipped with a human-readable ``skip_reason``. Nothing is touched silently.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .config import Config
from .report import format_table

__all__ = ["Plan", "PlanEntry"]


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
    collected: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    calibration_rows: int | None = None

    @property
    def selected(self) -> bool:
        return self.skip_reason is None

    def skip(self, reason: str) -> None:
        """Mark the entry as kept in float, with ``reason`` (plugins call this too)."""
        self.skip_reason = reason
        self.scheme = self.observer = self.backend = None

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
            **rows,
        }


@dataclass
class Plan:
    """The ordered list of :class:`PlanEntry` for one run, plus its :class:`Config`."""

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
                why = "; ".join(e.notes)
            else:
                action, why = "keep float", e.skip_reason or ""
            rows.append([e.name or "(root)", e.module_type, shapes, action, why])
        first = "module" if self.unit == "modules" else "tensor"
        table = format_table([first, "type", "shape", "scheme / observer / backend", "why"], rows)
        n_sel = len(self.selected)
        return f"{table}\n\n{n_sel} of {len(self.entries)} {self.unit} will be quantized."

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "entries": [e.to_dict() for e in self.entries]}
