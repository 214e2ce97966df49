"""``cpu-vnni`` backend: int4-group weights with int8 activations (W4A8) on AVX512-VNNI CPUs.

It runs ``int4-group`` layers quantized with ``activations="dynamic"``: each token of the input
is quantized to int8 on every call (the same per-token codes as the reference backend), the
4-bit weight codes are multiplied with them by ``vpdpbusd`` in integers, group by group, and the
result is scaled in float32. At one token it streams the 4.5-bit weights at close to the memory
bandwidth, where torch's bfloat16 int4 kernel is compute-bound (docs/performance.md). bfloat16
inputs with many rows (:data:`BF16_GEMM_ROWS`) instead hold the same int8 codes in bfloat16 and
multiply them with weight rows dequantized into bfloat16 (the C kernels of
:data:`.dequant.DEQUANT`) in one bfloat16 GEMM per block: the VNNI kernel reads the weight
once per call but is slower per row than a bfloat16 GEMM on CPUs with AVX512-BF16.

The kernel (``vnni_kernels.c``, next to this file) is C compiled on first use (:mod:`.native`)
with the system's C compiler (``$MONOQUANT_CC``, ``$CC``, ``cc``, ``gcc`` or ``clang``) and
cached in ``$MONOQUANT_CACHE_DIR`` (default ``~/.cache/monoquant``), keyed by the source, flags and
compiler; it is called through ``ctypes``. No compiler, another CPU, or a failed build makes the
backend unavailable with the reason (``monoquant env``), and those layers run on the next backend
that supports them (``reference``). The weight layout is derived when a layer is prepared and
never stored.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from monoquant_core import Backend, Capabilities, Kernel, hookimpl
from monoquant_core.activations import quantize_per_token
from monoquant_core.qtensor import QTensor

from . import bf16_gemm, cpu_kernels, cpu_schedule, f32_gemm
from .cpu_kernels import MIN_GEMM_ROWS, gemm_into, rows_per_block, scratch
from .dequant import dequant_library as _dequant_library
from .native import NativeLibrary, find_compiler

__all__ = ["ISA_FLAGS", "LIBRARY", "CpuVnniBackend", "find_compiler", "library", "pack_chunks"]

ABI_VERSION = 1
CPU_FLAGS = ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni")
ISA_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512vnni")
GROUPS = (32, 64, 128, 256)
#: first M at which bfloat16 inputs take the GEMM path (per-token int8 codes held in bfloat16,
#: weight rows dequantized to bfloat16 by the C kernel, one bfloat16 GEMM per block), by K
#: (``(largest K, M)``, first match): measured with ``python bench/kernels.py --crossover``
#: (Zen 5, one thread: 384x384 and 1536->384 from M = 48, 384->1536 from 128-256, 4096-wide
#: layers from 256-384). float32 inputs stay on the VNNI kernel at every M: it is 1.4-1.8x a
#: float32 nn.Linear at thousands of rows.
BF16_GEMM_ROWS = ((512, 48), (2048, 160), (None, 256))
#: at most this M for group size 32, whose VNNI kernel pays more per group: on 4096-wide
#: layers it was 1.07-1.09x a bf16 nn.Linear at M = 32 but 0.78x at 128, where the GEMM path
#: is 0.92x (``bench/kernels.py``, bfloat16-model tables)
G32_GEMM_ROWS = 96
#: the same for weights torch-cpu's own bf16 GEMM takes (:func:`_own`), which is faster per
#: row than the conversion path: ``python bench/kernels.py --vnni-crossover`` (Zen 5, one
#: thread, VNNI kernel vs own GEMM on one weight): g128 faster from M = 8-16 (K = 384), 16-32
#: (384 -> 1536), 48 (2048x2048), 64 (4096x4096); g32 from 8, 16, 32, 32
OWN_GEMM_ROWS = ((512, 16), (1536, 32), (2048, 48), (None, 64))
G32_OWN_ROWS = 32
#: first M at which any input dtype goes to torch-cpu's float32 GEMM on the reference's
#: fake-quantized inputs (codes x row scale), where that GEMM runs (CPUs whose bfloat16 dot
#: products are slow: :func:`.cpu_schedule.own_gemm`), by K (``(largest K, M)``, first match):
#: ``python bench/kernels.py --vnni-f32`` (Intel Xeon without AMX, one thread, g128 and g32,
#: 2026-12-02): with K = 384 the GEMM was ahead from M = 32-128 (1.09-1.58x the VNNI kernel at
#: 128-1024 rows but 384x384 g128 at 1024); from K = 1536 on the VNNI kernel stayed ahead up to
#: 1024 rows (the GEMM 0.42-0.95x; 2048- and 4096-wide g32 1.06-1.08x at 1024 only), so it
#: keeps them
F32_GEMM_ROWS = ((512, 64), (None, None))


def bf16_gemm_rows(k: int, group_size: int = 128, own: bool = False) -> int:
    """The first M of the bfloat16 GEMM path for a weight with ``k`` inputs (``own``: the
    weight runs on torch-cpu's own bf16 GEMM)."""
    table, cap = (OWN_GEMM_ROWS, G32_OWN_ROWS) if own else (BF16_GEMM_ROWS, G32_GEMM_ROWS)
    m = next(m for limit, m in table if limit is None or k <= limit)
    return min(m, cap) if group_size <= 32 else m


_P, _I = ctypes.c_void_p, ctypes.c_int64
LIBRARY = NativeLibrary(
    "vnni",
    "vnni_kernels.c",
    CPU_FLAGS,
    ISA_FLAGS,
    ABI_VERSION,
    {"mq_w4a8": ([_P, _I, _I, _P, _P, _P, _P, _P, _P, _I, _I, _P, ctypes.c_int], None)},
)


def cpu_reason() -> str | None:
    """None when this CPU has the instructions the kernel uses, else what is missing."""
    return LIBRARY.cpu_reason()


def _build() -> tuple[ctypes.CDLL | None, str | None]:
    return LIBRARY.build()


def library() -> tuple[ctypes.CDLL | None, str | None]:
    """The compiled kernel library (built once per process and cached on disk), or the reason."""
    return LIBRARY.library()


@dataclass
class Prepared:
    """Kernel-ready int4 weights of one layer (derived at prepare time, never saved)."""

    n: int
    k: int
    group_size: int
    packed: torch.Tensor  # uint8 [N, K / 2], chunks of 128 inputs, planar nibbles
    scale: torch.Tensor  # float32 [N, K / group_size]
    offset: torch.Tensor  # float32 [N, K / group_size]: w = code * scale + offset
    #: torch-cpu's AVX512-BF16 GEMM on the stored codes (bfloat16 inputs, many rows), where
    #: it runs and the shape fits; None: the conversion path (:func:`_bf16_gemm`)
    own: cpu_kernels.Prepared | None = None
    #: torch-cpu's float32 GEMM on the stored codes (any inputs, from :data:`F32_GEMM_ROWS`),
    #: where it is the many-row GEMM and the shape fits
    own32: cpu_kernels.Prepared | None = None


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
            "codes), exact int32 dot products per group, float32 scaling and accumulation; where "
            "torch-cpu's float32 GEMM runs, layers with K <= 512 from 64 rows: the codes times "
            "their scale x the weight dequantized in float32, float32 sums"
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
        vnni = "AVX512-VNNI int4 x int8 kernel (C), per-token int8 inputs"
        if _own32(*info.shape, info.spec.group_size):
            first = f32_gemm_rows(info.shape[1])
            f32 = "per-token int8 codes x scale -> int4 rows -> fp32 blocks + fp32 FMA GEMM (C)"
            return (Kernel(vnni, 1, first - 1), Kernel(f32, first))
        if info.dtype == torch.bfloat16 and dequant_library() is not None:
            gemm = "int8 codes x int4 rows -> bf16 blocks (C) + bf16 GEMM"
            own_fits = _own(*info.shape, info.spec.group_size)
            first = bf16_gemm_rows(info.shape[1], info.spec.group_size, own_fits)
            if own_fits:  # then the blocks above its rows
                own = "int8 codes x int4 rows -> bf16 panels (C) + AVX512-BF16 GEMM (C)"
                last = max(first, bf16_gemm.last_rows(info.shape[1]))
                return (
                    Kernel(vnni, 1, first - 1),
                    Kernel(own, first, last),
                    Kernel(gemm, last + 1),
                )
            return (Kernel(vnni, 1, first - 1), Kernel(gemm, first))
        return (Kernel(vnni),)

    def expected_speedup(self, info, rows):
        # bench/kernels.py (M = 1 to 128) and bench/e2e.py (thousands of rows), Zen 5, 1 thread
        if _own32(*info.shape, info.spec.group_size) and rows >= f32_gemm_rows(info.shape[1]):
            return 0.9  # torch-cpu's float32 GEMM (int4 0.93x fp32 MiniLM 32 x 128, e2e.py)
        if info.dtype == torch.bfloat16:
            own = _own(*info.shape, info.spec.group_size)
            first = bf16_gemm_rows(info.shape[1], info.spec.group_size, own)
            if rows >= first and dequant_library() is not None:
                if own and rows <= bf16_gemm.last_rows(info.shape[1]):
                    return 0.9  # torch-cpu's own bf16 GEMM (0.94-0.98x MiniLM, bench/e2e.py)
                return 0.8 if rows <= 128 else 0.95  # the bf16 GEMM path
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
        own = None
        if _own(n, k, gs):  # the stored codes (no copy) and the transposed parameters
            t = {"gs": gs, **bf16_gemm.int4_tensors(qt)}
            own = cpu_kernels.Prepared(n, k, ((1, "int4-gemm-bf16"),), t)
        own32 = None
        if _own32(n, k, gs):  # the stored codes and the transposed parameters
            t = {"gs": gs, **f32_gemm.int4_tensors(qt)}
            own32 = cpu_kernels.Prepared(n, k, ((1, "int4-gemm-f32"),), t)
        packed = pack_chunks(codes)
        return Prepared(n, k, gs, packed, scale.contiguous(), offset.contiguous(), own, own32)

    def linear(self, x: torch.Tensor, prepared: Prepared, bias: torch.Tensor | None):
        p = prepared
        lib, reason = library()
        if lib is None:  # unreachable after selection; a clear error rather than a crash
            raise RuntimeError(f"cpu-vnni: {reason}")
        lead = x.shape[:-1]
        if p.own32 is not None and x.numel() >= f32_gemm_rows(p.k) * p.k:
            return _f32_gemm(x.reshape(-1, p.k), p, bias).reshape(*lead, p.n)
        first = bf16_gemm_rows(p.k, p.group_size, p.own is not None)
        if x.dtype == torch.bfloat16 and x.numel() >= first * p.k:
            gemm = dequant_library()
            if gemm is not None:
                xb = x.reshape(-1, p.k).contiguous()
                if p.own is not None and xb.shape[0] <= bf16_gemm.last_rows(p.k):
                    return _own_gemm(xb, p, bias).reshape(*lead, p.n)
                y = _bf16_gemm(gemm, xb, p)
                if bias is not None:
                    y = y.add_(bias) if bias.dtype == y.dtype else y + bias.to(y.dtype)
                return y.reshape(*lead, p.n)
        y = _vnni(lib, x.reshape(-1, p.k), p)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        if bias is not None:
            y = y.add_(bias) if bias.dtype == y.dtype else y + bias.to(y.dtype)
        return y.reshape(*lead, p.n)


def _vnni(lib, x: torch.Tensor, p: Prepared) -> torch.Tensor:
    """W4A8 on the VNNI kernel: ``x`` [M, K] -> float32 [M, N] (no bias)."""
    x2 = x.to(torch.float32).contiguous()
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
    return y


def _own(n: int, k: int, gs: int | None) -> bool:
    """torch-cpu's AVX512-BF16 GEMM runs here, is the many-row GEMM torch-cpu picks (bfloat16
    dot products faster than float32 FMAs) and takes this shape."""
    return bf16_gemm.fits_int4(n, k, gs) and cpu_schedule.own_gemm() == "bf16"


def dequant_library():
    """The C conversion library of the bfloat16 GEMM paths, where those paths run: the CPU
    computes in bfloat16 faster than in float32 (:func:`.cpu_schedule.compute`). Elsewhere
    (an Intel Xeon with AVX512-BF16 and no AMX) bfloat16 inputs stay on the VNNI kernel."""
    if cpu_schedule.compute() != torch.bfloat16:
        return None
    return _dequant_library()


def _own32(n: int, k: int, gs: int | None) -> bool:
    """torch-cpu's float32 GEMM is the many-row GEMM here, takes this shape, and W4A8 hands
    over to it at this K (:data:`F32_GEMM_ROWS`)."""
    if f32_gemm_rows(k) is None or not f32_gemm.fits_int4(n, k, gs):
        return False
    return cpu_schedule.own_gemm() == "f32"


def f32_gemm_rows(k: int) -> int | None:
    """The first M of the float32 GEMM path for a weight with ``k`` inputs (None: never)."""
    return next(m for limit, m in F32_GEMM_ROWS if limit is None or k <= limit)


def _f32_gemm(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """W4A8 for many rows on torch-cpu's float32 GEMM: the inputs the reference multiplies (each
    row's per-token int8 codes times its scale, exact in float32) times the int4-group weight
    dequantized in float32 (:func:`.f32_gemm.int4_gemm_f32`): the reference's formula, float32
    sums in another order; the output in the input's dtype."""
    codes, scale = quantize_per_token(x)
    y = f32_gemm.int4_gemm_f32(codes.to(torch.float32).mul_(scale), p.own32, bias)
    return y if y.dtype == x.dtype else y.to(x.dtype)


def _own_gemm(x: torch.Tensor, p: Prepared, bias: torch.Tensor | None) -> torch.Tensor:
    """W4A8 for many bfloat16 rows on torch-cpu's own GEMM: each row quantized to its per-token
    int8 codes (held in bfloat16, exact) as the GEMM packs it, times the weight panels
    dequantized into bfloat16, float32 sums times the row scale plus the bias, rounded once
    (:func:`.bf16_gemm.int4_dynamic_gemm_bf16`)."""
    return bf16_gemm.int4_dynamic_gemm_bf16(x, p.own, bias)


def _bf16_gemm(lib, x: torch.Tensor, p: Prepared) -> torch.Tensor:
    """W4A8 for many bfloat16 rows: the same per-token int8 codes as the VNNI kernel, held in
    bfloat16 (exact), times the weight rows dequantized into bfloat16 a block at a time, with
    float32 accumulation, then each row times its scale. Only the bfloat16 rounding of the
    dequantized weights and of the output differ from the reference."""
    m, k, n = x.shape[0], p.k, p.n
    q = scratch("w4a8.codes", (m, k), torch.bfloat16)
    sx = torch.empty(m, 1, dtype=torch.float32)
    lib.mq_quantize_rows_bf16(x.data_ptr(), m, k, q.data_ptr(), sx.data_ptr())
    out = torch.empty(m, n, dtype=torch.bfloat16)
    rows = rows_per_block(k, torch.bfloat16, MIN_GEMM_ROWS, n)
    blk = scratch("w4a8.rows", (min(rows, n), k), torch.bfloat16)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        b = blk[: j - i]
        lib.mq_int4c_rows_bf16(
            p.packed[i].data_ptr(), j - i, k, p.group_size, p.scale[i].data_ptr(),
            p.offset[i].data_ptr(), b.data_ptr(),
        )  # fmt: skip
        gemm_into(out, i, j, q, b)
    lib.mq_scale_rows_bf16(out.data_ptr(), m, n, sx.data_ptr())
    return out


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "cpu-vnni"


@hookimpl
def monoquant_register_backends(register):
    register(CpuVnniBackend())
