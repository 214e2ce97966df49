"""C kernels compiled on first use: the build, cache and load machinery the CPU backends share.

A :class:`NativeLibrary` is one C source file next to this module, built with the system's C
compiler (``$MONOQUANT_CC``, ``$CC``, ``cc``, ``gcc`` or ``clang``) and the ISA flags it
needs, cached in ``$MONOQUANT_CACHE_DIR`` (default ``~/.cache/monoquant``, else a per-user
temporary folder) under a name keyed by the source, flags and compiler, and loaded through
``ctypes``. The build is atomic (a temporary file renamed into place), so a crash or a
concurrent build never leaves a half-written library. Anything that stops it (another CPU, no
compiler, a failed build, an unwritable cache) is a one-line reason, never an exception: the
callers fall back to another kernel and ``monoquant env`` shows the reason.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

__all__ = [
    "NativeLibrary",
    "cache_dir",
    "cpu_flags",
    "cpu_vendor",
    "find_compiler",
    "prefetch_flag",
]

HERE = Path(__file__).parent


def _cpuinfo(field: str) -> str | None:
    """The first ``field`` line's value in ``/proc/cpuinfo`` ("" when absent), None when the
    file cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field):
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags() -> set[str] | str:
    """The CPU's feature flags (``/proc/cpuinfo``), or why they cannot be read."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU (this is {platform.machine()})"
    flags = _cpuinfo("flags")
    if flags is None:
        return "cannot read /proc/cpuinfo to check the CPU's instructions (Linux only)"
    return set(flags.split())


def cpu_vendor() -> str:
    """The CPU's vendor id (``GenuineIntel``, ``AuthenticAMD``; ``""`` where unknown)."""
    return _cpuinfo("vendor_id") or ""


def prefetch_flag(amd: int, intel: int) -> str:
    """``-DPF_AHEAD=N`` for the GEMV kernels: how far ahead of its reads a GEMV prefetches the
    weight, by vendor, as tuned on each: 32 KiB (int8) / 16 KiB (int4) on Zen 5; on an Intel
    Xeon (AVX512-BF16, no AMX) those reached 61-75% / 46-68% of a plain read of the same bytes
    at M = 1 (``bench/kernels.py --threads 1 --quick``, "% of read"), 8 KiB / 4 KiB more
    (docs/performance.md has the run). Other vendors get Zen's."""
    return f"-DPF_AHEAD={intel if cpu_vendor() == 'GenuineIntel' else amd}"


def find_compiler() -> str | None:
    for cand in (os.environ.get("MONOQUANT_CC"), os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def cache_dir() -> Path:
    env = os.environ.get("MONOQUANT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "monoquant"


class NativeLibrary:
    """One C source built on first use.

    ``signatures``: ``{function: (argtypes, restype)}`` set on the loaded library; the source
    exports ``int mq_abi_version(void)`` returning ``abi``, checked on load so a stale cached
    build is never called with a new signature. ``headers``: the files next to the source that
    it includes, hashed with it into the cache key (a changed header rebuilds).
    """

    def __init__(
        self,
        name: str,
        source: str,
        cpu: tuple[str, ...],
        isa: tuple[str, ...],
        abi: int,
        signatures: dict[str, tuple[list, object]],
        headers: tuple[str, ...] = (),
    ) -> None:
        self.name, self.source = name, HERE / source
        self.headers = tuple(HERE / h for h in headers)
        self.cpu, self.isa, self.abi = cpu, isa, abi
        self.signatures = signatures
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}

    def cpu_reason(self) -> str | None:
        """None when this CPU has the instructions the kernels use, else what is missing."""
        flags = cpu_flags()
        if isinstance(flags, str):
            return flags
        missing = [f for f in self.cpu if f not in flags]
        return f"CPU lacks {', '.join(missing)}" if missing else None

    def _compile(self, cc: str, out: Path, openmp: bool) -> str | None:
        """Build the shared library at ``out`` (atomically); None on success, else the error."""
        flags = ["-O3", *self.isa, "-fPIC", "-shared", *(["-fopenmp"] if openmp else [])]
        tmp = None
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
            os.close(fd)
            proc = subprocess.run(
                [cc, *flags, "-o", tmp, str(self.source), "-lm"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if proc.returncode != 0:
                lines = (proc.stderr or proc.stdout).strip().splitlines()
                return lines[0] if lines else f"{cc} exited with {proc.returncode}"
            os.replace(tmp, out)
            return None
        except (OSError, subprocess.SubprocessError) as e:
            return str(e)
        finally:
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def build(self) -> tuple[ctypes.CDLL | None, str | None]:
        """Build (or load the cached build of) the library: ``(library, None)`` or
        ``(None, reason)``. Not memoised: :meth:`library` is."""
        reason = self.cpu_reason()
        if reason:
            return None, reason
        cc = find_compiler()
        if cc is None:
            return None, "no C compiler found (install gcc or clang, or set MONOQUANT_CC)"
        try:
            version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
            cc_id = version.stdout.splitlines()[0] if version.stdout else cc
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"{cc} --version failed: {e}"
        try:
            source = b"".join(p.read_bytes() for p in (self.source, *self.headers))
        except OSError as e:
            missing = Path(e.filename).name if e.filename else self.source.name
            return None, f"the kernel source {missing} is missing from the installed package"
        key = hashlib.sha256(source + f"{cc}|{cc_id}|{self.isa}|{sys.platform}".encode())
        errors = []
        for openmp in (True, False):
            name = f"{self.name}-{key.hexdigest()[:16]}{'-omp' if openmp else ''}.so"
            for root in (cache_dir(), Path(tempfile.gettempdir()) / f"monoquant-{os.getuid()}"):
                path = root / name
                if not path.exists():
                    err = self._compile(cc, path, openmp)
                    if err:
                        errors.append(err)
                        continue
                try:
                    lib = ctypes.CDLL(str(path))
                except OSError as e:
                    errors.append(str(e))
                    continue
                if lib.mq_abi_version() != self.abi:
                    errors.append(f"{path} has an old kernel ABI; delete it")
                    continue
                for fn, (argtypes, restype) in self.signatures.items():
                    getattr(lib, fn).argtypes = argtypes
                    getattr(lib, fn).restype = restype
                return lib, None
        return None, f"building the kernel with {cc} failed: {errors[0] if errors else '?'}"

    def library(self) -> tuple[ctypes.CDLL | None, str | None]:
        """The library (built once per process and cached on disk), or the reason."""
        with self._lock:
            if "lib" not in self._state:
                self._state["lib"], self._state["reason"] = self.build()
        return self._state["lib"], self._state["reason"]  # type: ignore[return-value]
