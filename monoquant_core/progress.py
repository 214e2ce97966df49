"""A dependency-free progress line on stderr (tensors done / bytes / ETA).

Shown only when enabled and stderr is a terminal; redrawn at most 10 times a second.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from .tables import human_bytes

__all__ = ["Progress"]


class Progress:
    """``Progress(total_items, total_bytes)``; call :meth:`advance` per item, then :meth:`close`.

    ``total_items=0`` means the total is unknown: the line shows the count and elapsed time.
    """

    def __init__(
        self,
        total_items: int,
        total_bytes: int,
        enabled: bool = True,
        stream: TextIO | None = None,
        label: str = "tensors",
        show_bytes: bool = True,
    ):
        self.show_bytes = show_bytes
        self.stream = stream or sys.stderr
        self.enabled = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.total_items, self.total_bytes, self.label = total_items, max(total_bytes, 1), label
        self.items = self.bytes = 0
        self._name = ""
        self.t0 = time.monotonic()
        self._last = 0.0
        self._width = 0

    def advance(self, name: str, nbytes: int) -> None:
        self.items += 1
        self.bytes += nbytes
        self._name = name
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.items == self.total_items):
            self._last = now
            self._draw(name, now - self.t0)

    def _draw(self, name: str, elapsed: float) -> None:
        if self.total_items <= 0:  # unknown total (e.g. a generator of calibration batches)
            self._write(f"{self.items} {self.label}  {_clock(elapsed)}  {name[-40:]}")
            return
        frac = self.bytes / self.total_bytes
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        size = (
            f"{human_bytes(self.bytes)} / {human_bytes(self.total_bytes)}  "
            if self.show_bytes
            else ""
        )
        line = (
            f"{self.items}/{self.total_items} {self.label}  {size}"
            f"{int(frac * 100):3d}%  ETA {_clock(eta)}  {name[-40:]}"
        )
        self._write(line)

    def _write(self, line: str) -> None:
        pad = max(self._width - len(line), 0)
        self._width = len(line)
        self.stream.write("\r" + line + " " * pad)
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.total_items <= 0 and self.items:  # the final count
            self._draw(self._name, time.monotonic() - self.t0)
        if self.enabled and self._width:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds + 0.5), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:d}:{s:02d}"
