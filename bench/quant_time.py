"""How long quantizing takes, and how much memory: Mono Quant against peer libraries, one run.

    python bench/quant_time.py                  # the TinyLlama-1.1B-shaped layer set, 1 thread
    python bench/quant_time.py --layers 4       # a quarter-size quick run
    python bench/quant_time.py --threads 2
    python bench/quant_time.py --only int4 qint4  # the methods whose label contains a word

The model is TinyLlama-1.1B's Linear layers (22 decoder layers: q/o 2048x2048, k/v 256x2048,
gate/up 5632x2048, down 2048x5632; 968 M parameters, 3.9 GB in float32), seeded random
weights. Every method runs in a fresh subprocess (so peak memory is its own): build the float
model, quantize it in place (timed), then time the first forward of one token and a
steady-state one. "peak RSS over float" is the subprocess's peak resident memory minus the
float model's resident size measured just before quantizing.

Methods: Mono Quant ``int8`` (weight-only, per channel), ``int4-group`` g128 with
``method=rtn`` and with the default optimiser (``lsq``), each with the report's statistics on
(the default, ``stats=sample``) and off; peers where installed (``pip install --no-deps``):
torchao ``Int8WeightOnlyConfig`` / ``Int4WeightOnlyConfig``, optimum-quanto ``qint8`` /
``qint4`` (+ ``freeze``), bitsandbytes ``Linear8bitLt`` / ``Linear4bit``. A peer that is not
installed or cannot run on this machine is listed with the reason.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import torch
from torch import nn

LAYER = [("q", 2048, 2048), ("k", 256, 2048), ("v", 256, 2048), ("o", 2048, 2048)]
LAYER += [("gate", 5632, 2048), ("up", 5632, 2048), ("down", 2048, 5632)]

METHODS = {
    "monoquant int8": ("ours", "int8", {}, "sample"),
    "monoquant int8 (stats off)": ("ours", "int8", {}, "off"),
    "monoquant int4-group g128 rtn": ("ours", "int4-group", {"method": "rtn"}, "sample"),
    "monoquant int4-group g128 lsq (default)": ("ours", "int4-group", {}, "sample"),
    "monoquant int4-group g128 lsq (stats off)": ("ours", "int4-group", {}, "off"),
    "torchao int8 weight-only": ("torchao", "int8", {}, None),
    "torchao int4 g128": ("torchao", "int4", {}, None),
    "optimum-quanto qint8": ("quanto", "int8", {}, None),
    "optimum-quanto qint4 g128": ("quanto", "int4", {}, None),
    "bitsandbytes int8": ("bnb", "int8", {}, None),
    "bitsandbytes nf4": ("bnb", "int4", {}, None),
}


def build(layers: int) -> nn.Module:
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        for _name, n, k in LAYER:
            lin = nn.Linear(k, n, bias=False)
            with torch.no_grad():
                lin.weight.normal_(0, k**-0.5)
            mods.append(lin)
    return nn.Sequential(*mods).eval()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def quantize(kind: str, scheme: str, opts: dict, stats: str | None, model: nn.Module) -> None:
    if kind == "ours":
        from monoquant_core import Engine

        Engine().quantize(model, scheme=scheme, scheme_options=opts, stats=stats, progress=False)
    elif kind == "torchao":
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

        cfg = Int8WeightOnlyConfig() if scheme == "int8" else Int4WeightOnlyConfig(group_size=128)
        quantize_(model, cfg)
    elif kind == "quanto":
        import optimum.quanto as q

        q.quantize(model, weights=q.qint8 if scheme == "int8" else q.qint4)
        q.freeze(model)
    else:
        import bitsandbytes as bnb

        for i, lin in enumerate(model):
            if scheme == "int8":
                new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False)
                new.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False)
            else:
                new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False)
                new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False)
            model[i] = new.cpu()


def child(label: str, layers: int, threads: int) -> dict:
    """Run one method here (in the subprocess) and return its measurements."""
    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore")
    kind, scheme, opts, stats = METHODS[label]
    model = build(layers)
    base = _rss_mb()
    t0 = time.perf_counter()
    quantize(kind, scheme, opts, stats, model)
    qtime = time.perf_counter() - t0
    peak = _peak_mb() - base
    x = torch.randn(1, 2048)
    with torch.no_grad():
        t0 = time.perf_counter()
        _forward(model, x)
        first = time.perf_counter() - t0
        steady = min(_timed(lambda: _forward(model, x)) for _ in range(3))
    return {"quantize_s": qtime, "peak_mb": peak, "first_s": first, "steady_s": steady}


def _forward(model: nn.Module, x: torch.Tensor) -> None:
    """One token through every layer (the 2048- and 5632-input layers each take their width)."""
    xs = {2048: x, 5632: torch.randn(1, 5632)}
    for lin in model:
        lin(xs[lin.in_features].to(_dtype(lin)))


def _dtype(lin: nn.Module) -> torch.dtype:
    w = getattr(lin, "weight", None)
    return w.dtype if isinstance(w, torch.Tensor) and w.is_floating_point() else torch.float32


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22, help="decoder layers (22: 968 M params)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--only", nargs="*", default=None, help="run the methods whose label contains one of these"
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.threads)))
        return
    params = args.layers * sum(n * k for _, n, k in LAYER)
    print(
        f"# Quantize time (bench/quant_time.py), {params / 1e6:.0f} M parameters, "
        f"{args.threads} thread(s), torch {torch.__version__}\n"
    )
    print("| method | quantize s | peak RSS over float (MB) | first forward ms | steady ms |")
    print("|---|---|---|---|---|")
    for label in METHODS:
        if args.only and not any(o in label for o in args.only):
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--child", label]
        cmd += ["--layers", str(args.layers), "--threads", str(args.threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode or not lines:
            err = (proc.stderr.strip().splitlines() or ["failed"])[-1][:120]
            print(f"| {label} | - | - | - | - (not run: {err}) |", flush=True)
            continue
        r = json.loads(lines[-1])
        print(
            f"| {label} | {r['quantize_s']:.2f} | {r['peak_mb']:.0f} | "
            f"{r['first_s'] * 1e3:.1f} | {r['steady_s'] * 1e3:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
