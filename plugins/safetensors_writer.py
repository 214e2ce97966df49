"""The safetensors writer: tensors appended one at a time in any order, bounded memory.

:class:`SafetensorsWriter` appends tensors to spool files grouped by element size and assembles
header + spools on ``close``, so the output is written in one pass whatever order tensors
arrive in, and every tensor starts at a multiple of its element size.

Spool files are named like every temporary path of a Mono Quant write,
``.monoquant-tmp-<pid>-<host>-<random>.spoolN`` (:func:`monoquant_core.atomic.temp_tag`), so the
next write into the same folder removes those of a killed process
(``monoquant_core.atomic.remove_stale_temps``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import struct
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

import torch

from monoquant_core import (
    Artifact,
    ArtifactWriter,
    FormatError,
    Serializer,
    TensorSource,
    UsageError,
    write_through,
)
from monoquant_core.atomic import temp_tag

from .safetensors_io import NAMES, bytes_view, copy_in_kernel

__all__ = ["SafetensorsArtifactWriter", "SafetensorsWriter", "StreamingSerializer"]

_CHUNK = 16 * 2**20  # bytes copied per read when concatenating spools


class SafetensorsWriter:
    """Writes one safetensors file; tensors may be added in any order, one at a time.

    Bytes go to spool files (one per element size, next to ``path``) and ``close`` writes the
    header and concatenates the spools, largest elements first, so the data is aligned.
    ``abort`` (or an exception inside ``with``) removes everything it created.
    """

    def __init__(self, path: str):
        self.path = path
        self._dir = os.path.dirname(os.path.abspath(path))
        self._spools: dict[int, tuple[BinaryIO, str]] = {}
        self._entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
        self._names: set[str] = set()

    def _spool(self, size: int) -> BinaryIO:
        if size not in self._spools:
            while True:
                spath = os.path.join(self._dir, f".{temp_tag()}-{secrets.token_hex(4)}.spool{size}")
                try:
                    fd = os.open(spath, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:  # pragma: no cover - 32 random bits
                    continue
                break
            self._spools[size] = (os.fdopen(fd, "wb"), spath)
        return self._spools[size][0]

    def _record(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], nbytes: int
    ) -> BinaryIO:
        if name in self._names:
            raise UsageError(
                f"cannot save: tensor name {name!r} is used twice", "rename one of the tensors"
            )
        if dtype not in NAMES:
            raise UsageError(
                f"cannot save tensor {name!r}: dtype {dtype} has no safetensors equivalent",
                "convert it to a standard dtype first",
            )
        self._names.add(name)
        size = dtype.itemsize
        self._entries.append((name, NAMES[dtype], tuple(shape), nbytes, size))
        return self._spool(size)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor (copied out immediately; the caller may free it)."""
        t = tensor.detach().to("cpu").contiguous()
        out = self._record(name, t.dtype, tuple(t.shape), t.numel() * t.element_size())
        if t.numel():
            if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover
                t = t.view(torch.uint8).reshape(-1, t.element_size()).flip(1).contiguous()
            out.write(bytes_view(t))

    def add_stream(
        self,
        name: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        nbytes: int,
        copy_to: Callable[[BinaryIO], None],
    ) -> None:
        """Append a tensor whose raw bytes ``copy_to(file)`` writes (e.g. straight from a
        :class:`SafetensorsReader`), without loading it."""
        out = self._record(name, dtype, tuple(shape), nbytes)
        before = out.tell()
        copy_to(out)
        if out.tell() - before != nbytes:
            raise FormatError(
                f"tensor {name!r}: expected {nbytes} bytes, got {out.tell() - before}",
                "the source changed while copying; try again",
            )

    def close(self, metadata: dict[str, str]) -> int:
        """Write header + data to ``path``; returns the number of tensor bytes."""
        header: dict[str, Any] = {"__metadata__": metadata}
        offset = 0
        order = sorted(self._spools, reverse=True)
        for size in order:
            for name, dt, shape, nbytes, s in self._entries:
                if s == size:
                    header[name] = {
                        "dtype": dt,
                        "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes],
                    }
                    offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * ((-len(raw)) % 8)
        try:
            with open(self.path, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                for size in order:
                    spool, spath = self._spools[size]
                    spool.close()
                    with open(spath, "rb") as src:
                        end = os.fstat(src.fileno()).st_size
                        src.seek(copy_in_kernel(src.fileno(), 0, end, f))
                        while chunk := src.read(_CHUNK):
                            f.write(chunk)
        finally:
            self.abort()
        return offset

    def abort(self) -> None:
        """Remove the spool files (the target file itself is the caller's temp path)."""
        for spool, spath in self._spools.values():
            spool.close()
            with contextlib.suppress(OSError):
                os.remove(spath)
        self._spools.clear()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is not None:
            self.abort()


class StreamingSerializer(Serializer):
    """A serializer whose whole-file ``write`` / ``read`` go through its streaming
    ``open_writer`` / ``open_reader`` (one code path for both modes)."""

    def write(self, artifact: Artifact, path: str) -> None:
        write_through(self.open_writer(path), artifact)

    def read(self, path: str) -> Artifact:
        with self.open_reader(path) as r:
            art = Artifact(
                producers=r.producers,
                config=getattr(r, "config", {}) or {},
                format_version=r.format_version,
            )
            for name in r.tensor_names():
                art.tensors[name] = r.source(name).load()
            for name in r.qtensor_names():
                art.qtensors[name] = r.qtensor(name)
        return art


class SafetensorsArtifactWriter(ArtifactWriter):
    """Streams an artifact into one safetensors file: plain tensors as they are (copied
    straight from a source file when possible); subclasses store QTensors (``add_qtensor``,
    recording their names in ``_stored``) and write the header metadata (``close``)."""

    def __init__(self, serializer: Serializer, path: str):
        super().__init__(serializer, path)
        self._w = SafetensorsWriter(path)
        self._stored: dict[str, list[str]] = {}

    def add_tensor(self, name: str, tensor: torch.Tensor | TensorSource) -> None:
        if isinstance(tensor, TensorSource):
            if tensor.copy_to is not None:
                self._w.add_stream(name, tensor.dtype, tensor.shape, tensor.nbytes, tensor.copy_to)
            else:
                self._w.add(name, tensor.load())
        else:
            self._w.add(name, tensor)
        self._stored[name] = [name]

    def stored_names(self, name: str) -> list[str]:
        return list(self._stored.get(name, [name]))

    def abort(self) -> None:
        self._w.abort()
