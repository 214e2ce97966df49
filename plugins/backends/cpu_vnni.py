"""``cpu-vnni`` backend: int4-group weights with int8 activations (W4A8) on AVX512-VNNI CPUs.

It runs ``int4-group`` layers quantized with ``activations="dynamic"``: each token of the input
is quantized to int8 on every call (the same per-token codes as the reference backend), the
4-bit weight codes are multiplied with them by ``vpdpbusd`` in integers, group by group, and the
result is scaled in float32. At one token it streams the 4.5-bit weights at close to the memory
bandwidth, where torch's bfloat16 int4 kernel is compute-bound (docs/performance.md).

The kernel (``vnni_kernels.c``, next to this file) is C compiled on first use with the system's
C compiler (``$MONOQUANT_CC``, ``$CC``, ``cc``, ``gcc`` or ``clang``) and cached in
``$MONOQUANT_CACHE_DIR`` (default ``~/.cache/monoquant``), keyed by the source, flags and
compiler; it is called through ``ctypes``. No compiler, another CPU, or a failed build makes the
backend unavailable with the reason (``monoquant env``), and those layers run on the next backend
that supports them (``reference``). The weight layout is derived when a layer is prepared and
never stored.
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
from dataclasses import dataclass
from pathlib import Path

import torch

from monoquant_core import Backend, Capabilities, Kernel, hookimpl
from monoquant_core.qtensor import QTensor

SOURCE = Path(__file__).with_name("vnni_kernels.c")
ABI_VERSION = 1
CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")
ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni")
GROUPS = (32, 64, 128, 256)

_P, _I = ctypes.c_void_p, ctypes.c_int64
_lock = threading.Lock()
_state: dict[str, object] = {}


def cpu_reason() -> str | None:
    """None when this CPU has the instructions the kernel uses, else what is missing."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"needs an x86-64 CPU with AVX512-VNNI (this is {platform.machine()})"
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cannot read /proc/cpuinfo to check for AVX512-VNNI (Linux only)"
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    missing = [f for f in CPU_FLAGS if f not in flags]
    return f"CPU lacks {', '.join(missing)}" if missing else None


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


def _compile(cc: str, out: Path, openmp: bool) -> str | None:
    """Build the shared library at ``out`` (atomically); None on success, else the error."""
    flags = ["-O3", *ISA_FLAGS, "-fPIC", "-shared", *(["-fopenmp"] if openmp else [])]
    tmp = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        proc = subprocess.run(
            [cc, *flags, "-o", tmp, str(SOURCE), "-lm"],
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


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    reason = cpu_reason()
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
        source = SOURCE.read_bytes()
    except OSError:
        return None, f"the kernel source {SOURCE.name} is missing from the installed package"
    key = hashlib.sha256(source + f"{cc}|{cc_id}|{ISA_FLAGS}|{sys.platform}".encode()).hexdigest()
    key = key[:16]
    errors = []
    for openmp in (True, False):
        name = f"vnni-{key}{'-omp' if openmp else ''}.so"
        for root in (cache_dir(), Path(tempfile.gettempdir()) / f"monoquant-{os.getuid()}"):
            path = root / name
            if not path.exists():
                err = _compile(cc, path, openmp)
                if err:
                    errors.append(err)
                    continue
            try:
                lib = ctypes.CDLL(str(path))
            except OSError as e:
                errors.append(str(e))
                continue
            if lib.mq_abi_version() != ABI_VERSION:
                errors.append(f"{path} has an old kernel ABI; delete it")
                continue
            lib.mq_w4a8.argtypes = [_P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _P, ctypes.c_int]
            lib.mq_w4a8.restype = None
            return lib, None
    return None, f"building the kernel with {cc} failed: {errors[0] if errors else '?'}"


def library() -> tuple[ctypes.CDLL | None, str | None]:
    """The compiled kernel library (built once per process and cached on disk), or the reason."""
    with _lock:
        if "lib" not in _state:
            _state["lib"], _state["reason"] = _build()
    return _state["lib"], _state["reason"]  # type: ignore[return-value]


@dataclass
class Prepared:
    """Kernel-ready int4 weights of one layer (derived at prepare time, never saved)."""

    n: int
    k: int
    group_size: int
    packed: torch.Tensor  # uint8 [N, K / 2], chunks of 128 inputs, planar nibbles
    scale: torch.Tensor  # float32 [N, K / group_size]
    offset: torch.Tensor  # float32 [N, K / group_size]: w = code * scale + offset


def pack_chunks(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] in 0..15 -> [N, K / 2]: byte j of chunk c = u[128c + j] | u[128c + 64
    + j] << 4 (the kernel's layout; K % 128 == 0)."""
    n, k = codes.shape
    c = codes.to(torch.uint8).reshape(n, k // 128, 2, 64)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


class CpuVnniBackend(Backend):
    name = "cpu-vnni"
    device_types = ("cpu",)
    priority = 20
    capabilities = Capabilities(
        bits=(4,),
        group_sizes=GROUPS,
        dtypes=(torch.float32, torch.bfloat16, torch.float16),
        devices=("cpu",),
        schemes=("int4-group",),
        activations=("dynamic",),
        numerics=(
            "int4-group with activations='dynamic' only: int8 inputs per token (the reference's "
            "codes), exact int32 dot products per group, float32 scaling and accumulation"
        ),
    )

    def available(self):
        lib, reason = library()
        return True if lib is not None else reason

    def supports(self, info):
        if not self.capabilities.meant_for(info.scheme, info.activations):  # e.g. when forced
            return "runs int4-group with activations=dynamic (int8 inputs) only"
        if len(info.shape) != 2 or info.spec.axis not in (0, None):
            return "needs a 2-D [out, in] weight (nn.Linear layout)"
        k, gs = info.shape[1], info.spec.group_size
        if gs not in GROUPS:
            return f"group size {gs} not in {GROUPS}"
        if k % 128 or k % gs:
            return f"K % 128 != 0 or K % group_size != 0 (K={k}, group_size={gs})"
        return None

    def kernels(self, info):
        return (Kernel("AVX512-VNNI int4 x int8 kernel (C), per-token int8 inputs"),)

    def expected_speedup(self, info, rows):
        # bench/kernels.py (M = 1 to 128) and bench/e2e.py (thousands of rows), Zen 5, 1 thread
        if info.dtype == torch.bfloat16:
            return 6.0 if rows == 1 else 2.5 if rows <= 8 else 1.0 if rows <= 128 else 0.6
        return 8.0 if rows == 1 else 4.5 if rows <= 128 else 1.3

    def prepare(self, qt: QTensor, scheme) -> Prepared:
        n, k = qt.shape
        gs = qt.group_size
        codes = qt.codes().reshape(n, k).to(torch.int16)
        scale = qt.scale.reshape(n, k // gs).to(torch.float32)
        if qt.symmetric:  # signed -8..7: w = q * s = (q + 8) * s - 8 * s
            codes = codes + 8
            offset = -8.0 * scale
        else:  # w = (q - z) * s = q * s - z * s
            offset = -qt.zero_point.reshape(n, k // gs).to(torch.float32) * scale
        return Prepared(n, k, gs, pack_chunks(codes), scale.contiguous(), offset.contiguous())

    def linear(self, x: torch.Tensor, prepared: Prepared, bias: torch.Tensor | None):
        p = prepared
        lib, reason = library()
        if lib is None:  # unreachable after selection; a clear error rather than a crash
            raise RuntimeError(f"cpu-vnni: {reason}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, p.k).to(torch.float32).contiguous()
        m = x2.shape[0]
        y = torch.empty((m, p.n), dtype=torch.float32)
        if m:
            xq = torch.empty((m, p.k), dtype=torch.int8)
            sx = torch.empty(m, dtype=torch.float32)
            xsum = torch.empty((m, p.k // p.group_size), dtype=torch.float32)
            lib.mq_w4a8(
                x2.data_ptr(), m, p.k, xq.data_ptr(), sx.data_ptr(), xsum.data_ptr(),
                p.packed.data_ptr(), p.scale.data_ptr(), p.offset.data_ptr(),
                p.n, p.group_size, y.data_ptr(), torch.get_num_threads(),
            )  # fmt: skip
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None:
            y = y.add_(bias) if bias.dtype == y.dtype else y + bias.to(y.dtype)
        return y.reshape(*lead, p.n)


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "cpu-vnni"


@hookimpl
def monoquant_register_backends(register):
    register(CpuVnniBackend())
