"""The journal of a checkpoint run: finished tensors, kept next to the output until it is
committed, so an interrupted run can continue (``--resume``) and the ranks of a distributed
run can hand their results to the one that writes the output.

Layout of ``OUT.monoquant-partial/`` (next to the output ``OUT``):

* ``lock``: locked (``flock``) by the run that writes the output, so a second run to the same
  output is refused at once (the OS drops the lock of a killed run);
* ``manifest.json``: the owner (pid, host) and a random ``nonce`` that every rank must read
  back (a folder that is not shared between the ranks is found before any work);
* ``parts/t<index>.safetensors``: one finished tensor: the QTensor's pieces and its fields
  (plain safetensors, no pickle), written to a temporary name and renamed;
* ``journal-<rank>.jsonl``: one JSON line per finished tensor, appended by the rank that did
  it after its part was renamed into place: the tensor's name, a checksum (CRC-32 and size) of
  its input bytes and of its part file, its report line and facts, or the reason it was kept
  in float.

A line is trusted only when its part file still has the recorded checksum and the input
tensor still has the recorded checksum; anything else (a line cut by a kill, a part lost in a
power cut, an input file edited in between) is recomputed and counted. CRC-32 detects
accidents, not tampering: the folder is the user's own scratch space.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import socket
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, the rename still refuses
    fcntl = None  # type: ignore[assignment]
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .atomic import host_tag
from .errors import FormatError, UsageError
from .parts import decode_part, encode_part
from .qtensor import QTensor
from .report import LayerReport

__all__ = ["Journal", "Record", "as_layer_report", "checksum", "work_folder"]

FORMAT = "monoquant-journal/1"
_LOCK = "lock"


def work_folder(dst: str) -> str:
    """The journal folder of output ``dst``."""
    return os.path.abspath(os.fspath(dst)).rstrip(os.sep) + ".monoquant-partial"


def checksum(t: torch.Tensor) -> str:
    """``crc32:<hex>:<nbytes>`` of a CPU tensor's bytes (no copy when contiguous)."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.cpu().contiguous()
    n = t.numel() * t.element_size()
    if n == 0:
        return "crc32:00000000:0"
    buf = (ctypes.c_ubyte * n).from_address(t.data_ptr())
    return f"crc32:{zlib.crc32(memoryview(buf)):08x}:{n}"


def _file_crc(data: bytes) -> str:
    return f"crc32:{zlib.crc32(data):08x}:{len(data)}"


@dataclass
class Record:
    """One finished tensor: quantized (``part`` set) or kept in float (``reason`` set)."""

    name: str
    input: str
    settings: dict[str, Any] = field(default_factory=dict)
    part: str = ""
    part_crc: str = ""
    layer: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    reason: str = ""
    nonfinite: bool = False

    def layer_report(self) -> LayerReport:
        return as_layer_report(self.layer)


def as_layer_report(d: dict[str, Any]) -> LayerReport:
    """A report line back from its JSON form (as a journal line holds it)."""
    d = dict(d)
    d["shape"] = tuple(d["shape"])
    return LayerReport(**d)


class Journal:
    """The journal folder of one output, as seen by one rank (see the module docstring)."""

    def __init__(self, folder: str, rank: int = 0):
        self.folder, self.rank = folder, rank
        self.parts = os.path.join(folder, "parts")
        self._lock_fd: int | None = None
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future[None]] = []
        self._room = threading.Semaphore(2)
        self._log_lock = threading.Lock()
        self._log = os.path.join(folder, f"journal-{rank}.jsonl")

    # ------------------------------------------------------------------ set-up (rank 0)

    @classmethod
    def start(cls, dst: str, resume: bool, world: int) -> tuple[Journal, str, list[str]]:
        """Create (or, with ``resume``, reopen) the journal of ``dst`` and lock it for this
        run (another run writing the same output is refused until :meth:`close`). Returns
        the journal, its nonce and one-line notes for the user (what was removed or resumed).
        """
        folder = work_folder(dst)
        existed = os.path.isdir(folder)
        os.makedirs(folder, exist_ok=True)
        j = cls(folder, 0)
        j._lock(dst)
        try:
            notes = j._reset(dst, resume, existed)
            nonce = secrets.token_hex(8)
            os.makedirs(j.parts, exist_ok=True)
            manifest = {
                "format": FORMAT,
                "nonce": nonce,
                "owner": {"pid": os.getpid(), "host": host_tag(), "hostname": socket.gethostname()},
                "world": world,
            }
            tmp = os.path.join(folder, f".manifest.{os.getpid()}.tmp")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(manifest, f, indent=1)
            os.replace(tmp, os.path.join(folder, "manifest.json"))
        except BaseException:
            j.close()
            raise
        return j, nonce, notes

    def _reset(self, dst: str, resume: bool, existed: bool) -> list[str]:
        """Keep an earlier journal for ``resume``, else empty the folder; say what happened."""
        old = _read_manifest(self.folder)
        if resume and old is not None:
            return []
        notes = []
        if resume:
            notes.append(
                f"--resume: {self.folder} holds no readable journal: starting over"
                if existed
                else f"--resume: no unfinished run of {dst}: starting from the beginning"
            )
        elif old is not None:
            notes.append(
                f"removed the unfinished run's work in {self.folder} (pass --resume to "
                "continue such a run instead)"
            )
        for name in os.listdir(self.folder):
            if name != _LOCK:
                path = os.path.join(self.folder, name)
                (shutil.rmtree if os.path.isdir(path) else os.remove)(path)
        return notes

    def _lock(self, dst: str) -> None:
        """An exclusive ``flock`` on ``lock`` for the life of this run (released by the OS when
        the process dies, so a killed run never blocks a resume)."""
        self._lock_fd = os.open(os.path.join(self.folder, _LOCK), os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:  # pragma: no cover - not POSIX
            return
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            owner = (_read_manifest(self.folder) or {}).get("owner") or {}
            who = f" (pid {owner['pid']} on {owner.get('hostname', '?')})" if owner else ""
            raise UsageError(
                f"another run{who} is writing {dst}",
                "wait for it to finish, or write to another output path",
            ) from None

    def close(self) -> None:
        """Wait for the parts being written, release this run's lock (the journal stays for
        ``--resume``)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer, self._pending = None, []
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    @classmethod
    def attach(cls, dst: str, rank: int, nonce: str) -> Journal:
        """The journal rank 0 started, as rank ``rank`` sees it; a one-line error when this
        rank cannot see it (the output folder is not shared between the ranks)."""
        folder = work_folder(dst)
        m = _read_manifest(folder)
        if m is None or m.get("nonce") != nonce:
            raise UsageError(
                f"rank {rank} on host {socket.gethostname()} cannot see the work folder "
                f"{folder} that rank 0 created: the output is not on a file system shared by "
                "every rank",
                "write -o to a shared file system (NFS, Lustre, ...) mounted at the same path "
                "on every node",
            )
        return cls(folder, rank)

    # ------------------------------------------------------------------ records

    def records(self) -> dict[str, list[Record]]:
        """Every rank's readable records by tensor name, oldest first."""
        out: dict[str, list[Record]] = {}
        with contextlib.suppress(FileNotFoundError):
            for fn in sorted(os.listdir(self.folder)):
                if not (fn.startswith("journal-") and fn.endswith(".jsonl")):
                    continue
                with open(os.path.join(self.folder, fn), encoding="utf-8", errors="replace") as f:
                    for line in f:
                        rec = _parse(line)
                        if rec is not None:
                            out.setdefault(rec.name, []).append(rec)
        return out

    def add_quantized(
        self,
        index: int,
        name: str,
        input_crc: str,
        settings: dict[str, Any],
        qt: QTensor,
        layer: LayerReport,
    ) -> Record:
        """Record ``qt``: its part is written (temporary name, renamed) and then its journal
        line appended, in a background thread (in order; at most two waiting), so writing
        overlaps quantizing the next tensor. :meth:`flush` waits for them."""
        chunks, tensors = encode_part(qt)
        crc = 0
        for c in chunks:
            crc = zlib.crc32(c, crc)
        part = f"t{index:07d}.safetensors"
        rec = Record(
            name, input_crc, settings, part, f"crc32:{crc:08x}:{sum(len(c) for c in chunks)}",
            asdict(layer), qt.facts(),
        )  # fmt: skip
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="monoquant-journal")
        self._room.acquire()
        self._pending.append(self._writer.submit(self._write_part, part, chunks, tensors, rec))
        self._pending = [f for f in self._pending if not f.done() or f.exception()]
        return rec

    def _write_part(
        self, part: str, chunks: list[memoryview], tensors: dict[str, torch.Tensor], rec: Record
    ) -> None:
        """Write one part and then its journal line (``tensors`` back ``chunks``' views)."""
        try:
            path = os.path.join(self.parts, part)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                for c in chunks:
                    f.write(c)
            os.replace(tmp, path)
            self._append(rec)
        finally:
            self._room.release()

    def flush(self) -> None:
        """Wait for the parts being written; re-raise the first write error."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def add_float(
        self, name: str, input_crc: str, settings: dict[str, Any], reason: str, nonfinite: bool
    ) -> Record:
        """Record that ``name`` is kept in float (``reason``: the report's skip reason)."""
        rec = Record(name, input_crc, settings, reason=reason, nonfinite=nonfinite)
        self._append(rec)
        return rec

    def _append(self, rec: Record) -> None:
        line = json.dumps(asdict(rec), separators=(",", ":")) + "\n"
        with self._log_lock, open(self._log, "a", encoding="utf-8") as f:
            f.write(line)

    def part_ok(self, rec: Record) -> bool:
        """True when ``rec``'s part file is there with the recorded checksum."""
        if not rec.part:
            return True
        try:
            with open(os.path.join(self.parts, rec.part), "rb") as f:
                return _file_crc(f.read()) == rec.part_crc
        except OSError:
            return False

    def load(self, rec: Record) -> QTensor:
        """The QTensor of ``rec``, checked against its recorded checksum."""
        path = os.path.join(self.parts, rec.part)
        try:
            with open(path, "rb") as f:
                data = bytearray(f.read())
        except OSError as e:
            raise FormatError(
                f"the finished part of {rec.name!r} ({path}) is missing: {e.strerror or e}",
                "rerun with --resume: it is recomputed",
            ) from e
        if _file_crc(data) != rec.part_crc:
            raise FormatError(
                f"the finished part of {rec.name!r} ({path}) does not match its checksum",
                "rerun with --resume: it is recomputed",
            )
        return decode_part(data)

    def remove(self) -> None:
        """Delete the journal (the output is committed) and release the lock."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.close()


def _read_manifest(folder: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(folder, "manifest.json"), encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and m.get("format") == FORMAT else None


def _parse(line: str) -> Record | None:
    """A journal line, or None when it is not a complete record (cut by a kill)."""
    try:
        d = json.loads(line)
        return Record(**d) if isinstance(d, dict) and isinstance(d.get("name"), str) else None
    except (ValueError, TypeError):
        return None
