"""``bench/kernels.py`` sweeps of torch-cpu's and cpu-vnni's many-row GEMMs: where each hands
over to another kernel (``--vnni-crossover``, ``--vnni-f32``, ``--f32-gemm``). Split from
kernel_sweeps.py, whose timing helpers they use."""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.nn.functional as F
from kernel_sweeps import _alternating
from monoquant_plugins.backends import torch_cpu
from torch import nn

from monoquant_core import Engine

VNNI_SHAPES = [(384, 384), (1536, 384), (384, 1536), (2048, 2048), (4096, 4096)]
VNNI_MS = [8, 16, 24, 32, 48, 64, 96, 128, 192, 256]


def _w4a8_prepared(n: int, k: int, gs: int, dtype: torch.dtype, f32: bool = False):
    """The cpu-vnni prepared weight of a seeded ``Linear(k, n)`` in ``dtype``, W4A8 g``gs``;
    ``f32``: with torch-cpu's float32 GEMM operands whatever cpu-vnni's hand-over table says
    (None where that GEMM does not run or take the shape)."""
    from monoquant_plugins.backends import cpu_kernels, f32_gemm

    torch.manual_seed(0)
    q, _ = Engine().quantize(
        nn.Sequential(nn.Linear(k, n)).to(dtype),
        scheme="int4-group",
        scheme_options={"group_size": gs, "activations": "dynamic"},
        backend="cpu-vnni",
        progress=False,
    )
    p = q[0].prepared()
    if f32 and f32_gemm.f32_gemm_library() is not None and f32_gemm.fits_int4(n, k, gs):
        t = {"gs": gs, **f32_gemm.int4_tensors(q[0].qtensor("weight"))}
        p.own32 = cpu_kernels.Prepared(n, k, ((1, "int4-gemm-f32"),), t)
    return p


def _ratio_row(label: str, fns: list, k: int, ms: list[int], p, dtype, rounds: int) -> str:
    """``| label | a/b per M | first M where b is faster |`` for two kernels ``fns``."""
    cells, first = [], None
    for m in ms:
        a, b = _alternating(fns, torch.randn(m, k).to(dtype), p, rounds)
        cells.append(f"{a / b:.2f}")
        if first is None and b < a:
            first = m
    line = f"| {label} | " + " | ".join(cells) + f" | {first or '>' + str(ms[-1])} |"
    print(line, file=sys.stderr)
    return line


def vnni_crossover_table(rounds: int = 7) -> str:
    """cpu-vnni's W4A8 on bfloat16 inputs: its VNNI kernel against torch-cpu's own bf16 GEMM
    on the same prepared weight per M (g128 and g32): the first M where the GEMM is faster is
    where ``cpu_vnni.BF16_GEMM_ROWS`` / ``G32_GEMM_ROWS`` should hand over."""
    from monoquant_plugins.backends import cpu_vnni
    from monoquant_plugins.backends.dequant import dequant_library

    lib, reason = cpu_vnni.library()
    if lib is None or dequant_library() is None:
        return f"cpu-vnni W4A8 crossover: {reason or 'no C conversions here'}"

    def vnni(x, p):
        return cpu_vnni._vnni(lib, x, p).to(torch.bfloat16)

    def own(x, p):
        return cpu_vnni._own_gemm(x, p, None)

    head = "| weight | group | " + " | ".join(f"M={m}" for m in VNNI_MS) + " | GEMM from |"
    lines = [head, "|---|---|" + "---|" * (len(VNNI_MS) + 1)]
    for n, k in VNNI_SHAPES:
        for gs in (128, 32):
            p = _w4a8_prepared(n, k, gs, torch.bfloat16)
            if p.own is None:
                return f"{n}x{k}: the own GEMM does not run here"
            label = f"{n}x{k} | g{gs}"
            lines.append(_ratio_row(label, [vnni, own], k, VNNI_MS, p, torch.bfloat16, rounds))
    return (
        "cpu-vnni W4A8, bf16 inputs, 1 thread: VNNI kernel ms / own bf16 GEMM ms per M "
        "(> 1: the GEMM is faster):\n\n" + "\n".join(lines)
    )


VNNI_F32_MS = [16, 32, 64, 128, 256, 512, 1024]


def vnni_f32_table(rounds: int = 7) -> str:
    """cpu-vnni's W4A8 on float32 inputs: its VNNI kernel against torch-cpu's float32 GEMM on
    the reference's fake-quantized inputs, same prepared weight, per M (g128 and g32): the first
    M where the GEMM is faster is where ``cpu_vnni.F32_GEMM_ROWS`` should hand over."""
    from monoquant_plugins.backends import cpu_vnni

    lib, reason = cpu_vnni.library()
    os.environ["MONOQUANT_CPU_GEMM"] = "f32"
    head = "| weight | group | " + " | ".join(f"M={m}" for m in VNNI_F32_MS) + " | GEMM from |"
    lines = [head, "|---|---|" + "---|" * (len(VNNI_F32_MS) + 1)]
    fns = [lambda x, p: cpu_vnni._vnni(lib, x, p), lambda x, p: cpu_vnni._f32_gemm(x, p, None)]
    for n, k in VNNI_SHAPES:
        for gs in (128, 32):
            p = _w4a8_prepared(n, k, gs, torch.float32, f32=True)
            if lib is None or p.own32 is None:
                return f"cpu-vnni / float32 GEMM: {reason or 'the float32 GEMM does not run here'}"
            label = f"{n}x{k} | g{gs}"
            lines.append(_ratio_row(label, fns, k, VNNI_F32_MS, p, torch.float32, rounds))
    del os.environ["MONOQUANT_CPU_GEMM"]
    return (
        "cpu-vnni W4A8, float32 inputs, 1 thread: VNNI kernel ms / float32 GEMM ms per M "
        "(> 1: the GEMM is faster):\n\n" + "\n".join(lines)
    )


F32_SHAPES = [(384, 384), (1536, 384), (384, 1536), (4096, 4096)]
F32_MS = [128, 256, 512, 1024, 4096]


def f32_gemm_table(rounds: int = 5) -> str:
    """torch-cpu's float32 GEMMs (``int8-gemm-f32``, ``int4-gemm-f32``) against the float32
    conversion paths they hand over to (``int8-gemm``, ``int4-gemm``: converted blocks + torch's
    GEMM) and a float32 ``F.linear``, on one layer quantized by the engine, per M: where the
    GEMM should hand over (``f32_gemm.MAX_INPUT_ELEMENTS``)."""
    from monoquant_plugins.backends import f32_gemm

    if f32_gemm.f32_gemm_library() is None:
        return f"f32 GEMM: {f32_gemm.F32_GEMM.library()[1]}"
    os.environ["MONOQUANT_CPU_GEMM"] = "f32"
    kernels = torch_cpu.KERNELS
    head = "| weight | path | " + " | ".join(f"M={m}" for m in F32_MS) + " |"
    lines = [head, "|---|---|" + "---|" * len(F32_MS)]
    for n, k in F32_SHAPES:
        for scheme in ("int8", "int4-group"):
            torch.manual_seed(0)
            base = nn.Linear(k, n, bias=False)
            q, _ = Engine().quantize(nn.Sequential(copy.deepcopy(base)), scheme=scheme)
            p = q[0].prepared()
            own, conv = p.kernels[1][1], p.kernels[-1][1]
            cells: dict[str, list[str]] = {own: [], conv: []}
            for m in F32_MS:
                if m * k > 4 << 20:
                    for row in cells.values():
                        row.append("-")
                    continue
                x = torch.randn(m, k)
                t_own, t_conv, lin = _alternating(
                    [kernels[own], kernels[conv], lambda x, p, w=base.weight: F.linear(x, w)],
                    x,
                    p,
                    rounds,
                )
                cells[own].append(f"{lin / t_own:.2f}")
                cells[conv].append(f"{lin / t_conv:.2f}")
            for label, row in cells.items():
                lines.append(f"| {n}x{k} | {label} | " + " | ".join(row) + " |")
                print(lines[-1], file=sys.stderr)
    del os.environ["MONOQUANT_CPU_GEMM"]
    return (
        "weight-only, float32 inputs, 1 thread, x a float32 F.linear (> 1: faster):\n\n"
        + "\n".join(lines)
    )


#: ``bench/kernels.py --FLAG``: (table function, help)
SWEEPS = {
    "vnni-crossover": (
        vnni_crossover_table,
        "cpu-vnni W4A8 on bf16 inputs: its VNNI kernel vs the own bf16 GEMM per M",
    ),
    "vnni-f32": (
        vnni_f32_table,
        "cpu-vnni W4A8 on float32 inputs: its VNNI kernel vs the float32 GEMM per M",
    ),
    "f32-gemm": (
        f32_gemm_table,
        "torch-cpu's float32 GEMMs vs their conversion paths vs F.linear, per M",
    ),
}
