"""Quantized Linear latency on a CUDA GPU: torch-cuda backend against fp16/bf16 nn.Linear.

    python bench/cuda_kernels.py            # needs a CUDA device; exits 2 without one

Linear 4096x4096 and 4096->11008 at M = 1, 8, 32, 128 tokens, bf16 activations. Each cell is
the median of 50 calls timed with CUDA events after 10 warm-up calls, in one run, with bf16
``nn.Linear`` as the baseline (speed-up = bf16 time / time). At M=1 the table also gives the
fraction of the device's memory-bandwidth limit: weight bytes / latency / copy bandwidth, the
bandwidth measured here by a device-to-device copy (bytes read + written / time).

Every quantized row also reports its relative output error against the reference backend
(dequantize + F.linear) on the same QTensor, so a fast wrong kernel cannot hide.
"""

from __future__ import annotations

import copy
import statistics
import sys

import torch
from torch import nn

from monoquant_core import Engine

METHODS = [  # label, scheme, options
    ("int8 dynamic per token (W8A8, _int_mm)", "int8", {"activations": "dynamic"}),
    ("int8 weight-only", "int8", {}),
    ("int4-group g128 (tinygemm)", "int4-group", {"group_size": 128}),
    ("int4-group g32 (tinygemm)", "int4-group", {"group_size": 32}),
    ("fp16", "fp16", {}),
]


def cuda_time(fn, calls: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(calls):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs() -> float:
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), calls=20, warmup=3)
    return 2 * src.numel() / t / 1e9


def weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values() if t.dim() >= 2)


def table(n: int, k: int, ms: list[int], bw: float) -> str:
    torch.manual_seed(0)
    base = nn.Linear(k, n, bias=False)
    rows, base_t = [], {}
    bf16 = copy.deepcopy(base).to("cuda", torch.bfloat16)
    fp16 = copy.deepcopy(base).to("cuda", torch.float16)
    variants = [("bf16 nn.Linear", bf16, None, torch.bfloat16)]
    variants.append(("fp16 nn.Linear", fp16, None, torch.float16))
    for label, scheme, opts in METHODS:
        q, _ = Engine().quantize(
            nn.Sequential(copy.deepcopy(base)), scheme=scheme, scheme_options=opts
        )
        ref, _ = Engine().quantize(
            nn.Sequential(copy.deepcopy(base)),
            scheme=scheme,
            scheme_options=opts,
            backend="reference",
        )
        ref.load_state_dict(q.state_dict())
        q, ref = q.to("cuda"), ref.to("cuda")
        ref[0].backend = Engine().backends.get("reference")
        variants.append((f"{label} [{q[0].backend.name}]", q, ref, torch.bfloat16))
    for label, mod, ref, dtype in variants:
        cells, first, err = [], None, ""
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            with torch.no_grad():
                t = cuda_time(lambda mod=mod, x=x: mod(x))
                if ref is not None and m == ms[-1]:
                    y, r = mod(x).float(), ref(x).float()
                    err = f"{((y - r).norm() / r.norm()).item():.1e}"
            base_t.setdefault(m, t)
            first = first if first is not None else t
            cells.append(f"{t * 1e6:.1f} ({base_t[m] / t:.2f}x)")
        wb = weight_bytes(mod)
        rows.append(
            f"| {label} | {wb / (n * k):.2f} | "
            + " | ".join(cells)
            + f" | {wb / first / (bw * 1e9) * 100:.0f}% | {err or '-'} |"
        )
    head = (
        "| method | bytes/weight | "
        + " | ".join(f"M={m} us (x bf16)" for m in ms)
        + " | M=1 % of BW | rel. error vs reference |"
    )
    sep = "|---|---|" + "---|" * len(ms) + "---|---|"
    return "\n".join([f"Linear {k} -> {n}", "", head, sep, *rows])


def main() -> int:
    if not torch.cuda.is_available():
        print("bench/cuda_kernels.py needs a CUDA device (torch.cuda.is_available() is False)")
        return 2
    bw = copy_bandwidth_gbs()
    print(
        f"torch {torch.__version__}, {torch.cuda.get_device_name()}, copy bandwidth {bw:.0f} GB/s\n"
    )
    for n, k in [(4096, 4096), (11008, 4096)]:
        print(table(n, k, [1, 8, 32, 128], bw), "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
