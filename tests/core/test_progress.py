"""progress.py: the progress line (only on a terminal; count, bytes, percent, ETA)."""

from __future__ import annotations

import re

from monoquant_core.progress import Progress, _clock
from tests.helpers import Terminal


def test_a_known_total_shows_count_bytes_and_percent():
    out = Terminal()
    p = Progress(2, 2048, stream=out)
    p.advance("layer.0.weight", 1024)
    p.advance("layer.1.weight", 1024)  # the last item is always drawn
    p.close()
    last = out.text.rstrip("\n").split("\r")[-1]
    assert last.startswith("2/2 tensors  2.00 KiB / 2.00 KiB  100%  ETA 0:00  layer.1.weight")
    assert out.text.endswith("\n")


def test_an_unknown_total_shows_the_count_and_nothing_is_written_off_a_terminal():
    out = Terminal()
    p = Progress(0, 0, stream=out, label="batches", show_bytes=False)
    for i in range(3):
        p.advance(f"batch {i}", 0)
    p.close()
    assert re.fullmatch(r"3 batches  \d+:\d\d  batch 2", out.text.rstrip("\n").split("\r")[-1])
    quiet = Terminal(tty=False)
    q = Progress(1, 10, stream=quiet)
    q.advance("x", 10)
    q.close()
    disabled = Terminal()
    d = Progress(1, 10, enabled=False, stream=disabled)
    d.advance("x", 10)
    d.close()
    assert quiet.text == "" and disabled.text == ""


def test_clock():
    assert [_clock(s) for s in (0, 59.6, 61, 3600 + 62)] == ["0:00", "1:00", "1:01", "1:01:02"]
