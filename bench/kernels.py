"""Quantized Linear latency on this CPU: every backend x scheme against fp32/bf16 nn.Linear.

    python bench/kernels.py                       # 1 thread and all threads, both shapes
    python bench/kernels.py --threads 1 --quick   # one shape, fewer repetitions
    python bench/kernels.py --overhead            # our int8 layers vs the bare fbgemm kernel
    python bench/kernels.py --crossover           # torch-cpu's GEMV vs GEMM crossover M
    python bench/kernels.py --chunks              # W8A8 at many rows: one fbgemm call vs chunks
    python bench/kernels.py --own-gemm            # the own bf16 GEMM vs the conversion path
    python bench/kernels.py --vnni-crossover      # cpu-vnni W4A8 (bf16): VNNI kernel vs own GEMM
    python bench/kernels.py --w8a8-bf16           # W8A8 (bf16): fbgemm vs own GEMM vs bf16
    python bench/kernels.py --f32-gemm            # the own float32 GEMM vs the conversion path
    python bench/kernels.py --vnni-f32            # cpu-vnni W4A8 (fp32): VNNI kernel vs f32 GEMM

Linear 4096x4096 and 4096->11008 at M = 1, 8, 32, 128 tokens, in a float32 model (against
fp32 and bf16 ``nn.Linear``) and in a bfloat16 model (bf16 inputs, against bf16 ``nn.Linear``).
Weights are cold (every call uses the next of several copies, together larger than the L3
cache). Each cell is the median of calls measured in one run, round-robin in a shuffled order
(the machine's drift hits all alike); speed-up = fp32 ``nn.Linear`` time / time. A bare
``torch.ao`` fbgemm row shows the kernel's own speed. At M=1 the table also gives the fraction
of the memory-bandwidth limit (weight bytes / latency / the ``tensor.sum()`` bandwidth over
1 GiB) and of the "only read" row (a cold ``sum`` over as many bytes, interleaved with the
rest). The ``torch int8pack`` / ``torch int4pack`` rows are weight-only int8 / int4 as they
ran before torch-cpu's C GEMVs.

A last table times an end-to-end model (4 pre-norm transformer blocks, hidden 1024, MLP 4096)
at batch 1 (one token, M=1) in fp32 and quantized.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from monoquant_core import Engine
from monoquant_core.demo import TransformerBlock
from monoquant_core.hardware import isa

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gemm_sweeps import SWEEPS as GEMM_SWEEPS
from kernel_sweeps import PACK, PACK4, SWEEPS, _pool, _rel, _runnable, _timed, pool_of, weight_bytes

W4A8 = {"activations": "dynamic"}  # int4-group with int8 inputs per token (cpu-vnni backend)
METHODS = [  # label, scheme, options, backend
    ("int8 dynamic per token (W8A8)", "int8", {"activations": "dynamic"}, "torch-cpu"),
    ("int8 dynamic per tensor (W8A8)", "int8", {"activations": "dynamic-tensor"}, "torch-cpu"),
    ("int8 weight-only", "int8", {}, "torch-cpu"),
    (PACK, "int8", {}, "torch-cpu"),
    ("int4-group g128", "int4-group", {"group_size": 128}, "torch-cpu"),
    (PACK4, "int4-group", {"group_size": 128}, "torch-cpu"),
    ("int4-group g32", "int4-group", {"group_size": 32}, "torch-cpu"),
    ("int4-group g128 W4A8", "int4-group", {"group_size": 128, **W4A8}, "cpu-vnni"),
    ("int4-group g32 W4A8", "int4-group", {"group_size": 32, **W4A8}, "cpu-vnni"),
    ("fp16", "fp16", {}, "torch-cpu"),
    ("int8 weight-only", "int8", {}, "reference"),
    ("int4-group g128", "int4-group", {"group_size": 128}, "reference"),
]


def bandwidth_gbs() -> float:
    t = torch.ones(2**28)  # 1 GiB
    t.sum()
    best = min(_timed(lambda: t.sum()) for _ in range(5))
    return t.numel() * 4 / best / 1e9


def time_pool(pool: list[nn.Module], x: torch.Tensor, calls: int) -> float:
    """Median latency of ``calls`` calls, cycling through the pool (after a warm-up pass)."""
    with torch.no_grad():
        for m in pool:  # warm-up: prepares kernel layouts, touches every copy once
            m(x)
        return statistics.median(_calls(pool, x, 0, calls))


def _calls(pool: list[nn.Module], x: torch.Tensor, start: int, calls: int) -> list[float]:
    times = []
    for i in range(start, start + calls):
        m = pool[i % len(pool)]
        t0 = time.perf_counter()
        m(x)
        times.append(time.perf_counter() - t0)
    return times


def interleaved(variants: list[tuple], x_of, rounds: int, quick: bool) -> list[float]:
    """Median latency per variant, measured round-robin: every round runs a few calls of each
    variant in turn, in a shuffled order, after two untimed calls, so drift in the machine's
    speed (other tenants, clocks) hits all of them alike and the ratios stay fair."""
    times: list[list[float]] = [[] for _ in variants]
    with torch.no_grad():
        for *_, pool, dtype in variants:
            for m in pool:
                m(x_of(dtype))
        order = list(range(len(variants)))
        for r in range(rounds):
            random.Random(r).shuffle(order)  # no variant always follows the same one
            for i in order:
                _, backend, pool, dtype = variants[i]
                slow = backend == "reference"
                if slow and r >= 3:
                    continue
                n = 1 if slow else (2 if quick else 4)
                if not slow:  # untimed calls after switching variants
                    _calls(pool, x_of(dtype), r * (n + 2), 2)
                times[i] += _calls(pool, x_of(dtype), r * (n + 2) + 2, n)
    return [statistics.median(t) for t in times]


def linear_table(n: int, k: int, ms: list[int], bw: float, quick: bool) -> str:
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False)
    engine = Engine()
    rows = []
    fp32 = pool_of(base, n * k * 4)
    bf16 = pool_of(copy.deepcopy(base).to(torch.bfloat16), n * k * 2)
    variants = [
        ("fp32 nn.Linear", "-", fp32, torch.float32),
        ("bf16 nn.Linear", "-", bf16, torch.bfloat16),
    ]
    for label, scheme, opts, backend in _runnable(METHODS):
        q, _ = engine.quantize(
            nn.Sequential(copy.deepcopy(base)), scheme=scheme, scheme_options=opts, backend=backend
        )
        variants.append((label, backend, _pool(label, q), torch.float32))
        if label.startswith("int8 dynamic per token"):  # the bare kernel, for our overhead
            raw = _raw_fbgemm(base)
            variants.append(("(bare fbgemm dynamic Linear)", "torch.ao", raw, torch.float32))
            read = pool_of(ReadBytes(n, k), n * k)
            variants.append(("(only read 1 byte/weight: sum)", "memory", read, torch.float32))
    by_m = {}
    for m in ms:
        xs = {dt: torch.randn(m, k, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
        by_m[m] = interleaved(variants, xs.__getitem__, 3 if quick else 8, quick)
    read = next((i for i, v in enumerate(variants) if v[1] == "memory"), None)
    for i, (label, backend, pool, _) in enumerate(variants):
        cells = [f"{by_m[m][i] * 1e3:.2f} ({by_m[m][0] / by_m[m][i]:.1f}x)" for m in ms]
        wb = n * k if backend == "torch.ao" else weight_bytes(pool[0])  # packed: not a buffer
        t1 = by_m[ms[0]][i]
        # the read row's time for this row's bytes (interleaved with it) / this row's time
        of_read = "-" if read is None else f"{by_m[ms[0]][read] * wb / (n * k) / t1 * 100:.0f}%"
        rows.append(
            f"| {label} | {backend} | {wb / (n * k):.2f} | "
            + " | ".join(cells)
            + f" | {wb / t1 / (bw * 1e9) * 100:.0f}% | {of_read} |"
        )
    head = (
        "| method | backend | bytes/weight | "
        + " | ".join(f"M={m} ms (x fp32)" for m in ms)
        + " | M=1 % of BW | M=1 % of read |"
    )
    sep = "|---|---|---|" + "---|" * len(ms) + "---|---|"
    return "\n".join([f"Linear {k} -> {n} (N={n}, K={k})", "", head, sep, *rows])


def linear_table_bf16(n: int, k: int, ms: list[int], quick: bool) -> str:
    """The same layer as :func:`linear_table` in a bfloat16 model: every method quantized from
    the bf16 weight and called with bf16 inputs, against bf16 ``nn.Linear`` (the float layer of
    the same activation dtype)."""
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False).to(torch.bfloat16)
    engine = Engine()
    variants = [("bf16 nn.Linear", "-", pool_of(base, n * k * 2), torch.bfloat16)]
    for label, scheme, opts, backend in _runnable(METHODS):
        if backend == "reference":
            continue  # far slower, and measured in the float32 table
        q, _ = engine.quantize(
            nn.Sequential(copy.deepcopy(base)), scheme=scheme, scheme_options=opts, backend=backend
        )
        variants.append((label, backend, _pool(label, q), torch.bfloat16))
    by_m = {}
    for m in ms:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        by_m[m] = interleaved(variants, lambda _dt, x=x: x, 3 if quick else 8, quick)
    rows = [
        f"| {label} | {backend} | "
        + " | ".join(f"{by_m[m][i] * 1e3:.2f} ({by_m[m][0] / by_m[m][i]:.2f}x)" for m in ms)
        + " |"
        for i, (label, backend, _, _) in enumerate(variants)
    ]
    head = "| method | backend | " + " | ".join(f"M={m} ms (x bf16)" for m in ms) + " |"
    sep = "|---|---|" + "---|" * len(ms)
    title = f"bfloat16 model: Linear {k} -> {n} (N={n}, K={k}), bf16 inputs"
    return "\n".join([title, "", head, sep, *rows])


def _raw_fbgemm(base: nn.Linear) -> list[nn.Module]:
    """PyTorch's own ``torch.ao`` dynamic int8 Linear (fbgemm, per-call activation scale),
    with no Mono Quant code around it: the ceiling our int8 W8A8 layers are compared with."""
    import warnings

    import torch.ao.nn.quantized.dynamic as nnqd

    with warnings.catch_warnings():  # torch deprecates quantized tensor creation
        warnings.simplefilter("ignore", UserWarning)
        one = nnqd.Linear(base.in_features, base.out_features, bias_=False, dtype=torch.qint8)
        return pool_of(one, base.out_features * base.in_features)  # 1 byte per weight


class ReadBytes(nn.Module):
    """Reads as many bytes as an int8 weight of [n, k] (``sum`` over a float32 view), in the
    same cold pool as the layers: the M=1 ceiling of any 1-byte-per-weight kernel here."""

    def __init__(self, n: int, k: int):
        super().__init__()
        self.register_buffer("w", torch.ones(n, k // 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w.sum()


def overhead_table(rounds: int = 20) -> str:
    """Our int8 W8A8 layers against the bare fbgemm kernel they call, 4096x4096, measured
    round-robin with many rounds: what Mono Quant's wrapper costs per call."""
    torch.manual_seed(0)
    base = nn.Linear(4096, 4096, bias=False)
    variants = [("fp32 nn.Linear", "-", pool_of(base, 4096 * 4096 * 4), torch.float32)]
    variants.append(("(bare fbgemm dynamic Linear)", "torch.ao", _raw_fbgemm(base), torch.float32))
    for label, act in [
        ("int8 W8A8 per token", "dynamic"),
        ("int8 W8A8 per tensor", "dynamic-tensor"),
    ]:
        q, _ = Engine().quantize(
            nn.Sequential(copy.deepcopy(base)), scheme="int8", scheme_options={"activations": act}
        )
        variants.append((label, "torch-cpu", pool_of(q, weight_bytes(q)), torch.float32))
    rows = []
    cols = {}
    for m in (1, 8, 128):
        x = torch.randn(m, 4096)
        cols[m] = interleaved(variants, lambda dt, x=x: x, rounds, False)
    for i, (label, backend, _, _) in enumerate(variants):
        cells = [
            f"{cols[m][i] * 1e3:.3f} ({cols[m][i] / cols[m][1]:.2f}x bare)" for m in (1, 8, 128)
        ]
        rows.append(f"| {label} | {backend} | " + " | ".join(cells) + " |")
    return "\n".join(
        [
            "Wrapper overhead: Linear 4096x4096, int8 W8A8 against the bare fbgemm kernel",
            "",
            "| method | backend | M=1 ms | M=8 ms | M=128 ms |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )


class Model(nn.Module):
    def __init__(self, dim=1024, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, 16, 4 * dim) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def model_table(quick: bool = False) -> str:
    """End-to-end latency at batch 1, fp32 vs quantized, measured round-robin in one run; the
    error columns compare each output with fp32 and with the reference backend running the
    very same QTensors (the kernel's own error)."""
    torch.manual_seed(0)
    base = Model().eval()
    x = torch.randn(1, 1, 1024)
    fp32_bytes = sum(p.numel() * 4 for p in base.parameters())
    configs = [
        ("int8 dynamic per token", "int8", {"activations": "dynamic"}, "torch-cpu"),
        ("int8 dynamic per tensor", "int8", {"activations": "dynamic-tensor"}, "torch-cpu"),
        ("int8 weight-only", "int8", {}, "torch-cpu"),
        ("int4-group g128", "int4-group", {}, "torch-cpu"),
        ("int4-group g128 W4A8", "int4-group", W4A8, "cpu-vnni"),
        ("int8 weight-only", "int8", {}, "reference"),
    ]
    configs = _runnable(configs)
    variants = [("fp32", "-", pool_of(base, fp32_bytes), torch.float32)]
    errors = [("0", "-")]
    with torch.no_grad():
        want = base(x)
        for label, scheme, opts, backend in configs:
            m, _ = Engine().quantize(
                copy.deepcopy(base), scheme=scheme, scheme_options=opts, backend=backend
            )
            ref, _ = Engine().quantize(
                copy.deepcopy(base), scheme=scheme, scheme_options=opts, backend="reference"
            )
            ref.load_state_dict(m.state_dict())
            y, r = m(x), ref(x)
            errors.append(
                (f"{_rel(y, want):.1e}", f"{_rel(y, r):.1e}" if backend != "reference" else "-")
            )
            variants.append((label, backend, pool_of(m, weight_bytes(m)), torch.float32))
    times = interleaved(variants, lambda dt: x, 3 if quick else 10, quick)
    rows = [
        f"| {label} | {backend} | {t * 1e3:.2f} | {times[0] / t:.2f}x | {e_fp} | {e_ref} |"
        for (label, backend, _, _), t, (e_fp, e_ref) in zip(variants, times, errors)
    ]
    return "\n".join(
        [
            "End-to-end: 4 transformer blocks, hidden 1024, MLP 4096, one token (batch 1)",
            "",
            "| model | backend | ms | x fp32 | rel. error vs fp32 | rel. error vs reference |",
            "|---|---|---|---|---|---|",
            *rows,
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--threads",
        type=int,
        nargs="*",
        default=None,
        help="thread counts to run (default: 1 and all)",
    )
    ap.add_argument("--quick", action="store_true", help="one shape, fewer calls")
    ap.add_argument("--no-bf16", action="store_true", help="leave out the bfloat16-model tables")
    sweeps = {"overhead": (overhead_table, "only our int8 W8A8 layers against the bare fbgemm "
                           "kernel (many rounds)"), **SWEEPS, **GEMM_SWEEPS}  # fmt: skip
    for flag, (_, text) in sweeps.items():
        ap.add_argument(f"--{flag}", action="store_true", help=text)
    args = ap.parse_args()
    for flag, (table, _) in sweeps.items():  # one sweep, on the first thread count (1)
        if getattr(args, flag.replace("-", "_")):
            torch.set_num_threads((args.threads or [1])[0])
            print(table())
            return
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (11008, 4096)]
    print(
        f"torch {torch.__version__}, CPU: {', '.join(isa()) or 'unknown'} (ATen: "
        f"{torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} CPUs\n"
    )
    for nt in threads:
        torch.set_num_threads(nt)
        bw = bandwidth_gbs()
        print(f"## {nt} thread(s); read bandwidth {bw:.1f} GB/s (tensor.sum over 1 GiB)\n")
        for n, k in shapes:
            print(linear_table(n, k, [1, 8, 32, 128], bw, args.quick), "\n")
        if not args.no_bf16:
            for n, k in shapes:
                print(linear_table_bf16(n, k, [1, 8, 32, 128], args.quick), "\n")
        print(model_table(args.quick), "\n")


if __name__ == "__main__":
    main()
