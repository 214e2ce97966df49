"""Keep freed memory for reuse while checkpoint mode runs (glibc only). Imports nothing from the
project.

Checkpoint mode allocates and frees tensors of the same few sizes over and over (each input
tensor, the optimiser's temporaries, each result). glibc serves blocks above its mmap
threshold (128 KiB to 32 MiB, adjusted on the fly) with a fresh ``mmap`` and returns them on
``free``, so every such allocation pays page faults and the kernel's zeroing of every page:
reading a tensor into fresh memory ran at 1.4 GB/s against 6.7 GB/s into memory already
touched, and the optimiser spent 10-20% of its time faulting pages (``python
bench/checkpoint.py --heap``). :func:`reuse_freed_memory` raises the mmap threshold to 1 GiB
and the trim threshold to its maximum for the run, so freed blocks stay in the heap and are
reused; the peak is unchanged (the heap grows to what the run held at once, never beyond).
After the run glibc's default thresholds are set again and the heap is trimmed, so a Python
caller's process gives the memory back. ``MONOQUANT_REUSE_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Iterator

__all__ = ["reuse_freed_memory"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
_DEFAULT = 128 * 1024  # glibc's initial value of both
_lock = threading.Lock()
_depth = 0  # nested runs (a Python caller's threads): the outermost one restores


def _libc() -> ctypes.CDLL | None:
    if os.environ.get("MONOQUANT_REUSE_FREED_MEMORY", "1") == "0":
        return None
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - no dynamic loader
        return None


@contextlib.contextmanager
def reuse_freed_memory() -> Iterator[bool]:
    """Keep freed blocks in the heap for the duration; yields whether it could (glibc)."""
    global _depth
    libc = _libc()
    if libc is None:
        yield False
        return
    with _lock:
        if _depth == 0:
            libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(2**30))
            libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))
        _depth += 1
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_DEFAULT))
                libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_DEFAULT))
                libc.malloc_trim(ctypes.c_size_t(0))
