"""``sensitivity`` plugin: what quantizing each layer costs, per candidate scheme.

``monoquant sensitivity`` (and :func:`measure` from Python) takes every weight the default plan
selects and, for each candidate (by default ``fp16``, ``int8``, ``int4-group`` with group sizes
32, 64 and 128), quantizes it the way ``quantize`` would (the candidate scheme's default
observer and options), and reports:

* ``bits/weight``: as stored (codes, scales and zero points);
* ``weight SQNR``: the dequantized weight against the float one;
* with data (``--calibration``, the ``quantize`` formats): ``output SQNR``, the model's output
  against the float model's when only that layer holds that candidate's dequantized weight,
  every other layer in float (plain forward passes: any ``nn.Module``).

Rows are sorted by sensitivity: the lowest output SQNR of the cheapest candidate first (the
weight SQNR without data). A candidate a layer cannot take (a group size larger than its
inputs, a weight the scheme cannot store) is listed with the reason. The weights are
swapped in place and restored exactly after each measurement; the model is never replaced.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import click
import torch
from torch import nn

from monoquant_core import Engine, MonoQuantError, PluginOptions, UsageError, hookimpl
from monoquant_core.batches import iter_batches
from monoquant_core.metrics import sqnr_db
from monoquant_core.tables import format_table

__all__ = [
    "DEFAULT_CANDIDATES",
    "Candidate",
    "SensitivityOptions",
    "allocate",
    "measure",
    "measure_entries",
    "parse_candidates",
    "render",
]


@dataclass(frozen=True)
class Candidate:
    """One scheme with options: ``label`` as given (``int4-group:group_size=32``)."""

    label: str
    scheme: str
    options: dict[str, Any] = field(default_factory=dict)


DEFAULT_CANDIDATES = ("fp16", "int8", "int4-g32", "int4-g64", "int4-g128")


def parse_candidates(specs: tuple[str, ...] | list[str]) -> list[Candidate]:
    """``SCHEME[:KEY=VALUE,...]`` each (values as in ``--scheme-opt``: ints, floats, bools,
    strings); ``int4-gN`` is short for ``int4-group:group_size=N`` (and stays its label)."""
    out = []
    for spec in specs:
        label = spec
        if spec.startswith("int4-g") and spec[6:].isdigit():
            spec = f"int4-group:group_size={spec[6:]}"
        scheme, _, rest = spec.partition(":")
        opts: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in rest.split(","))):
            key, eq, value = part.partition("=")
            if not eq or not key.strip():
                raise UsageError(
                    f"candidate {spec!r}: {part!r} is not KEY=VALUE",
                    "write candidates as SCHEME or SCHEME:KEY=VALUE,KEY=VALUE",
                )
            opts[key.strip()] = _value(value.strip())
        out.append(Candidate(label, scheme.strip(), opts))
    if not out:
        raise UsageError("no candidate schemes", f"pass e.g. {','.join(DEFAULT_CANDIDATES[:2])}")
    return out


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _outputs(model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    outs = []
    with torch.no_grad():
        for args, kwargs in batches:
            outs.append(_flat(model(*args, **kwargs)))
    return outs


def _flat(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.detach().reshape(-1).to(torch.float64)
    if isinstance(out, dict):
        out = list(out.values())
    elif hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        parts = [_flat(v) for v in out if isinstance(v, (torch.Tensor, tuple, list, dict))]
        return torch.cat([p for p in parts if p.numel()]) if parts else torch.zeros(0)
    return torch.zeros(0, dtype=torch.float64)


def _output_sqnr(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    num = sum(float((r * r).sum()) for r in ref)
    den = sum(float(((g - r) ** 2).sum()) for r, g in zip(ref, got, strict=True))
    if not math.isfinite(den):
        return float("nan")
    return float("inf") if den == 0 else 10 * math.log10(num / den) if num > 0 else -math.inf


def measure(
    engine: Engine,
    model: nn.Module,
    data: Any = None,
    candidates: list[Candidate] | None = None,
    **plan_options: Any,
) -> dict[str, Any]:
    """The sensitivity table of ``model`` (see the module docstring); ``plan_options`` go to
    ``engine.plan`` (``only=``, ``skip=``, ``rules=``) to choose the layers."""
    plan = engine.plan(model, **plan_options)
    return measure_entries(engine, model, plan.selected, data, candidates)


def measure_entries(
    ctx: Any,
    model: nn.Module,
    entries: list[Any],
    data: Any = None,
    candidates: list[Candidate] | None = None,
) -> dict[str, Any]:
    """:func:`measure` for given plan entries; ``ctx`` is an :class:`~monoquant_core.Engine`
    or a run (both have ``scheme_config``, ``quantize_weight`` and the registries)."""
    cands = candidates or parse_candidates(DEFAULT_CANDIDATES)
    configs = {}
    for c in cands:
        observer = ctx.schemes.get(c.scheme).default_observer
        configs[c.label] = (
            observer,
            ctx.scheme_config(c.scheme, c.options),
            ctx.observers.get(observer).config_class(),
        )
    batches = list(iter_batches(data)) if data is not None else []
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    ref = _outputs(model, batches) if batches else []
    rows = []
    try:
        for entry in entries:
            module = model.get_submodule(entry.name)
            replacer = ctx.replacers.for_type(type(module)).component
            for pname in entry.params:
                param = getattr(module, pname)
                w = param.detach().clone()
                axis = replacer.channel_axis(module, pname)
                name = f"{entry.name}.{pname}" if entry.name else pname
                row: dict[str, Any] = {"name": name, "shape": list(w.shape), "candidates": {}}
                for c in cands:
                    row["candidates"][c.label] = _one(ctx, configs[c.label], c, param, w, axis,
                                                      name, batches, ref, model)  # fmt: skip
                rows.append(row)
    finally:
        model.train(was_training)
    rows.sort(key=lambda r: _sort_key(r, cands))
    return {
        "candidates": [c.label for c in cands],
        "batches": len(batches),
        "layers": rows,
        "seconds": time.perf_counter() - t0,
    }


def _one(ctx, cfg, c, param, w, axis, name, batches, ref, model) -> dict[str, Any]:
    observer, scheme_cfg, observer_cfg = cfg
    try:
        qt = ctx.quantize_weight(w, c.scheme, observer, axis, scheme_cfg, observer_cfg, name)
    except MonoQuantError as e:
        return {"error": getattr(e, "problem", str(e))}
    scheme = ctx.schemes.get(c.scheme)
    wq = scheme.dequantize(qt).to(w.dtype).reshape(w.shape)
    out: dict[str, Any] = {
        "bits_per_weight": 8 * qt.nbytes / w.numel(),
        "weight_sqnr_db": sqnr_db(w, wq),
    }
    if batches:
        with torch.no_grad():
            param.data.copy_(wq)
            try:
                out["output_sqnr_db"] = _output_sqnr(ref, _outputs(model, batches))
            finally:
                param.data.copy_(w)
    return out


def _sort_key(row: dict[str, Any], cands: list[Candidate]) -> tuple[float, str]:
    """Most sensitive first: the cheapest candidate that applies, by output SQNR (else the
    weight SQNR), ascending."""
    usable = [v for v in row["candidates"].values() if "error" not in v]
    if not usable:
        return (math.inf, row["name"])
    cheapest = min(usable, key=lambda v: v["bits_per_weight"])
    score = cheapest.get("output_sqnr_db", cheapest["weight_sqnr_db"])
    return (score if math.isfinite(score) else math.inf, row["name"])


def render(res: dict[str, Any]) -> str:
    """The table: one row per layer, per candidate ``bits | output (or weight) SQNR``."""
    which = "output SQNR dB" if res["batches"] else "weight SQNR dB"
    head = ["layer", *res["candidates"]]
    rows = []
    for r in res["layers"]:
        cells = [r["name"]]
        for c in res["candidates"]:
            v = r["candidates"][c]
            if "error" in v:
                cells.append("n/a")
                continue
            db = v.get("output_sqnr_db", v["weight_sqnr_db"])
            cells.append(f"{v['bits_per_weight']:.2f}, {db:.1f}")
        rows.append(cells)
    notes = [
        f"{r['name']} / {c}: {r['candidates'][c]['error']}"
        for r in res["layers"]
        for c in res["candidates"]
        if "error" in r["candidates"][c]
    ]
    tail = (
        f"cells: bits per weight, {which} with only that layer quantized; "
        f"{len(res['layers'])} weights, most sensitive first; "
        + (f"{res['batches']} batch(es) of data" if res["batches"] else "no data: weight SQNR only")
        + f"; {res['seconds']:.1f} s"
    )
    return "\n".join([format_table(head, rows), *notes, tail])


@dataclass(frozen=True)
class SensitivityOptions(PluginOptions):
    """Mixed precision under a bit budget: every selected weight gets the candidate scheme the
    allocator picks from its sensitivity (output SQNR with calibration data, else weight SQNR).

    Attributes:
        budget: average bits per weight over the selected weights, scales and zero points
            included (e.g. 4.5).
        target_sqnr: instead of a budget: the fewest bits whose estimated output SQNR (dB)
            reaches this.
        candidates: the schemes to choose from, comma-separated (``int8``, ``int4-gN``,
            ``SCHEME:KEY=VALUE;KEY=VALUE``).
        save_rules: also write the choice as a rules file (JSON) here, so ``--rules FILE``
            repeats the run without the sensitivity pass.
        method: ``greedy`` (default) or ``exact`` (:func:`allocate`).
    """

    budget: float | None = None
    target_sqnr: float | None = None
    candidates: str = "int8,int4-g32,int4-g64,int4-g128"
    save_rules: str | None = None
    method: str = "greedy"

    def __post_init__(self) -> None:
        if self.method not in ("greedy", "exact"):
            raise ValueError(f"method {self.method!r} is not greedy or exact")
        if (self.budget is None) == (self.target_sqnr is None):
            raise ValueError("give exactly one of budget (bits per weight) or target_sqnr (dB)")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"budget {self.budget} is not a positive number of bits per weight")
        if self.target_sqnr is not None and not math.isfinite(self.target_sqnr):
            raise ValueError(f"target_sqnr {self.target_sqnr} is not a number of dB")
        parse_candidates(_cli_candidates(self.candidates))


def _options_of(row: dict[str, Any], numel: int) -> list[tuple[float, float, str]]:
    """``(bits, noise, label)`` per usable candidate, noise = 10^(-SQNR/10) (output noise
    power relative to the signal; the layers' noises add up approximately)."""
    out = []
    for label, v in row["candidates"].items():
        if "error" in v:
            continue
        db = v.get("output_sqnr_db", v["weight_sqnr_db"])
        noise = 0.0 if db == math.inf else 10 ** (-db / 10) if math.isfinite(db) else math.inf
        out.append((v["bits_per_weight"] * numel, noise, label))
    return sorted(out)


#: bits-axis resolution of the exact allocator: the budget in this many steps (each option's
#: bits rounded up to a step, so the choice never exceeds the budget)
EXACT_STEPS = 4000


def allocate(
    table: dict[str, Any],
    budget: float | None = None,
    target_sqnr: float | None = None,
    method: str = "greedy",
) -> dict[str, Any]:
    """Choose one candidate per layer of a :func:`measure` table, minimising the estimated
    output noise (``sum 10^(-SQNR/10)`` over layers) under the budget (average bits per
    weight), or the bits needed to reach ``target_sqnr``.

    ``method="greedy"``: from the cheapest candidate of every layer, repeatedly take the
    upgrade that removes the most noise per added bit while it fits. ``"exact"``: a
    multiple-choice knapsack solved by dynamic programming over the budget in
    :data:`EXACT_STEPS` steps (a target: the smallest budget, by bisection, whose optimum
    reaches it).

    Returns ``{"choice": {weight name: label}, "bits_per_weight", "estimated_sqnr_db"}``.
    """
    if method not in ("greedy", "exact"):
        raise UsageError(f"allocation method {method!r}", "use greedy or exact")
    if method == "exact":
        return _allocate_exact(table, budget, target_sqnr)
    layers = _layers(table)
    total = sum(n for _, n, _ in layers)
    pick = {name: 0 for name, _, _ in layers}
    bits = sum(opts[0][0] for _, _, opts in layers)
    noise = sum(opts[0][1] for _, _, opts in layers)
    if budget is not None and bits > budget * total * (1 + 1e-9):
        raise UsageError(
            f"budget {budget:g} bits/weight is below the cheapest candidates' {bits / total:.2f}",
            "raise --sensitivity-budget, or add a cheaper candidate",
        )

    def done() -> bool:
        return target_sqnr is not None and _db(noise) >= target_sqnr

    while not done():
        best = None
        for name, _, opts in layers:
            b0, n0, _ = opts[pick[name]]
            for j, (b1, n1, _) in enumerate(opts):
                if b1 <= b0 or n1 >= n0:
                    continue
                if budget is not None and bits + b1 - b0 > budget * total * (1 + 1e-9):
                    continue
                gain = (n0 - n1) / (b1 - b0)
                if best is None or gain > best[0]:
                    best = (gain, name, j, b1 - b0, n1 - n0)
        if best is None:
            break
        _, name, j, db_, dn = best
        pick[name], bits, noise = j, bits + db_, noise + dn
    if target_sqnr is not None and not done():
        raise UsageError(
            f"target SQNR {target_sqnr:g} dB is out of reach: the best candidates give an "
            f"estimated {_db(noise):.1f} dB",
            "lower --sensitivity-target-sqnr, or add a more precise candidate (e.g. fp16)",
        )
    return {
        "choice": {name: opts[pick[name]][2] for name, _, opts in layers},
        "bits_per_weight": bits / total,
        "estimated_sqnr_db": _db(noise),
    }


def _layers(table: dict[str, Any]) -> list[tuple[str, int, list[tuple[float, float, str]]]]:
    out = []
    for row in table["layers"]:
        numel = math.prod(row["shape"])
        opts = _options_of(row, numel)
        if not opts:
            raise UsageError(
                f"{row['name']}: no candidate applies to it",
                "add a candidate that can store it (e.g. int8), or leave it out with --skip",
            )
        out.append((row["name"], numel, opts))
    return out


def _knapsack(layers, limit_bits: float) -> tuple[float, dict[str, int]] | None:
    """Least total noise with total bits <= ``limit_bits``: the DP on bits rounded to steps,
    its choice checked in exact bits and solved again with a tighter limit if the rounding
    let it overflow."""
    cap = limit_bits
    for _ in range(50):
        found = _knapsack_steps(layers, cap, limit_bits)
        if found is None:
            return None
        noise, choice = found
        bits = sum(opts[choice[name]][0] for name, _, opts in layers)
        if bits <= limit_bits * (1 + 1e-9):
            return noise, choice
        cap -= max(bits - limit_bits, limit_bits / EXACT_STEPS)
    return None


def _knapsack_steps(layers, cap_bits: float, limit_bits: float):
    step = limit_bits / EXACT_STEPS
    capacity = int(cap_bits / step + 1e-9)
    if capacity < 0:
        return None
    inf = math.inf
    best = [0.0] * (capacity + 1)  # best[c]: least noise of the layers so far in c steps
    picks: list[list[int]] = []
    for _, _, opts in layers:
        new = [inf] * (capacity + 1)
        arg = [-1] * (capacity + 1)
        costs = [round(b / step) for b, _, _ in opts]
        for c_all in range(capacity + 1):
            for j, (c, (_, noise, _)) in enumerate(zip(costs, opts, strict=True)):
                if c <= c_all and best[c_all - c] + noise < new[c_all]:
                    new[c_all], arg[c_all] = best[c_all - c] + noise, j
        best = new
        picks.append(arg)
    if best[capacity] == inf:
        return None
    choice, c_all = {}, capacity
    for (name, _, opts), arg in zip(reversed(layers), reversed(picks), strict=True):
        j = arg[c_all]
        choice[name] = j
        c_all -= round(opts[j][0] / step)
    return best[capacity], choice


def _allocate_exact(table, budget, target_sqnr) -> dict[str, Any]:
    layers = _layers(table)
    total = sum(n for _, n, _ in layers)
    low = sum(opts[0][0] for _, _, opts in layers)
    high = sum(max(o[0] for o in opts) for _, _, opts in layers)
    if budget is not None:
        if low > budget * total * (1 + 1e-9):
            raise UsageError(
                f"budget {budget:g} bits/weight is below the cheapest candidates' "
                f"{low / total:.2f}",
                "raise --sensitivity-budget, or add a cheaper candidate",
            )
        found = _knapsack(layers, budget * total)
        if found is None:  # rounding to steps: the cheapest choice is always feasible
            found = (0.0, {name: 0 for name, _, _ in layers})
    else:
        target = 10 ** (-target_sqnr / 10)
        top = _knapsack(layers, high * (1 + 1e-6))
        if top is None or top[0] > target:
            best_db = _db(min(sum(min(o[1] for o in opts) for _, _, opts in layers), math.inf))
            raise UsageError(
                f"target SQNR {target_sqnr:g} dB is out of reach: the best candidates give an "
                f"estimated {best_db:.1f} dB",
                "lower --sensitivity-target-sqnr, or add a more precise candidate (e.g. fp16)",
            )
        lo, hi, found = low, high * (1 + 1e-6), top
        for _ in range(20):
            mid = (lo + hi) / 2
            got = _knapsack(layers, mid)
            if got is not None and got[0] <= target:
                hi, found = mid, got
            else:
                lo = mid
    _, pick = found
    bits = sum(opts[pick[name]][0] for name, _, opts in layers)
    noise = sum(opts[pick[name]][1] for name, _, opts in layers)
    return {
        "choice": {name: opts[pick[name]][2] for name, _, opts in layers},
        "bits_per_weight": bits / total,
        "estimated_sqnr_db": _db(noise),
    }


def _db(noise: float) -> float:
    return math.inf if noise <= 0 else -10 * math.log10(noise)


def tradeoff(table: dict[str, Any], points: int = 8) -> dict[str, list[tuple[float, float]]]:
    """The allocator's estimated output SQNR at budgets from the cheapest to the dearest
    choice, and each candidate used for every layer (the uniform reference points):
    ``{series: [(bits per weight, estimated SQNR dB)]}``."""
    layers = _layers(table)
    total = sum(n for _, n, _ in layers)
    low = sum(opts[0][0] for _, _, opts in layers) / total
    high = sum(max(o[0] for o in opts) for _, _, opts in layers) / total
    curve = []
    for k in range(points):
        budget = low + (high - low) * k / max(points - 1, 1)
        res = allocate(table, budget=budget)
        curve.append((res["bits_per_weight"], res["estimated_sqnr_db"]))
    out: dict[str, list[tuple[float, float]]] = {"allocator (greedy)": curve}
    for label in table["candidates"]:
        rows = [r["candidates"][label] for r in table["layers"]]
        if any("error" in v for v in rows):
            continue
        bits = sum(v["bits_per_weight"] * math.prod(r["shape"])
                   for v, r in zip(rows, table["layers"], strict=True)) / total  # fmt: skip
        noise = sum(
            10 ** (-v.get("output_sqnr_db", v["weight_sqnr_db"]) / 10)
            for v in rows
            if math.isfinite(v.get("output_sqnr_db", v["weight_sqnr_db"]))
        )
        out[f"uniform {label}"] = [(bits, _db(noise))]
    return out


def html_report(res: dict[str, Any]) -> str:
    """One self-contained HTML page of a :func:`measure` table: per-layer sensitivity bars,
    the allocator's size/accuracy trade-off curve with the uniform schemes, and the table."""
    from monoquant_core.tables import (  # deferred: only for --html
        html_heading,
        html_page,
        html_table,
        html_text,
        svg_bars,
        svg_curve,
    )

    which = "output SQNR" if res["batches"] else "weight SQNR"
    bars = []
    for r in res["layers"]:
        usable = [v for v in r["candidates"].values() if "error" not in v]
        if usable:
            cheapest = min(usable, key=lambda v: v["bits_per_weight"])
            bars.append((r["name"], cheapest.get("output_sqnr_db", cheapest["weight_sqnr_db"])))
    rows = []
    for r in res["layers"]:
        row: list[object] = [r["name"]]
        for c in res["candidates"]:
            v = r["candidates"][c]
            row += ["n/a", "n/a"] if "error" in v else [
                v["bits_per_weight"], v.get("output_sqnr_db", v["weight_sqnr_db"])]  # fmt: skip
        rows.append(row)
    headers = ["layer"] + [f"{c} {k}" for c in res["candidates"] for k in ("bits", "dB")]
    parts = [
        html_text(
            f"{len(res['layers'])} weights, {len(res['candidates'])} candidates, "
            f"{res['batches']} batch(es) of data; {which} with only that layer quantized."
        ),
        html_heading(f"Sensitivity: {which} of the cheapest candidate (lower = more sensitive)"),
        svg_bars(bars, "dB", "sensitivity"),
        html_heading("Size against estimated output SQNR: the allocator and uniform schemes"),
        svg_curve(tradeoff(res), "bits per weight", "estimated SQNR dB", "tradeoff"),
        html_heading("Every layer and candidate"),
        html_table(headers, rows, "layers"),
    ]
    return html_page("Mono Quant sensitivity", parts)


def _write_text(path: str, text: str) -> None:
    from monoquant_core.atomic import atomic_write  # deferred: only when a file is written

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)


@hookimpl
def monoquant_register_options(register):
    register(SensitivityOptions)


@hookimpl
def monoquant_add_cli_options(group):
    group.add_option(
        "--sensitivity-budget",
        type=float,
        default=None,
        help="Mixed precision: average bits per weight to spend (same as "
        "--sensitivity-opt budget=B).",
    )
    group.add_option(
        "--sensitivity-target-sqnr",
        type=float,
        default=None,
        help="Mixed precision: the fewest bits reaching this estimated output SQNR in dB.",
    )
    group.add_option(
        "--sensitivity-save-rules",
        default=None,
        help="Write the chosen schemes as a rules file (JSON) for --rules.",
    )


@hookimpl
def monoquant_modify_plan(plan, model, run):
    opts = run.options("sensitivity")
    if opts is None:
        return
    if model is None:
        raise UsageError(
            "the sensitivity allocation measures the model's layers and needs module mode",
            "pass --model PKG.MODULE:FACTORY --weights FILE (or --demo) instead of a SOURCE file",
        )
    cands = parse_candidates(_cli_candidates(opts.candidates))
    by_label = {c.label: c for c in cands}
    table = measure_entries(run, model, plan.selected, run.calibration, cands)
    res = allocate(table, opts.budget, opts.target_sqnr, opts.method)
    rows = {r["name"]: r for r in table["layers"]}
    which = "output" if table["batches"] else "weight"
    goal = (f"budget {opts.budget:g}" if opts.budget is not None
            else f"target {opts.target_sqnr:g} dB")  # fmt: skip
    estimate = "estimated output SQNR" if table["batches"] else "summed weight-noise SQNR"
    summary = (
        f"{goal}: {res['bits_per_weight']:.2f} bits/weight, {estimate} "
        f"{res['estimated_sqnr_db']:.1f} dB"
    )
    rules = []
    for entry in plan.selected:
        labels = {res["choice"][n] for n in res["choice"] if n.rsplit(".", 1)[0] == entry.name}
        if len(labels) != 1:
            continue
        (label,) = labels
        c = by_label[label]
        entry.scheme = c.scheme
        entry.observer = run.schemes.get(c.scheme).default_observer
        entry.options["scheme_options"] = dict(c.options)
        name = next(n for n in res["choice"] if n.rsplit(".", 1)[0] == entry.name)
        v = rows[name]["candidates"][label]
        db = v.get("output_sqnr_db", v["weight_sqnr_db"])
        entry.notes.append(
            f"sensitivity: {label} ({v['bits_per_weight']:.2f} bits/weight, {which} SQNR "
            f"{db:.1f} dB alone); {summary}"
        )
        rules.append({"pattern": entry.name, "scheme": c.scheme, "scheme_options": c.options})
    run.state["sensitivity"] = {"allocation": res, "rules": rules}
    if opts.save_rules:
        _write_text(opts.save_rules, json.dumps(rules, indent=2) + "\n")


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "sensitivity"


@hookimpl
def monoquant_add_cli_commands(cli, engine):
    # deferred: the CLI's model and data loaders (the same flags as quantize)
    from monoquant_core.cli.inputs import load_calibration, model_input
    from monoquant_core.cli.options import model_source_options, report_options

    @cli.command()
    @model_source_options("Import a callable that returns the nn.Module to analyse.")
    @click.option(
        "--calibration",
        metavar="FILE|PKG.MODULE:FN",
        help="Inputs to measure the model's output error with (the quantize formats); "
        "without it only the weight SQNR is measured.",
    )
    @click.option(
        "--candidates",
        default=",".join(DEFAULT_CANDIDATES),
        show_default=True,
        help="Candidate schemes, comma-separated: fp16, int8, int4-gN (int4-group with group "
        "size N), or SCHEME:KEY=VALUE;KEY=VALUE.",
    )
    @click.option("--only", multiple=True, metavar="GLOB", help="Only these modules.")
    @click.option("--skip", multiple=True, metavar="GLOB", help="Not these modules.")
    @report_options("bars, trade-off curve, table")
    def sensitivity(
        demo, model_spec, weights, calibration, candidates, only, skip, as_json, html_path
    ):
        """How much quantizing each layer costs: for every layer the plan selects and every
        candidate scheme, the bits per weight, the weight SQNR and (with --calibration) the
        model's output SQNR with only that layer quantized; most sensitive layers first."""
        cands = parse_candidates(_cli_candidates(candidates))
        source = model_input(demo, model_spec, weights)
        data = load_calibration(calibration) if calibration else None
        model, sample, _ = source.build()
        if data is None and sample is not None and demo:
            data = [sample]
        res = measure(engine, model, data, cands, only=only, skip=skip)
        click.echo(json.dumps(res, indent=2, default=str) if as_json else render(res))
        if html_path:
            _write_text(html_path, html_report(res))


def _cli_candidates(text: str) -> list[str]:
    """Comma-separated candidates; options inside one candidate are separated by ``;``."""
    return [p.strip().replace(";", ",") for p in text.split(",") if p.strip()]
