"""Plain-text tables and human-readable sizes for terminal output, and the pieces of the
self-contained HTML reports (``--html``): tables, bar charts and curves in inline SVG (no
dependencies, no JavaScript)."""

from __future__ import annotations

import html
import math
import re

__all__ = [
    "format_table",
    "html_heading",
    "html_page",
    "html_table",
    "html_text",
    "human_bytes",
    "svg_bars",
    "svg_curve",
]

_NUMERIC = re.compile(r"^[-+]?(\d[\d.,x]*(e[-+]?\d+)?|inf)( [KMGT]?i?B)?$")


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    """A plain monospace table; right-aligns cells that look numeric."""
    widths = [len(h) for h in headers]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r)]

    def fmt(cells: list[str]) -> str:
        out = []
        for i, (c, w) in enumerate(zip(cells, widths)):
            numeric = i > 0 and _NUMERIC.match(c) is not None
            out.append(c.rjust(w) if numeric else c.ljust(w))
        return "  ".join(out).rstrip()

    lines = [fmt(headers), "  ".join("-" * w for w in widths)]
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


def human_bytes(n: float) -> str:
    """``1.50 MiB`` style sizes."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


# --------------------------------------------------------------------------- HTML reports
#
# One self-contained page: inline CSS and SVG, no JavaScript, no network. Every number drawn
# is also written as a ``data-value`` attribute, so tests (and scripts) can read the page back.


def _esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def html_page(title: str, parts: list[str]) -> str:
    """A complete HTML document with ``parts`` (from the other ``html_*`` / ``svg_*``)."""
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:70em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:.2em .5em;text-align:right}td:first-child,th:first-child{text-align:left}"
        "h1{font-size:1.4em}h2{font-size:1.1em;margin-top:2em}svg text{font-size:11px}"
    )
    body = "\n".join(parts)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}'
        f"</title><style>{style}</style></head><body>\n<h1>{_esc(title)}</h1>\n{body}\n"
        "</body></html>\n"
    )


def html_heading(text: str) -> str:
    return f"<h2>{_esc(text)}</h2>"


def html_text(text: str) -> str:
    return f"<p>{_esc(text)}</p>"


def html_table(headers: list[str], rows: list[list[object]], table_id: str = "") -> str:
    """A table; numeric cells carry ``data-value``."""
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for r in rows:
        cells = []
        for c in r:
            if isinstance(c, (int, float)) and not isinstance(c, bool):
                shown = f"{c:.4g}" if isinstance(c, float) else str(c)
                cells.append(f'<td data-value="{c!r}">{_esc(shown)}</td>')
            else:
                cells.append(f"<td>{_esc(c)}</td>")
        body.append(f"<tr>{''.join(cells)}</tr>")
    ident = f' id="{_esc(table_id)}"' if table_id else ""
    return f"<table{ident}><tr>{head}</tr>{''.join(body)}</table>"


def svg_bars(items: list[tuple[str, float]], unit: str, chart_id: str = "") -> str:
    """Horizontal bars, one per ``(label, value)`` (finite values; others drawn empty)."""
    finite = [v for _, v in items if math.isfinite(v)]
    top = max(finite, default=1.0) or 1.0
    row, label_w, bar_w = 16, 330, 360
    height = row * len(items) + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_w + bar_w + 80}" '
        f'height="{height}"' + (f' id="{_esc(chart_id)}"' if chart_id else "") + ">"
    ]
    for i, (label, value) in enumerate(items):
        y = 10 + i * row
        w = bar_w * max(value, 0.0) / top if math.isfinite(value) else 0.0
        parts.append(
            f'<text x="{label_w - 6}" y="{y + 11}" text-anchor="end">{_esc(label)}</text>'
            f'<rect x="{label_w}" y="{y + 2}" width="{w:.1f}" height="{row - 4}" fill="#4a7ebb"'
            f' data-label="{_esc(label)}" data-value="{value!r}"/>'
            f'<text x="{label_w + w + 4:.1f}" y="{y + 11}">{value:.2f} {_esc(unit)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def svg_curve(
    series: dict[str, list[tuple[float, float]]], xlabel: str, ylabel: str, chart_id: str = ""
) -> str:
    """Points (and lines for series of more than one point) on shared axes."""
    pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(x) and math.isfinite(y)]
    if not pts:
        return ""
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    w, h, m = 560, 300, 50

    def sx(x: float) -> float:
        return m + (x - x0) / (x1 - x0) * (w - 2 * m)

    def sy(y: float) -> float:
        return h - m - (y - y0) / (y1 - y0) * (h - 2 * m)

    colours = ["#4a7ebb", "#d9822b", "#3a9c5b", "#b03a48", "#7a5bb0", "#555"]
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 200}" height="{h}"'
        + (f' id="{_esc(chart_id)}"' if chart_id else "")
        + ">",
        f'<line x1="{m}" y1="{h - m}" x2="{w - m}" y2="{h - m}" stroke="#888"/>',
        f'<line x1="{m}" y1="{m}" x2="{m}" y2="{h - m}" stroke="#888"/>',
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">{_esc(xlabel)} '
        f"({x0:.2f} to {x1:.2f})</text>",
        f'<text x="12" y="{m - 12}">{_esc(ylabel)} ({y0:.1f} to {y1:.1f})</text>',
    ]
    for k, (name, points) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        good = [(x, y) for x, y in points if math.isfinite(x) and math.isfinite(y)]
        if len(good) > 1:
            path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(good))
            out.append(f'<polyline points="{path}" fill="none" stroke="{colour}"/>')
        for x, y in good:
            out.append(
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}" '
                f'data-series="{_esc(name)}" data-x="{x!r}" data-y="{y!r}"/>'
            )
        out.append(f'<text x="{w - m + 10}" y="{m + 14 * k}" fill="{colour}">{_esc(name)}</text>')
    out.append("</svg>")
    return "".join(out)
