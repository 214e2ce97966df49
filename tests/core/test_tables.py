"""tables.py: plain-text tables (numeric cells right-aligned) and human-readable sizes."""

from __future__ import annotations

from monoquant_core.tables import format_table, human_bytes


def test_numeric_cells_are_right_aligned_and_the_first_column_never_is():
    text = format_table(["name", "bits", "size"], [["12", "4.25", "1.50 MiB"], ["lm", "16", "x"]])
    lines = text.splitlines()
    assert lines[0] == "name  bits  size"
    assert lines[1] == "----  ----  --------"
    assert lines[2] == "12    4.25  1.50 MiB"
    assert lines[3] == "lm      16  x"


def test_human_bytes_units():
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.50 KiB"
    assert human_bytes(3 * 1024**2) == "3.00 MiB"
    assert human_bytes(5 * 1024**4) == "5120.00 GiB"
