"""The kernel sweeps of ``bench/kernels.py`` (``--crossover``, ``--chunks``, ``--own-gemm``):
torch-cpu's few-row and many-row kernels timed on the same prepared weight at every M (where the
crossover table should hand over), W8A8 in one call against chunks of rows, and the own bf16
GEMM against the conversion path at many rows; and the small helpers
the tables share (timing, available backends, relative error, pools of cold weight copies,
the layers as they ran before torch-cpu's C GEMVs).

Run them through ``python bench/kernels.py --crossover`` / ``--chunks`` / ``--own-gemm``.
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from monoquant_plugins.backends import cpu_schedule, torch_cpu
from torch import nn

from monoquant_core import Engine

POOL_BYTES = 512 * 2**20
#: weight-only int8 / int4 as torch-cpu ran them before its C GEMVs (torch's
#: ``_weight_int8pack_mm`` / ``_weight_int4pack_mm_for_cpu`` for few rows)
PACK = "int8 weight-only, torch int8pack"
PACK4 = "int4-group g128, torch int4pack"
#: label -> (the torch_cpu library switched off, the few-row kernel that then runs)
_TORCH_PATHS = {PACK: ("gemv_library", "int8-weight"), PACK4: ("int4_gemv_library", "int4")}


def weight_bytes(module: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if t.data_ptr() not in seen and t.dim() >= 2:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def pool_of(module: nn.Module, per_copy: int) -> list[nn.Module]:
    n = max(2, min(32, -(-POOL_BYTES // max(per_copy, 1))))
    return [module] + [copy.deepcopy(module) for _ in range(n - 1)]


def _pool(label: str, q: nn.Module) -> list[nn.Module]:
    """The pool of a quantized model; for :data:`PACK` / :data:`PACK4`, every copy prepared
    with torch-cpu's C GEMV switched off (the layer as it ran before it; checked)."""
    pool = pool_of(q, weight_bytes(q))
    if label in _TORCH_PATHS:
        attr, kind = _TORCH_PATHS[label]
        saved = getattr(cpu_schedule, attr)
        setattr(cpu_schedule, attr, lambda: None)
        try:
            for m in pool:
                m[0].prepare()
        finally:
            setattr(cpu_schedule, attr, saved)
        assert all(m[0].prepared().pick(1) == kind for m in pool)
    return pool


def _runnable(methods: list[tuple]) -> list[tuple]:
    """The methods whose backend is available here (a missing one is said on stderr)."""
    engine, out = Engine(), []
    for method in methods:
        ok = engine.backends.get(method[-1]).available()
        if ok is True:
            out.append(method)
        else:
            print(f"skipping {method[0]} on {method[-1]}: {ok}", file=sys.stderr)
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


CROSS_SHAPES = [(384, 384), (1536, 384), (384, 1536), (2048, 2048), (4096, 4096), (11008, 4096)]
CROSS_MS = [1, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192]


def crossover_table() -> str:
    """torch-cpu's two weight-only kernels of each scheme (GEMV-class / blocked GEMM), timed
    on the same prepared weight at every M: the first M where the GEMM is faster is the
    crossover its table (``monoquant_plugins.backends.cpu_kernels.CROSSOVER``) should hold.
    int8 with the C GEMV gets a second row: what runs where the C kernels do not build, torch's
    ``_weight_int8pack_mm`` against the torch-op GEMM path (CROSSOVER ``int8``). int4 with the C
    GEMV gets two: torch's ``_weight_int4pack_mm_for_cpu`` against the same GEMM path (what ran
    before), and the C GEMV against torch's kernel (its crossover column: the first M where
    torch's kernel is faster)."""
    os.environ["MONOQUANT_TORCH_CPU_CROSSOVER"] = "int8=2,int4=2"  # prepare both kernels
    engine, kernels = Engine(), torch_cpu.KERNELS
    head = "| weight | scheme | N*K | " + " | ".join(f"M={m} ms" for m in CROSS_MS)
    lines = [head + " | crossover |", "|" + "---|" * (len(CROSS_MS) + 4)]
    for n, k in CROSS_SHAPES:
        for scheme in ("int8", "int4-group"):
            model, _ = engine.quantize(nn.Sequential(nn.Linear(k, n)), scheme=scheme)
            p = model[0].prepared()
            gemv, gemm = p.kernels[0][1], p.kernels[-1][1]
            pairs = [(gemv, gemm)]
            ts = p.tensors
            if gemv == "int8-gemv-c":  # torch's kernels on the same codes
                ts["s_bf16"], ts["compute"] = ts["s"].to(torch.bfloat16), cpu_schedule.compute()
                ts["s_compute"] = ts["s"].to(ts["compute"])
                pairs.append(("int8-weight", "int8-gemm"))
            if gemv == "int4-gemv-c":  # torch's int4 kernel on the same codes: both pairs
                ts.update(torch_cpu.int4pack_tensors(model[0].qtensor("weight")))
                pairs += [("int4", gemm), ("int4-gemv-c", "int4")]
            for small, big in pairs:
                cells, first = [], None
                for m in CROSS_MS:
                    x = torch.randn(m, k)
                    t = _alternating([kernels[small], kernels[big]], x, p, 7)
                    cells.append(f"{t[0] * 1e3:.2f} / {t[1] * 1e3:.2f}")
                    if first is None and t[1] < t[0]:
                        first = m
                lines.append(
                    f"| {n}x{k} | {scheme} ({small} / {big}) | {n * k / 1e6:.1f}M | "
                    + " | ".join(cells)
                    + f" | {first or f'> {CROSS_MS[-1]}'} |"
                )
    del os.environ["MONOQUANT_TORCH_CPU_CROSSOVER"]
    return "GEMV ms / GEMM ms per M (1 thread):\n\n" + "\n".join(lines)


CHUNK_SHAPES = [(384, 384), (1536, 384), (384, 1536)]
CHUNK_MS = [512, 1024, 4096]


def chunks_table() -> str:
    """torch-cpu's W8A8 kernel at many rows (MiniLM-sized weights, 32 x 128 tokens = 4096
    rows): the whole input in one fbgemm call against chunks of ``CHUNK_ROWS`` rows, for fp32
    and bf16 inputs, with the float ``nn.Linear`` of the input's dtype as the baseline."""
    from monoquant_plugins.backends import cpu_kernels

    chunk = cpu_kernels.CHUNK_ROWS
    head = "| weight | input | M | float ms | one call ms | chunks ms | chunks x float |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    engine = Engine()
    for n, k in CHUNK_SHAPES:
        base = nn.Linear(k, n, bias=False)
        model, _ = engine.quantize(
            nn.Sequential(copy.deepcopy(base)),
            scheme="int8",
            scheme_options={"activations": "dynamic"},
        )
        p = model[0].prepared()
        for dtype in (torch.float32, torch.bfloat16):
            w = base.weight.detach().to(dtype)
            for m in CHUNK_MS:
                x = torch.randn(m, k).to(dtype)
                t_float = statistics.median(_timed_n(F.linear, x, w, 5))
                cpu_kernels.CHUNK_ROWS = 1 << 30
                t_one = statistics.median(_timed_n(cpu_kernels.int8_dynamic, x, p, 5))
                cpu_kernels.CHUNK_ROWS = chunk
                t_chunk = statistics.median(_timed_n(cpu_kernels.int8_dynamic, x, p, 5))
                lines.append(
                    f"| {n}x{k} | {str(dtype)[6:]} | {m} | {t_float * 1e3:.2f} | "
                    f"{t_one * 1e3:.2f} | {t_chunk * 1e3:.2f} | {t_float / t_chunk:.2f}x |"
                )
    return f"W8A8 (int8 dynamic), one call vs chunks of {chunk} rows (1 thread):\n\n" + "\n".join(
        lines
    )


def _alternating(fns: list, x: torch.Tensor, p, rounds: int) -> list[float]:
    """Median time of each ``fn(x, p)``, the functions called in turn ``rounds`` times (after
    one untimed call each), so a slow spell of the machine hits all of them alike."""
    for fn in fns:
        fn(x, p)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            times[i].append(_timed(lambda fn=fn: fn(x, p)))
    return [statistics.median(t) for t in times]


def _timed_n(fn, x: torch.Tensor, p, n: int) -> list[float]:
    fn(x, p)
    return [_timed(lambda: fn(x, p)) for _ in range(n)]


OWN_SHAPES = [(1024, 1024), (4096, 1024), (1024, 4096), (1536, 384), (384, 1536)]
OWN_MS = [128, 256, 512, 1024, 2048, 4096]


def own_gemm_table(rounds: int = 5) -> str:
    """torch-cpu's own AVX512-BF16 GEMM against the conversion path (C conversion + oneDNN's
    bf16 GEMM) on the same weight, bf16 inputs, per M: where the own GEMM should hand back
    (``bf16_gemm.MAX_INPUT_ELEMENTS``). Ratio = conversion ms / own ms (> 1: own is faster)."""
    from monoquant_plugins.backends import bf16_gemm

    if bf16_gemm.bf16_gemm_library() is None:
        return f"own bf16 GEMM: {bf16_gemm.BF16_GEMM.library()[1]}"
    head = "| weight | scheme | " + " | ".join(f"M={m}" for m in OWN_MS) + " |"
    lines = [head, "|---|---|" + "---|" * len(OWN_MS)]
    for scheme, own, conv in (
        ("int8", "int8-gemm-bf16", "int8-gemm-c"),
        ("int4-group", "int4-gemm-bf16", "int4-gemm-c"),
    ):
        for n, k in OWN_SHAPES:
            torch.manual_seed(0)
            layer = nn.Sequential(nn.Linear(k, n)).to(torch.bfloat16)
            q, _ = Engine().quantize(layer, scheme=scheme, progress=False)
            p = q[0].prepared()
            kinds = {name for _, name in p.kernels}
            if own not in kinds or conv not in kinds:
                return f"{scheme} {n}x{k}: this machine does not run both paths ({kinds})"
            cells = []
            for m in OWN_MS:
                x = torch.randn(m, k).to(torch.bfloat16)
                a, b = _alternating([torch_cpu.KERNELS[own], torch_cpu.KERNELS[conv]], x, p, rounds)
                cells.append(f"{b / a:.2f}")
            lines.append(f"| {n}x{k} | {scheme} | " + " | ".join(cells) + " |")
            print(lines[-1], file=sys.stderr)
    return (
        "Own bf16 GEMM vs the conversion path, bf16 inputs, 1 thread "
        "(conversion ms / own ms; > 1: the own GEMM is faster):\n\n" + "\n".join(lines)
    )


W8A8_SHAPES = [(384, 384), (1536, 384), (384, 1536), (1024, 1024), (4096, 1024), (1024, 4096)]
W8A8_MS = [16, 32, 64, 128, 256, 512]


def w8a8_bf16_table(rounds: int = 15) -> str:
    """torch-cpu's W8A8 (``activations="dynamic"``) on bfloat16 inputs: fbgemm's kernel and the
    own bf16 GEMM on per-token codes, each against the bf16 ``nn.Linear`` it replaces, per M
    (where ``bf16_gemm.W8A8_ROWS`` / ``W8A8_MAX_K`` should hold)."""
    from monoquant_plugins.backends import bf16_gemm
    from monoquant_plugins.backends import cpu_kernels as ck

    if bf16_gemm.bf16_gemm_library() is None:
        return f"own bf16 GEMM: {bf16_gemm.BF16_GEMM.library()[1]}"
    head = "| weight | kernel | " + " | ".join(f"M={m}" for m in W8A8_MS) + " |"
    lines = [head, "|---|---|" + "---|" * len(W8A8_MS)]
    for n, k in W8A8_SHAPES:
        torch.manual_seed(0)
        layer = nn.Sequential(nn.Linear(k, n)).to(torch.bfloat16)
        ref = copy.deepcopy(layer)
        q, _ = Engine().quantize(
            layer, scheme="int8", scheme_options={"activations": "dynamic"}, progress=False
        )
        p = q[0].prepared()
        cells: dict[str, list[str]] = {"fbgemm": [], "own bf16 GEMM": []}
        for m in W8A8_MS:
            x = torch.randn(m, k).to(torch.bfloat16)
            fb, own, lin = _alternating(
                [ck.int8_dynamic, bf16_gemm.int8_dynamic_gemm_bf16, lambda x, p, ref=ref: ref(x)],
                x,
                p,
                rounds,
            )
            cells["fbgemm"].append(f"{lin / fb:.2f}")
            cells["own bf16 GEMM"].append(f"{lin / own:.2f}")
        for label, row in cells.items():
            lines.append(f"| {n}x{k} | {label} | " + " | ".join(row) + " |")
            print(lines[-1], file=sys.stderr)
    return (
        "W8A8 on bf16 inputs, 1 thread, x a bf16 nn.Linear (> 1: faster than the bf16 layer):\n\n"
        + "\n".join(lines)
    )


#: ``bench/kernels.py --FLAG``: (table function, help)
SWEEPS = {
    "crossover": (
        crossover_table,
        "torch-cpu's GEMV vs GEMM kernels per M (where the GEMM path should start)",
    ),
    "chunks": (chunks_table, "torch-cpu's W8A8 kernel at many rows: one fbgemm call vs row chunks"),
    "own-gemm": (
        own_gemm_table,
        "torch-cpu's own bf16 GEMM vs the conversion path per M (where to hand back)",
    ),
    "w8a8-bf16": (
        w8a8_bf16_table,
        "W8A8 on bf16 inputs: fbgemm vs the own bf16 GEMM, x a bf16 nn.Linear, per M",
    ),
}
