"""The pictures of the ``sensitivity`` plugin: the ``monoquant sensitivity --html`` page
(:func:`html_report`) and the allocation's section of a ``quantize --html`` page
(:func:`add_to_report`, through ``report.html_sections``)."""

from __future__ import annotations

import math
from typing import Any

from monoquant_core.tables import (
    html_heading,
    html_page,
    html_table,
    html_text,
    svg_bars,
    svg_curve,
)

from .sensitivity_allocate import tradeoff

__all__ = ["add_to_report", "html_report"]


def html_report(res: dict[str, Any]) -> str:
    """One self-contained HTML page of a :func:`measure` table: per-layer sensitivity bars,
    the allocator's size/accuracy trade-off curve with the uniform schemes, and the table."""
    which = "output SQNR" if res["batches"] else "weight SQNR"
    bars = []
    for r in res["layers"]:
        usable = [v for v in r["candidates"].values() if "error" not in v]
        if usable:
            cheapest = min(usable, key=lambda v: v["bits_per_weight"])
            bars.append((r["name"], cheapest.get("output_sqnr_db", cheapest["weight_sqnr_db"])))
    rows = []
    for r in res["layers"]:
        row: list[object] = [r["name"]]
        for c in res["candidates"]:
            v = r["candidates"][c]
            row += ["n/a", "n/a"] if "error" in v else [
                v["bits_per_weight"], v.get("output_sqnr_db", v["weight_sqnr_db"])]  # fmt: skip
        rows.append(row)
    headers = ["layer"] + [f"{c} {k}" for c in res["candidates"] for k in ("bits", "dB")]
    parts = [
        html_text(
            f"{len(res['layers'])} weights, {len(res['candidates'])} candidates, "
            f"{res['batches']} batch(es) of data; {which} with only that layer quantized."
        ),
        html_heading(f"Sensitivity: {which} of the cheapest candidate (lower = more sensitive)"),
        svg_bars(bars, "dB", "sensitivity"),
        html_heading("Size against estimated output SQNR: the allocator and uniform schemes"),
        svg_curve(tradeoff(res), "bits per weight", "estimated SQNR dB", "tradeoff"),
        html_heading("Every layer and candidate"),
        html_table(headers, rows, "layers"),
    ]
    return html_page("Mono Quant sensitivity", parts)


#: what :func:`.sensitivity_refine.refine` adds to an allocation (calibrated runs)
_MEASURED = ("measured_sqnr_db", "first_estimate_db", "first_measured_sqnr_db", "rounds")


def add_to_report(report: Any, state: dict[str, Any]) -> None:
    """The allocation of a run (``run.state["sensitivity"]``) and its trade-off curve into
    ``report.extra["sensitivity"]``, and the curve drawn into ``report.html_sections``."""
    res = state["allocation"]
    curve = {name: [[x, y] for x, y in pts if math.isfinite(x) and math.isfinite(y)]
             for name, pts in tradeoff(state["table"]).items()}  # fmt: skip
    chosen = [[res["bits_per_weight"], res["estimated_sqnr_db"]]]
    curve["this run"] = [p for p in chosen if all(map(math.isfinite, p))]
    report.extra["sensitivity"] = {
        "bits_per_weight": res["bits_per_weight"],
        "estimated_sqnr_db": res["estimated_sqnr_db"],
        **{k: res[k] for k in _MEASURED if k in res},
        "choice": res["choice"],
        "tradeoff": curve,
    }
    which = "output" if state["table"]["batches"] else "size-weighted weight-noise"
    heading = (
        f"Sensitivity allocation: bits per weight against estimated {which} SQNR (dB), the "
        "allocator at several budgets, each candidate used uniformly, and this run"
    )
    points = {k: [(x, y) for x, y in v] for k, v in curve.items()}
    chart = svg_curve(points, "bits per weight", "estimated SQNR dB", "sensitivity-tradeoff")
    report.html_sections.append((heading, chart))
