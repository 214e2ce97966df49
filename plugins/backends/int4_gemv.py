"""The C GEMV / small-M kernel of the ``torch-cpu`` backend's int4-group weight-only layers
(``int4-gemv-c``): 4-bit codes dequantized in registers with their group's scale and zero
point (a 16-entry table per group and row, looked up with one permute), times float32 or
bfloat16 inputs in float32, the bias added in the same pass, the output in the input's dtype
(``int4_gemv_kernels.c``, AVX-512, built on first use by :mod:`.native`, threads from
``torch.get_num_threads()``).

It serves the rows below the int4 crossover (:data:`.cpu_kernels.CROSSOVER` ``"int4-gemv-c"``)
in place of ``torch._weight_int4pack_mm_for_cpu``, which casts float32 inputs to bfloat16 and
is compute-bound at one token (docs/performance.md). Its layout is derived from the QTensor
when a layer is prepared (:func:`prepare`), never stored. Without AVX-512, a C compiler or a
working build, :func:`int4_gemv_library` is None and the backend keeps torch's kernel
(``monoquant env`` and ``monoquant plan`` name the kernel that runs)."""

from __future__ import annotations

import ctypes

import torch

from monoquant_core.qtensor import QTensor

from . import cpu_kernels as ck
from .gemv import gemv_operands
from .native import NativeLibrary, prefetch_flag

__all__ = ["DESCRIPTIONS", "INT4_GEMV", "KERNELS", "int4_gemv_c", "int4_gemv_library", "prepare"]

_P, _I, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
#: the int4 GEMV kernel (``int4_gemv_kernels.c``): AVX512F/BW only, like :data:`.gemv.GEMV`
INT4_GEMV = NativeLibrary(
    "int4gemv",
    "int4_gemv_kernels.c",
    ("avx512f", "avx512bw"),
    ("-mavx512f", "-mavx512bw", prefetch_flag(amd=16384, intel=4096)),
    1,
    {"mq_int4_gemv": ([_P, _I, _I, _C, _P, _P, _P, _C, _I, _I, _P, _I, _P, _C, _C], None)},
)

#: output rows per tile of the layout (``TILE`` in the C source)
TILE = 8
#: rows rearranged at a time at prepare time (a multiple of TILE): bounded temporaries
_PREP_ROWS = 1024


def int4_gemv_library() -> ctypes.CDLL | None:
    """The C int4 GEMV kernel, or None where it cannot run (see :data:`INT4_GEMV`)."""
    return INT4_GEMV.library()[0]


def _tile_codes(qdata: torch.Tensor, symmetric: bool, kc: int) -> torch.Tensor:
    """Stored nibbles ``[rows, row / 2]`` (low first, signed ones two's complement; ``rows`` a
    multiple of 8) -> the kernel's ``[rows / 8, kc, 8, 16]`` 32-bit words: unsigned codes, in
    chunks of 128 inputs, nibble ``j`` of word ``l`` holding input ``16 j + l`` (byte ``q`` of a
    little-endian word holds nibbles ``2q`` and ``2q + 1``)."""
    qdata = qdata[:, : kc * 64]  # a padded last group may hold codes past the last chunk
    rows, half = qdata.shape
    p = qdata if not symmetric else torch.bitwise_xor(qdata, 0x88)  # u = code + 8
    u = torch.zeros(rows, kc * 128, dtype=torch.uint8)
    torch.bitwise_and(p, 15, out=u[:, 0 : 2 * half : 2])
    torch.bitwise_right_shift(p, 4, out=u[:, 1 : 2 * half : 2])
    u = u.view(rows, kc, 4, 2, 16)  # [.., q, nibble of the byte, l]
    b = torch.bitwise_or(u[:, :, :, 0], torch.bitwise_left_shift(u[:, :, :, 1], 4))
    words = b.transpose(2, 3).contiguous().view(torch.int32)  # [rows, kc, 16]
    return words.view(rows // TILE, TILE, kc, 16).transpose(1, 2)


def prepare(qt: QTensor) -> dict:
    """The kernel's layout of an ``int4-group`` QTensor ``[N, K]`` (group size a multiple of
    32, the last group possibly padded): tiled codes and float32 per-group parameters."""
    n, k = qt.shape
    gs, groups = qt.group_size, qt.scale.shape[1]
    if gs not in (32, 64, 128, 256):  # the kernel finds a group by a shift
        raise ValueError(f"int4 GEMV: group size {gs} is not 32, 64, 128 or 256")
    kc = -(-k // 128)
    tiles = -(-n // TILE)
    codes = torch.zeros(tiles, kc, TILE, 16, dtype=torch.int32)
    qdata = qt.qdata.reshape(n, -1)
    for i in range(0, n, _PREP_ROWS):
        j = min(i + _PREP_ROWS, n)
        block = qdata[i:j]
        if (j - i) % TILE:  # the last rows of a layer whose N is not a multiple of 8
            pad = torch.full((TILE - (j - i) % TILE, block.shape[1]), 0x88 if qt.symmetric else 0)
            block = torch.cat([block, pad.to(torch.uint8)])
        codes[i // TILE : i // TILE + block.shape[0] // TILE] = _tile_codes(block, qt.symmetric, kc)
    parts = [qt.scale] if qt.symmetric else [qt.scale, qt.zero_point]
    # float32 (exact for every scale dtype): float16 parameters read 6% fewer bytes at g128 but
    # widening them per group timed slower at one token (ad-hoc timings while tuning)
    params = torch.zeros(len(parts), tiles * TILE, groups, dtype=torch.float32)
    for i, t in enumerate(parts):  # padding rows: scale 0, so their 16 weights are all 0
        params[i, :n] = t.reshape(n, groups).to(torch.float32)
    params = params.view(len(parts), tiles, TILE, groups).permute(1, 3, 0, 2).contiguous()
    return {"w4": codes, "p4": params, "sym": qt.symmetric, "kc": kc, "gs": gs}


def int4_gemv_c(x: torch.Tensor, p: ck.Prepared, bias: torch.Tensor | None = None):
    """``x @ w^T + bias`` for ``x`` ``[M, K]`` in float32 arithmetic, ``w`` the dequantized
    weight; returned in bfloat16 for bfloat16 inputs and in float32 otherwise (the caller casts
    float16 back)."""
    t = p.tensors
    m, k, n = x.shape[0], p.k, p.n
    x, bf16, x32, y, bias = gemv_operands(x, n, bias, "int4_gemv.x32")
    int4_gemv_library().mq_int4_gemv(
        x.data_ptr(), m, k, int(bf16), x32, t["w4"].data_ptr(), t["p4"].data_ptr(),
        int(t["sym"]), t["kc"], t["gs"], None if bias is None else bias.data_ptr(), n,
        y.data_ptr(), int(bf16), torch.get_num_threads(),
    )  # fmt: skip
    return y


KERNELS = {"int4-gemv-c": int4_gemv_c}

#: what each kernel is, as ``monoquant plan`` shows it
DESCRIPTIONS = {"int4-gemv-c": "int4 GEMV (C, AVX-512), fp32 math, input-dtype output"}
