"""heap.reuse_freed_memory: freed blocks stay in glibc's heap during a run, and go back after."""

from __future__ import annotations

import ctypes
import os
import platform

import pytest
import torch

from monoquant_core.heap import reuse_freed_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                  "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def _info() -> _MallInfo2:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        pytest.skip("glibc without mallinfo2 (before 2.33): cannot look into the heap")
    libc.mallinfo2.restype = _MallInfo2
    return libc.mallinfo2()


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not GLIBC, reason="the heap tuning is for glibc only")
def test_a_freed_big_block_is_kept_for_reuse_and_returned_after_the_run():
    n = 48 * 2**20  # above glibc's default mmap threshold: normally an mmap of its own
    with reuse_freed_memory() as on:
        assert on
        t = torch.empty(n, dtype=torch.uint8)
        t.fill_(1)
        mapped = _info().hblkhd  # bytes in mmap'd blocks
        del t
        kept = _info().fordblks  # free bytes kept in the heap
        assert kept >= n, f"{kept} free bytes in the heap after freeing {n}"
        assert mapped < n, "the block was mmap'd on its own"
        rss = _rss()
    assert _rss() < rss - n // 2, "the freed memory was not given back after the run"
    t = torch.empty(n, dtype=torch.uint8)  # defaults again: an mmap of its own
    assert _info().hblkhd >= n
    del t


@pytest.mark.skipif(not GLIBC, reason="the heap tuning is for glibc only")
def test_nested_runs_restore_once_and_the_switch_turns_it_off(monkeypatch):
    n = 48 * 2**20
    with reuse_freed_memory(), reuse_freed_memory():
        pass
    with reuse_freed_memory():
        with reuse_freed_memory():
            pass
        t = torch.empty(n, dtype=torch.uint8)
        assert _info().hblkhd < n  # still tuned after the inner run ended
        del t
    monkeypatch.setenv("MONOQUANT_REUSE_FREED_MEMORY", "0")
    with reuse_freed_memory() as on:
        assert not on
