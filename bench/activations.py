"""Activation quantization on a small transformer, with and without activation outlier channels.

    python bench/activations.py            # Markdown table on stdout (about 10 s on 2 cores)

The model is ``monoquant_core.testing.activation_transformer``: 2 pre-norm blocks, hidden 384,
MLP 768, on heavy-tailed hidden states (Student-t, 5 degrees of freedom). The "outliers"
variant scales 3 hidden dimensions of every LayerNorm output by 20x, 50x and 100x (as observed
in LLMs), so q/k/v and fc1 see activation outlier channels; the weights are identical. Every
Linear layer is quantized; calibration uses 16 batches of 4 x 32 tokens (seed 1), evaluation 4
other batches (seed 2). Output SQNR is against the float32 model over all evaluation outputs.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from monoquant_core import Engine, sqnr_db
from monoquant_core.testing.models import activation_batches, activation_transformer

STATIC = {"activations": "static"}
DYNAMIC = {"activations": "dynamic"}
CONFIGS = [
    ("weight-only int8 (W8A16)", {"scheme_options": {}}, False),
    ("dynamic int8, per token (W8A8)", {"scheme_options": DYNAMIC}, False),
    ("dynamic int8, per tensor", {"scheme_options": {"activations": "dynamic-tensor"}}, False),
    ("static int8, minmax", {"scheme_options": STATIC, "observer": "minmax"}, True),
    (
        "static int8, moving-average minmax (c=0.1)",
        {"scheme_options": STATIC, "observer": "minmax"},
        True,
    ),
    ("static int8, histogram", {"scheme_options": STATIC, "observer": "histogram"}, True),
    (
        "dynamic int8 + outlier (threshold 6)",
        {"scheme_options": DYNAMIC, "plugin_options": {"outlier": {"threshold": 6.0}}},
        True,
    ),
    (
        "dynamic int8 + outlier, data-free",
        {"scheme_options": DYNAMIC, "plugin_options": {"outlier": {"threshold": 6.0}}},
        False,
    ),
]


def measure(engine: Engine, outliers: bool, options: dict, calibrate: bool, label: str) -> dict:
    calib = activation_batches(16, seed=1)
    test = activation_batches(4, seed=2)
    model = activation_transformer(outliers=outliers)
    with torch.no_grad():
        ref = torch.cat([model(x) for x in test])
    opts = dict(options)
    if "moving-average" in label:
        opts["observer_options"] = {"averaging_constant": 0.1}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel, report = engine.quantize(
            model, scheme="int8", calibration=calib if calibrate else None, progress=False, **opts
        )
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        out = torch.cat([qmodel(x) for x in test])
    mods = report.extra.get("modules", {})
    cols = sum(m.get("outlier_columns", 0) for m in mods.values())
    total = sum(m.in_features for m in qmodel.modules() if hasattr(m, "in_features"))
    return {
        "sqnr": sqnr_db(ref, out),
        "fraction": cols / total if "outlier" in label else None,
        "seconds": seconds,
    }


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    engine = Engine()
    rows = []
    for label, options, calibrate in CONFIGS:
        plain = measure(engine, False, options, calibrate, label)
        outl = measure(engine, True, options, calibrate, label)
        fracs = " / ".join(
            "-" if r["fraction"] is None else f"{100 * r['fraction']:.2f}%" for r in (plain, outl)
        )
        rows.append(f"| {label} | {plain['sqnr']:.2f} | {outl['sqnr']:.2f} | {fracs} |")
    print(
        "| configuration | output SQNR, no outliers (dB) | output SQNR, outlier channels (dB) "
        "| float16 input columns (no outliers / outliers) |"
    )
    print("|---|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
