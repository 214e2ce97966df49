"""Quantized Linear latency on this CPU: every backend x scheme against fp32/bf16 nn.Linear.

    python bench/kernels.py                       # 1 thread and all threads, both shapes
    python bench/kernels.py --threads 1 --quick   # one shape, fewer repetitions
    python bench/kernels.py --overhead            # our int8 layers vs the bare fbgemm kernel
    python bench/kernels.py --crossover           # torch-cpu's GEMV vs GEMM crossover M
    python bench/kernels.py --chunks              # W8A8 at many rows: one fbgemm call vs chunks

Linear 4096x4096 and 4096->11008 at M = 1, 8, 32, 128 tokens, in a float32 model (against
fp32 and bf16 ``nn.Linear``) and in a bfloat16 model (bf16 inputs, against bf16
``nn.Linear``). Weights are cold: every call uses the next of several copies of the layer,
together larger than the L3 cache, so each call streams its weight from DRAM as in a real
model. Each cell is the median of the timed calls,
measured in one run, round-robin (a few calls of each variant in turn, in a shuffled order,
so the machine's drift hits all alike), with fp32 ``nn.Linear`` as the baseline (speed-up =
fp32 time / time). A bare ``torch.ao`` fbgemm dynamic Linear row shows the kernel's own speed.
At M=1 the table also gives the fraction of the memory-bandwidth limit: weight bytes /
latency / read bandwidth, the bandwidth measured here by ``tensor.sum()`` over 1 GiB.

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
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from monoquant_core import Engine
from monoquant_core.demo import TransformerBlock
from monoquant_core.hardware import isa

POOL_BYTES = 512 * 2**20
W4A8 = {"activations": "dynamic"}  # int4-group with int8 inputs per token (cpu-vnni backend)
METHODS = [  # label, scheme, options, backend
    ("int8 dynamic per token (W8A8)", "int8", {"activations": "dynamic"}, "torch-cpu"),
    ("int8 dynamic per tensor (W8A8)", "int8", {"activations": "dynamic-tensor"}, "torch-cpu"),
    ("int8 weight-only", "int8", {}, "torch-cpu"),
    ("int4-group g128", "int4-group", {"group_size": 128}, "torch-cpu"),
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


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


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
        variants.append((label, backend, pool_of(q, weight_bytes(q)), torch.float32))
        if label.startswith("int8 dynamic per token"):  # the bare kernel, for our overhead
            raw = _raw_fbgemm(base)
            variants.append(("(bare fbgemm dynamic Linear)", "torch.ao", raw, torch.float32))
            read = pool_of(ReadBytes(n, k), n * k)
            variants.append(("(only read 1 byte/weight: sum)", "memory", read, torch.float32))
    by_m = {}
    for m in ms:
        xs = {dt: torch.randn(m, k, dtype=dt) for dt in (torch.float32, torch.bfloat16)}
        by_m[m] = interleaved(variants, xs.__getitem__, 3 if quick else 8, quick)
    for i, (label, backend, pool, _) in enumerate(variants):
        cells = [f"{by_m[m][i] * 1e3:.2f} ({by_m[m][0] / by_m[m][i]:.1f}x)" for m in ms]
        wb = n * k if backend == "torch.ao" else weight_bytes(pool[0])  # packed: not a buffer
        frac = wb / by_m[ms[0]][i] / (bw * 1e9)
        rows.append(
            f"| {label} | {backend} | {wb / (n * k):.2f} | "
            + " | ".join(cells)
            + f" | {frac * 100:.0f}% |"
        )
    head = (
        "| method | backend | bytes/weight | "
        + " | ".join(f"M={m} ms (x fp32)" for m in ms)
        + " | M=1 % of BW |"
    )
    sep = "|---|---|---|" + "---|" * len(ms) + "---|"
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
        variants.append((label, backend, pool_of(q, weight_bytes(q)), torch.bfloat16))
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


CROSS_SHAPES = [(384, 384), (1536, 384), (384, 1536), (2048, 2048), (4096, 4096), (11008, 4096)]
CROSS_MS = [8, 16, 32, 48, 64, 96, 128, 192]


def crossover_table() -> str:
    """torch-cpu's two weight-only kernels of each scheme (GEMV-class / blocked GEMM), timed
    on the same prepared weight at every M: the first M where the GEMM is faster is the
    crossover its table (``monoquant_plugins.backends.cpu_kernels.CROSSOVER``) should hold."""
    from monoquant_plugins.backends.torch_cpu import KERNELS

    os.environ["MONOQUANT_TORCH_CPU_CROSSOVER"] = "int8=2,int4=2"  # prepare both kernels
    engine = Engine()
    head = "| weight | scheme | N*K | " + " | ".join(f"M={m} ms" for m in CROSS_MS)
    lines = [head + " | crossover |", "|" + "---|" * (len(CROSS_MS) + 4)]
    for n, k in CROSS_SHAPES:
        for scheme in ("int8", "int4-group"):
            model, _ = engine.quantize(nn.Sequential(nn.Linear(k, n)), scheme=scheme)
            p = model[0].prepared()
            gemv, gemm = p.kernels[0][1], p.kernels[-1][1]
            cells, first = [], None
            for m in CROSS_MS:
                x = torch.randn(m, k)
                t = [statistics.median(_timed_n(KERNELS[kind], x, p, 5)) for kind in (gemv, gemm)]
                cells.append(f"{t[0] * 1e3:.2f} / {t[1] * 1e3:.2f}")
                if first is None and t[1] < t[0]:
                    first = m
            lines.append(
                f"| {n}x{k} | {scheme} ({gemm}) | {n * k / 1e6:.1f}M | "
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


def _timed_n(fn, x: torch.Tensor, p, n: int) -> list[float]:
    fn(x, p)
    return [_timed(lambda: fn(x, p)) for _ in range(n)]


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
    ap.add_argument(
        "--overhead",
        action="store_true",
        help="only our int8 W8A8 layers against the bare fbgemm kernel (many rounds)",
    )
    ap.add_argument(
        "--crossover",
        action="store_true",
        help="torch-cpu's GEMV vs GEMM kernels per M (where the GEMM path should start)",
    )
    ap.add_argument(
        "--chunks",
        action="store_true",
        help="torch-cpu's W8A8 kernel at many rows: one fbgemm call vs row chunks",
    )
    args = ap.parse_args()
    if args.chunks:
        torch.set_num_threads((args.threads or [1])[0])
        print(chunks_table())
        return
    if args.crossover:
        torch.set_num_threads((args.threads or [1])[0])
        print(crossover_table())
        return
    if args.overhead:
        torch.set_num_threads((args.threads or [1])[0])
        print(overhead_table())
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
