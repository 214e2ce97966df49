"""QuantReport: per-layer metrics and totals, as a terminal table and as JSON, and building it
from the results of a module-mode run."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from . import tables
from .components import Scheme
from .metrics import ErrorStats
from .plan import ModuleResult, Plan
from .qtensor import QTensor
from .registry import Registry
from .tables import format_table, human_bytes

__all__ = ["LayerReport", "QuantReport", "build_report", "layer_report"]


def _db(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if math.isinf(x) and x > 0 else f"{x:.2f}"


@dataclass
class LayerReport:
    """Metrics of one quantized weight."""

    name: str
    module_type: str
    scheme: str
    observer: str
    backend: str
    shape: tuple[int, ...]
    numel: int
    bytes_before: int
    bytes_after: int
    bits_per_weight: float
    sqnr_db: float | None  # None: statistics were turned off (``stats=False``)
    max_abs_err: float | None
    rel_err: float | None
    time_s: float
    kernels: str = ""
    #: the fraction of the weight's elements the error statistics were computed on (1.0:
    #: exact; less with ``stats="sample"`` on a large weight: evenly spread blocks of rows)
    stats_fraction: float = 1.0


def layer_report(
    name: str,
    module_type: str,
    observer: str,
    backend: str,
    weight: torch.Tensor,
    qt: QTensor,
    scheme: Scheme,
    time_s: float = 0.0,
    stats: str = "sample",
) -> LayerReport:
    """The metrics of one quantized weight (``stats``: ``"full"``, ``"sample"`` or
    ``"off"``: see :class:`~monoquant_core.config.Config`)."""
    db = max_err = rel = None
    fraction = 0.0
    if stats != "off":
        budget = SAMPLE_BUDGET if stats == "sample" else None
        db, max_err, rel, fraction = weight_stats(scheme, qt, weight, budget)
    layer = LayerReport(
        name=name,
        module_type=module_type,
        scheme=qt.scheme,
        observer=observer,
        backend=backend,
        shape=qt.shape,
        numel=qt.numel,
        bytes_before=weight.numel() * weight.element_size(),
        bytes_after=qt.nbytes,
        bits_per_weight=qt.bits_per_weight,
        sqnr_db=db,
        max_abs_err=max_err,
        rel_err=rel,
        time_s=time_s,
    )
    layer.stats_fraction = fraction
    return layer


#: elements dequantized at a time for the statistics
STATS_PIECE = 1 << 18
#: with ``stats="sample"``, weights up to this many elements are measured exactly; larger
#: ones on evenly spread blocks of rows holding about this many
SAMPLE_BUDGET = 1 << 20


def weight_stats(
    scheme: Scheme, qt: QTensor, weight: torch.Tensor, budget: int | None = None
) -> tuple[float, float, float, float]:
    """``(sqnr_db, max_abs_err, rel_err, fraction measured)`` of the scheme's dequantization
    of ``qt`` against ``weight``.

    Weights in the standard affine layout along axis 0 are dequantized a block of rows at a
    time (no float copy of the whole weight) and, with a ``budget`` smaller than the weight,
    only every n-th block is measured (the maximum error is then the sample's). Other layouts
    are dequantized and measured whole.
    """
    acc = ErrorStats()
    c = qt.channels
    if type(scheme).dequantize is Scheme.dequantize and qt.axis == 0 and c > 1:
        w = weight.detach().reshape(c, -1)
        step = max(1, STATS_PIECE // max(1, w.shape[1]))
        blocks = range(0, c, step)
        every = 1 if budget is None else max(1, -(-w.numel() // budget))
        done = 0
        for i in blocks[::every]:
            rows = w[i : i + step]
            acc.add(rows, qt.channel_rows(i, i + step).dequantize())
            done += rows.numel()
        return (*acc.result(), done / max(1, w.numel()))
    acc.add(weight, scheme.dequantize(qt))
    return (*acc.result(), 1.0)


@dataclass
class QuantReport:
    """The result of a run: quantized layers, skipped layers with reasons, and totals.

    ``model_bytes_before/after`` count every parameter and buffer of the model (what a saved
    file holds), so the compression ratio is the real file-size ratio, not a per-layer one.
    """

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    model_bytes_before: int = 0
    model_bytes_after: int = 0
    time_s: float = 0.0
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[tuple[str, str]] = field(default_factory=list)  # (layer, one-line fact)
    #: sections plugins add to the HTML page in ``monoquant_report``: ``(heading, fragment)``,
    #: a self-contained HTML fragment (inline SVG, tables; ``monoquant_core.tables`` builds
    #: them); the numbers it shows belong in ``extra`` too, for the JSON report
    html_sections: list[tuple[str, str]] = field(default_factory=list)

    @property
    def compression_ratio(self) -> float:
        return self.model_bytes_before / self.model_bytes_after if self.model_bytes_after else 0.0

    @property
    def min_sqnr_db(self) -> float | None:
        """The lowest SQNR of the quantized weights (None without any, or with stats off)."""
        known = [layer.sqnr_db for layer in self.layers if layer.sqnr_db is not None]
        return min(known, default=None)

    def layer(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def render(self) -> str:
        """The terminal table: one row per quantized weight, then skips and totals."""
        rows = [
            [
                r.name,
                r.module_type,
                r.scheme,
                "x".join(map(str, r.shape)),
                f"{r.bits_per_weight:.2f}",
                _db(r.sqnr_db),
                "-" if r.max_abs_err is None else f"{r.max_abs_err:.3g}",
                human_bytes(r.bytes_before),
                human_bytes(r.bytes_after),
            ]
            for r in self.layers
        ]
        head = ["layer", "type", "scheme", "shape", "bits/w", "SQNR dB", "max err"]
        out = [format_table([*head, "before", "after"], rows)]
        if self.skipped:
            out.append("")
            out.append(f"kept in float ({len(self.skipped)}):")
            by_reason: dict[str, list[str]] = {}
            for n, why in self.skipped:
                by_reason.setdefault(why, []).append(n or "(root)")
            out += [f"  {', '.join(names)}: {why}" for why, names in by_reason.items()]
        out += self._note_lines()
        sampled = [r for r in self.layers if r.sqnr_db is not None and r.stats_fraction < 1]
        if sampled:
            out.append("")
            out.append(
                f"SQNR and max error of {len(sampled)} large weight(s) measured on evenly "
                "spread rows (stats=sample; --stats full for every element)"
            )
        out.append("")
        out.append(
            f"model: {human_bytes(self.model_bytes_before)} -> "
            f"{human_bytes(self.model_bytes_after)} "
            f"({self.compression_ratio:.2f}x smaller), {len(self.layers)} weights quantized, "
            f"min SQNR {_db(self.min_sqnr_db)} dB, {self.time_s:.2f} s"
        )
        return "\n".join(out)

    def _note_lines(self) -> list[str]:
        """The notes plugins left per layer (:attr:`ModuleResult.notes`), under the table."""
        if not self.notes:
            return []
        return ["", "notes:"] + [f"  {name or '(root)'}: {note}" for name, note in self.notes]

    def to_dict(self) -> dict[str, Any]:
        def clean(x: Any) -> Any:
            if isinstance(x, float) and math.isinf(x):
                return "inf" if x > 0 else "-inf"
            return x

        layers = [{k: clean(v) for k, v in asdict(r).items()} for r in self.layers]
        for layer in layers:
            layer["shape"] = list(layer["shape"])
        return {
            "layers": layers,
            "skipped": [{"name": n, "reason": why} for n, why in self.skipped],
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "compression_ratio": self.compression_ratio,
            "min_sqnr_db": clean(self.min_sqnr_db),
            "time_s": self.time_s,
            "config": self.config,
            "notes": [{"name": n, "note": note} for n, note in self.notes],
            "extra": self.extra,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_html(self) -> str:
        """One self-contained page (``quantize --html``): per-layer bars of the bits per weight
        chosen and of the weight SQNR, the table, the plugins' :attr:`html_sections`, skips and
        notes (every number also in a ``data-value`` attribute)."""
        layers = self.layers
        sqnr = [(la.name, la.sqnr_db) for la in layers if la.sqnr_db is not None]
        head = ["layer", "scheme", "backend", "bits/weight", "SQNR dB", "bytes"]
        rows: list[list[object]] = []
        for la in layers:
            db = la.sqnr_db if la.sqnr_db is not None else "-"
            rows.append([la.name, la.scheme, la.backend, la.bits_per_weight, db, la.bytes_after])
        summary = (
            f"{len(layers)} weights quantized: {human_bytes(self.model_bytes_before)} -> "
            f"{human_bytes(self.model_bytes_after)} ({self.compression_ratio:.2f}x smaller)"
        )
        bits = [(la.name, la.bits_per_weight) for la in layers]
        parts = [
            tables.html_text(summary),
            tables.html_heading(
                "Bits per weight chosen per layer (scales and zero points included)"
            ),
            tables.svg_bars(bits, "bits", "bits"),
        ]
        if sqnr:
            parts += [
                tables.html_heading("Weight SQNR per layer"),
                tables.svg_bars(sqnr, "dB", "sqnr"),
            ]
        parts += [
            tables.html_heading("Every quantized weight"),
            tables.html_table(head, rows, "layers"),
        ]
        for heading, fragment in self.html_sections:
            parts += [tables.html_heading(heading), fragment]
        if self.skipped:
            skipped = [list(s) for s in self.skipped]
            parts += [
                tables.html_heading("Kept in float"),
                tables.html_table(["module", "reason"], skipped),
            ]
        if self.notes:
            notes = [list(n) for n in self.notes]
            parts += [tables.html_heading("Notes"), tables.html_table(["layer", "note"], notes)]
        return tables.html_page("Mono Quant quantization report", parts)


def build_report(
    schemes: Registry,
    plan: Plan,
    results: list[ModuleResult],
    before: int,
    after: int,
) -> QuantReport:
    """The report of a module-mode run: one row per quantized weight, the skipped entries with
    their reasons, and plugins' per-module metrics under ``extra["modules"]``."""
    rep = QuantReport(
        model_bytes_before=before, model_bytes_after=after, config=plan.config.to_dict()
    )
    for res in results:
        e = res.entry
        for p, qt in res.qtensors.items():
            scheme = schemes.get(qt.scheme)
            w = res.originals.get(p)
            rep.layers.append(
                layer_report(
                    f"{e.name}.{p}" if e.name else p,
                    e.module_type,
                    e.observer or "",
                    e.backend or "",
                    w if w is not None else scheme.dequantize(qt),
                    qt,
                    scheme,
                    res.time_s / max(len(res.qtensors), 1),
                    stats=plan.config.stats,
                )
            )
            rep.layers[-1].kernels = "; ".join(e.kernels)
        if res.metrics:
            rep.extra.setdefault("modules", {})[e.name] = res.metrics
        rep.notes += [(e.name, note) for note in res.notes]
    rep.skipped = [(e.name, e.skip_reason or "") for e in plan.skipped]
    return rep
