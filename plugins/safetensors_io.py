"""The safetensors container, read with bounded memory (no NumPy, no mmap); the writer is in
:mod:`monoquant_plugins.safetensors_writer`.

Layout: 8-byte little-endian header length ``n``, ``n`` bytes of JSON (``name -> {dtype, shape,
data_offsets}`` plus ``__metadata__``), then the tensor bytes. :class:`SafetensorsReader`
validates the whole header before anything is read (a header that lies about sizes is a
:class:`FormatError`) and reads one tensor at a time with plain file reads, so memory is
bounded by the largest tensor read, never by the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import os
import stat
import struct
import sys
import threading
from typing import Any, BinaryIO

import torch

from monoquant_core import FormatError, UsageError

__all__ = [
    "DTYPES",
    "NAMES",
    "SafetensorsReader",
    "bytes_view",
    "copy_in_kernel",
    "is_safetensors",
    "open_regular",
]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _st, _name in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _name):
        DTYPES[_st] = getattr(torch, _name)
NAMES = {v: k for k, v in DTYPES.items()}
#: Limits on a header, above real checkpoints and far below what makes every command slow
#: (1,000,000 entries took ~60 s and ~2 GB to parse and check). Real shard headers hold a few
#: hundred to a few thousand entries, a few MB (Hugging Face shards are <= 5 GB, and no Hub
#: file may exceed 50 GB: at the densest real layout, a small-expert MoE like Qwen3-30B-A3B,
#: 50 GB hold ~16,000 tensors, ~80,000 entries once quantized). Even a whole DeepSeek-V3
#: (671B, ~91,000 tensors) saved as one unsharded file would hold ~270,000 entries once
#: quantized (qdata, scale, zero_point). 300,000 entries (~45 MB of header) cover that and
#: take ~8 s and ~0.9 GB at worst on a 2-core VM; a hostile header is refused at once.
_MAX_HEADER = 100 * 2**20
_MAX_ENTRIES = 300_000
_CHUNK = 16 * 2**20


def open_regular(path: str) -> BinaryIO:
    """Open ``path`` for reading, refusing anything but a regular file (a FIFO or a device
    would block or never end) without blocking on it.

    Raises:
        UsageError: the path cannot be opened, or is not a regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise UsageError(f"cannot read {path!r}: {e.strerror or e}", "check the path") from e
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UsageError(
                f"{path!r} is not a regular file (a FIFO, socket or device)",
                "give the path of a saved .safetensors file",
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def copy_in_kernel(src_fd: int, pos: int, end: int, out: BinaryIO) -> int:
    """Copy bytes ``[pos, end)`` of ``src_fd`` to the end of ``out`` inside the kernel
    (``os.copy_file_range``: no trip through Python buffers) where the OS allows; returns how
    far it got (``pos`` when it could not start: the caller copies the rest in chunks)."""
    if not hasattr(os, "copy_file_range") or pos >= end:
        return pos
    try:
        out.flush()
        dst = out.fileno()
        while pos < end:
            n = os.copy_file_range(src_fd, dst, end - pos, pos)
            if n <= 0:
                break
            pos += n
    except (OSError, io.UnsupportedOperation, AttributeError):
        pass
    with contextlib.suppress(OSError, io.UnsupportedOperation, AttributeError):
        out.seek(os.lseek(out.fileno(), 0, os.SEEK_CUR))  # the buffered file's position
    return pos


def is_safetensors(path: str) -> bool:
    """Cheap check of the first bytes: a plausible header length followed by ``{``."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(9)
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 2 <= n <= min(size - 8, _MAX_HEADER) and head[8:9] == b"{"


def bytes_view(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor (no copy, no NumPy)."""
    n = t.numel() * t.element_size()
    return memoryview((ctypes.c_char * n).from_address(t.data_ptr())).cast("B")


class SafetensorsReader:
    """Validated, lazy access to one safetensors file.

    Args:
        path: the file.

    Raises:
        FormatError: not safetensors, truncated, or a header inconsistent with the file.
    """

    def __init__(self, path: str):
        self.path = path
        base = os.path.basename(path)
        self._lock = threading.Lock()
        self._f: BinaryIO = open_regular(path)
        try:
            self.metadata, self.entries, self.data_start = self._parse(base)
        except BaseException:
            self._f.close()
            raise

    def _parse(self, base: str) -> tuple[dict[str, str], dict[str, dict[str, Any]], int]:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise FormatError(
                f"{base} is not a safetensors file (only {size} bytes)",
                "give a .safetensors file; this one is empty or truncated",
            )
        (n,) = struct.unpack("<Q", head)
        if n < 2 or n > _MAX_HEADER or n > size - 8:
            raise FormatError(
                f"{base} is not a safetensors file or is truncated (header length {n}, file "
                f"size {size})",
                "give a complete .safetensors file",
            )
        raw = self._f.read(n)
        # each entry has one "data_offsets" key: a cheap upper bound before parsing
        if raw.count(b'"data_offsets"') > _MAX_ENTRIES:
            raise self._too_many(base, raw.count(b'"data_offsets"'))
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise FormatError(
                f"{base}: the safetensors header is not valid JSON ({e})",
                "the file is corrupted; write it again",
            ) from None
        if not isinstance(header, dict):
            raise FormatError(
                f"{base}: the safetensors header is not a JSON object",
                "the file is corrupted; write it again",
            )
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
        ):
            raise FormatError(
                f"{base}: __metadata__ must map strings to strings",
                "the file is corrupted; write it again",
            )
        if len(header) > _MAX_ENTRIES:
            raise self._too_many(base, len(header))
        data_len = size - 8 - n
        entries = {}
        for name, info in header.items():
            entries[name] = self._entry(base, name, info)
        spans = sorted((e["start"], e["end"], name) for name, e in entries.items())
        pos = 0
        for start, end, name in spans:
            if start != pos:
                raise FormatError(
                    f"{base}: tensor {name!r} starts at byte {start}, expected {pos} (the header "
                    "leaves a gap or overlaps tensors)",
                    "the file is corrupted; write it again",
                )
            pos = end
        if pos != data_len:
            raise FormatError(
                f"{base}: the header describes {pos} bytes of tensor data but the file holds "
                f"{data_len} (truncated or padded file)",
                "the file is incomplete; write or download it again",
            )
        return meta, entries, 8 + n

    @staticmethod
    def _too_many(base: str, n: int) -> FormatError:
        return FormatError(
            f"{base}: the safetensors header lists about {n} tensors, more than the "
            f"{_MAX_ENTRIES} any real checkpoint file holds",
            "the file is corrupted or hostile; split a real checkpoint into shards",
        )

    @staticmethod
    def _entry(base: str, name: str, info: Any) -> dict[str, Any]:
        bad = FormatError(
            f"{base}: tensor {name!r} has an invalid header entry ({info!r:.120})",
            "the file is corrupted; write it again",
        )
        if not isinstance(info, dict):
            raise bad
        dtype, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPES:
            raise FormatError(
                f"{base}: tensor {name!r} has unknown dtype {dtype!r}",
                "write the file with a standard dtype",
            )
        if (
            not isinstance(shape, list)
            or not all(type(s) is int and 0 <= s < 2**63 for s in shape)
            or not isinstance(offs, list)
            or len(offs) != 2
            or not all(type(o) is int and o >= 0 for o in offs)
            or offs[1] < offs[0]
        ):
            raise bad
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offs[1] - offs[0] != nbytes:
            raise FormatError(
                f"{base}: tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} "
                f"bytes but its offsets span {offs[1] - offs[0]}",
                "the header lies about sizes; write the file again",
            )
        return {"dtype": DTYPES[dtype], "shape": tuple(shape), "start": offs[0], "end": offs[1]}

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return sorted(self.entries, key=lambda k: self.entries[k]["start"])

    def dtype(self, name: str) -> torch.dtype:
        return self.entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name]["shape"]

    def nbytes(self, name: str) -> int:
        e = self.entries[name]
        return e["end"] - e["start"]

    def _pread_into(self, view: memoryview, offset: int, name: str) -> None:
        """Fill ``view`` from ``offset`` with positional reads: no shared file position, so
        tensors can be read from several threads at once (checkpoint mode reads the next
        tensor while quantizing this one)."""
        fd, done = self._f.fileno(), 0
        while done < len(view):
            if hasattr(os, "preadv"):
                got = os.preadv(fd, [view[done:]], offset + done)
            else:  # pragma: no cover - platforms without preadv (Windows)
                with self._lock:
                    self._f.seek(offset + done)
                    got = self._f.readinto(view[done:]) or 0
            if got <= 0:
                raise FormatError(
                    f"{os.path.basename(self.path)}: tensor {name!r} is truncated",
                    "the file changed while reading; write it again",
                )
            done += got

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into fresh memory (safe to call from several threads)."""
        e = self.entries[name]
        t = torch.empty(e["shape"], dtype=e["dtype"])
        if t.numel():
            view = bytes_view(t)
            self._pread_into(view, self.data_start + e["start"], name)
            if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
                t = t.view(torch.uint8).reshape(-1, t.element_size()).flip(1).view(t.dtype)
        return t

    def copy_to(self, name: str, out: BinaryIO) -> None:
        """Copy one tensor's bytes to ``out`` in chunks (constant memory; positional reads,
        safe next to :meth:`get` in another thread)."""
        e = self.entries[name]
        pos, end = self.data_start + e["start"], self.data_start + e["end"]
        fd = self._f.fileno()
        pos = copy_in_kernel(fd, pos, end, out)
        while pos < end:
            if hasattr(os, "pread"):
                chunk = os.pread(fd, min(end - pos, _CHUNK), pos)
            else:  # pragma: no cover - platforms without pread (Windows)
                with self._lock:
                    self._f.seek(pos)
                    chunk = self._f.read(min(end - pos, _CHUNK))
            if not chunk:
                raise FormatError(
                    f"{os.path.basename(self.path)}: tensor {name!r} is truncated",
                    "the file changed while reading; write it again",
                )
            out.write(chunk)
            pos += len(chunk)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
