"""Plain-text tables and human-readable sizes for terminal output (no dependencies)."""

from __future__ import annotations

import re

__all__ = ["format_table", "human_bytes"]

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
