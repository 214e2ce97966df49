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
Each measurement runs from its layer onward, the float model's earlier module outputs replayed
(:mod:`.sensitivity_replay`; the same numbers as full forward passes).

``monoquant sensitivity CHECKPOINT`` (a safetensors file or folder, no model) is data-free: the
tensors checkpoint mode would select, read one at a time, with their weight SQNRs
(:func:`measure_tensors`). The allocation (``monoquant_modify_plan``) works from the same
table in checkpoint mode when the run gives the plan hook the tensors (``run.read_tensor``),
and runs before the other plugins' plan hooks, so ``gptq`` quantizes each layer at its
allocated scheme.
"""

from __future__ import annotations

import glob
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass

import click
import torch

from monoquant_core import PluginOptions, UsageError, hookimpl
from monoquant_core.batches import iter_batches

from .safetensors_io import SafetensorsReader, is_safetensors
from .sensitivity_allocate import EXACT_STEPS, allocate, tradeoff
from .sensitivity_html import add_to_report, html_report
from .sensitivity_refine import refine
from .sensitivity_table import (
    DEFAULT_CANDIDATES,
    Candidate,
    Quantizer,
    cli_candidates,
    configs,
    measure,
    measure_entries,
    measure_tensors,
    parse_candidates,
    render,
)

__all__ = [
    "ALLOCATION_CANDIDATES",
    "DEFAULT_CANDIDATES",
    "EXACT_STEPS",
    "Candidate",
    "SensitivityOptions",
    "allocate",
    "html_report",
    "measure",
    "measure_entries",
    "measure_tensors",
    "parse_candidates",
    "render",
    "tradeoff",
]


#: the allocator's default candidates: int8, asymmetric int4 groups of 32/64/128 (5.0, 4.5,
#: 4.25 bits/weight), symmetric ones of 64/128 (4.25, 4.125: cheaper steps, so a budget below
#: g64's 4.5 still has choices), and g128/g64/s128 with the 1% of input columns that see the
#: largest inputs in float16 (``+outlier``: about 0.1-0.2 more bits per weight; the steps
#: between int4 and int8 that let a budget of 4.5 beat uniform g32's 5.0;
#: docs/mixed-precision.md measures what each adds). Marks act on modules: checkpoint mode
#: (data-free, no modules) leaves the marked candidates out.
ALLOCATION_CANDIDATES = (
    "int8,int4-g32,int4-g64,int4-g128,int4-s64,int4-s128,"
    "int4-g128+outlier,int4-g64+outlier,int4-s128+outlier"
)


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
            ``SCHEME:KEY=VALUE;KEY=VALUE``), each optionally marking a plugin that acts per
            module (``int4-g128+outlier``; its options after a colon).
        save_rules: also write the choice as a rules file (JSON) here, so ``--rules FILE``
            repeats the run without the sensitivity pass.
        method: ``greedy`` (default) or ``exact`` (:func:`allocate`).
        replay: measure each layer from that layer onward, replaying the float model's
            earlier module outputs (same numbers; ``False``: full forward passes; see
            :mod:`monoquant_plugins.sensitivity_replay`).
        refine: with calibration data and a budget, rounds of correcting the allocation by
            measuring its layers in context (each about one more sensitivity pass; default
            ``0``: on all-MiniLM-L6-v2 no round measured better, docs/mixed-precision.md; see
            :mod:`monoquant_plugins.sensitivity_refine`). The chosen mix's output SQNR on the
            calibration data is measured either way.
    """

    budget: float | None = None
    target_sqnr: float | None = None
    candidates: str = ALLOCATION_CANDIDATES
    save_rules: str | None = None
    method: str = "greedy"
    replay: bool = True
    refine: int = 0

    def __post_init__(self) -> None:
        if self.refine < 0:
            raise ValueError(f"refine {self.refine} is not a number of rounds (0 or more)")
        if self.method not in ("greedy", "exact"):
            raise ValueError(f"method {self.method!r} is not greedy or exact")
        if (self.budget is None) == (self.target_sqnr is None):
            raise ValueError("give exactly one of budget (bits per weight) or target_sqnr (dB)")
        if self.budget is not None and not (math.isfinite(self.budget) and self.budget > 0):
            raise ValueError(f"budget {self.budget} is not a positive number of bits per weight")
        if self.target_sqnr is not None and not math.isfinite(self.target_sqnr):
            raise ValueError(f"target_sqnr {self.target_sqnr} is not a number of dB")
        parse_candidates(cli_candidates(self.candidates))


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


@hookimpl(tryfirst=True)  # first: other plugins (gptq) see the allocated schemes
def monoquant_modify_plan(plan, model, run):
    opts = run.options("sensitivity")
    if opts is None:
        return
    cands = parse_candidates(cli_candidates(opts.candidates))
    data = run.calibration
    if data is not None and not isinstance(data, (torch.Tensor, Mapping)) and iter(data) is data:
        raise UsageError(
            f"the calibration data is a one-shot iterator ({type(data).__name__}): the "
            "sensitivity pass would use it up before calibration runs",
            "pass a list of batches (list(...)) or a DataLoader",
        )
    if model is not None:
        quantizer = Quantizer(run, cands, model, plan.selected, run.calibration)
        table = measure_entries(run, model, plan.selected, run.calibration, cands, opts.replay,
                                quantizer)  # fmt: skip
        weights = {e.name: [f"{e.name}.{p}" if e.name else p for p in e.params]
                   for e in plan.selected}  # fmt: skip
        res = allocate(table, opts.budget, opts.target_sqnr, opts.method)
        if table["batches"]:  # measure the mix (and correct it: ``refine`` rounds)
            batches = list(iter_batches(run.calibration))
            res = refine(run, model, plan.selected, batches, table, quantizer, res,
                         opts.budget, opts.method, opts.refine, opts.replay)  # fmt: skip
    elif run.read_tensor is not None:  # checkpoint mode: data-free, from the tensors
        cands = [c for c in cands if not c.marks] or cands  # marks act on modules
        table = measure_tensors(run, plan.selected, run.read_tensor, cands)
        weights = {e.name: [e.name] for e in plan.selected}
        res = allocate(table, opts.budget, opts.target_sqnr, opts.method)
    else:
        raise UsageError(
            "the sensitivity allocation needs the model or the checkpoint's tensors, and this "
            "run gives it neither",
            "quantize in module mode: --model PKG.MODULE:FACTORY --weights FILE (or --demo)",
        )
    _apply(plan, run, opts, table, weights, {c.label: c for c in cands}, res)


def _apply(plan, run, opts, table, weights, by_label, res) -> None:
    """The allocator's choice into the plan (scheme, observer, options, a note each), the
    run's state and the rules file."""
    rows = {r["name"]: r for r in table["layers"]}
    cfgs = configs(run, list(by_label.values()))[1]  # the marks validated, defaults filled in
    which = "output" if table["batches"] else "weight"
    goal = (f"budget {opts.budget:g}" if opts.budget is not None
            else f"target {opts.target_sqnr:g} dB")  # fmt: skip
    estimate = "estimated output SQNR" if table["batches"] else "size-weighted weight-noise SQNR"
    summary = (
        f"{goal}: {res['bits_per_weight']:.2f} bits/weight, {estimate} "
        f"{res['estimated_sqnr_db']:.1f} dB"
    )
    if "measured_sqnr_db" in res:
        summary += f", measured {res['measured_sqnr_db']:.1f} dB on the calibration data"
    rules = []
    for entry in plan.selected:
        labels = {res["choice"][n] for n in weights[entry.name] if n in res["choice"]}
        if len(labels) != 1:
            continue
        (label,) = labels
        c = by_label[label]
        entry.scheme = c.scheme
        entry.observer = run.schemes.get(c.scheme).default_observer
        entry.options["scheme_options"] = dict(c.options)
        marks = cfgs[label][3]
        entry.options.update({k: dict(v) for k, v in marks.items()})
        v = rows[weights[entry.name][0]]["candidates"][label]
        db = v.get("output_sqnr_db", v["weight_sqnr_db"])
        entry.notes.append(
            f"sensitivity: {label} ({v['bits_per_weight']:.2f} bits/weight, {which} SQNR "
            f"{db:.1f} dB alone); {summary}"
        )
        rule = {"pattern": entry.name, "scheme": c.scheme, "scheme_options": c.options}
        rules.append({**rule, "plugins": marks} if marks else rule)
    run.state["sensitivity"] = {"allocation": res, "rules": rules, "table": table}
    if opts.save_rules:
        _write_text(opts.save_rules, json.dumps(rules, indent=2) + "\n")


@hookimpl
def monoquant_report(report, run):
    """The allocation and its trade-off curve into ``report.extra["sensitivity"]`` and, drawn,
    into the ``--html`` page (:func:`.sensitivity_html.add_to_report`)."""
    state = run.state.get("sensitivity")
    if state:
        add_to_report(report, state)


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "sensitivity"


@hookimpl
def monoquant_add_cli_commands(cli, engine):
    # deferred: the CLI's model and data loaders (the same flags as quantize)
    from monoquant_core.cli.inputs import load_calibration, model_input
    from monoquant_core.cli.options import model_source_options, report_options

    @cli.command()
    @click.argument("checkpoint", required=False, metavar="[CHECKPOINT]")
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
        "size N), or SCHEME:KEY=VALUE;KEY=VALUE; a +PLUGIN suffix marks a plugin that acts per "
        "module (int4-g128+outlier: salient input columns in float16).",
    )
    @click.option("--only", multiple=True, metavar="GLOB", help="Only these modules.")
    @click.option("--skip", multiple=True, metavar="GLOB", help="Not these modules.")
    @click.option(
        "--replay/--no-replay",
        default=True,
        show_default=True,
        help="Run each measurement from its layer onward, replaying the float model's earlier "
        "module outputs (same numbers); --no-replay runs full forward passes.",
    )
    @report_options("bars, trade-off curve, table")
    def sensitivity(
        checkpoint, demo, model_spec, weights, calibration, candidates, only, skip, replay,
        as_json, html_path,
    ):  # fmt: skip
        """How much quantizing each layer costs: for every layer the plan selects and every
        candidate scheme, the bits per weight, the weight SQNR and (with --calibration) the
        model's output SQNR with only that layer quantized; most sensitive layers first.
        With a CHECKPOINT (a safetensors file or folder) instead of a model: data-free, the
        weight SQNR of every tensor quantize would select."""
        cands = parse_candidates(cli_candidates(candidates))
        if checkpoint is not None:
            if demo or model_spec or weights or calibration:
                raise UsageError(
                    f"both a CHECKPOINT ({checkpoint}) and a model or calibration data",
                    "give a CHECKPOINT (data-free) or --model/--demo with --calibration",
                )
            res = _checkpoint_table(engine, checkpoint, cands, only=only, skip=skip)
        else:
            source = model_input(demo, model_spec, weights)
            data = load_calibration(calibration) if calibration else None
            model, sample, _ = source.build()
            if data is None and sample is not None and demo:
                data = [sample]
            res = measure(engine, model, data, cands, replay, only=only, skip=skip)
        click.echo(json.dumps(res, indent=2, default=str) if as_json else render(res))
        if html_path:
            _write_text(html_path, html_report(res))


def _checkpoint_table(engine, path: str, cands: list[Candidate], **plan_options) -> dict:
    """The data-free table of a safetensors file or folder: the tensors the checkpoint-mode
    plan selects, read one at a time."""
    plan = engine.plan_checkpoint(path, **plan_options)
    files = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*")))
    readers = [SafetensorsReader(f) for f in files if os.path.isfile(f) and is_safetensors(f)]
    try:
        where = {n: r for r in readers for n in r.entries}
        missing = [e.name for e in plan.selected if e.name not in where]
        if missing:
            raise UsageError(
                f"{path}: {missing[0]!r} is not in a safetensors file",
                "give a .safetensors file or a folder of them (convert a .pt with monoquant "
                "quantize's --format, or load it in Python)",
            )
        return measure_tensors(engine, plan.selected, lambda n: where[n].get(n), cands)
    finally:
        for r in readers:
            r.close()
