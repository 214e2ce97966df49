"""The sensitivity table of the ``sensitivity`` plugin: per selected weight and candidate
scheme, the stored bits per weight, the weight SQNR and (with data) the model's output SQNR
with only that layer quantized (see :mod:`monoquant_plugins.sensitivity`).

A candidate is a scheme with options, and may mark plugins that act per module
(``int4-g128+outlier``: the ``outlier`` plugin keeps the inputs' salient columns in float16).
A plain candidate is quantized with the scheme alone (``run.quantize_weight``); a marked one as
``quantize`` will quantize it (:class:`Quantizer`): a trial copy of the plan entry with that
scheme and the marks (``entry.options[PLUGIN]``, as a rule's ``+PLUGIN`` sets them), whose
collectors of the marked plugins saw the data, through the ``monoquant_quantize_weights``
hooks of the core, the scheme's plugin and the marked plugins only. Run-wide plugins (``gptq``)
take part in no candidate's measurement: the table measures round-to-nearest schemes.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monoquant_core import Engine, MonoQuantError, UsageError
from monoquant_core.batches import iter_batches
from monoquant_core.metrics import sqnr_db
from monoquant_core.options import plugin_mark
from monoquant_core.tables import format_table

from .sensitivity_replay import Replay

__all__ = [
    "DEFAULT_CANDIDATES",
    "Candidate",
    "Quantizer",
    "cli_candidates",
    "configs",
    "measure",
    "measure_entries",
    "measure_tensors",
    "parse_candidates",
    "render",
]


@dataclass(frozen=True)
class Candidate:
    """One scheme with options, and plugin marks: ``label`` as given
    (``int4-group:group_size=32``, ``int4-g128+outlier``); ``marks``: plugin name -> the
    options given for it (validated, defaults filled in, by :func:`configs`)."""

    label: str
    scheme: str
    options: dict[str, Any] = field(default_factory=dict)
    marks: dict[str, dict[str, Any]] = field(default_factory=dict)


DEFAULT_CANDIDATES = ("fp16", "int8", "int4-g32", "int4-g64", "int4-g128")


def parse_candidates(specs: tuple[str, ...] | list[str]) -> list[Candidate]:
    """``SCHEME[:KEY=VALUE,...][+PLUGIN[:KEY=VALUE,...]]...`` each (values as in
    ``--scheme-opt``: ints, floats, bools, strings); ``int4-gN`` is short for
    ``int4-group:group_size=N`` and ``int4-sN`` for ``int4-group:group_size=N,symmetric=true``
    (and stay their labels); ``+PLUGIN`` marks the plugin (``+outlier``), with its options
    after a colon."""
    out = []
    for label in specs:
        spec, *marked = label.split("+")
        if spec.startswith("int4-g") and spec[6:].isdigit():
            spec = f"int4-group:group_size={spec[6:]}"
        elif spec.startswith("int4-s") and spec[6:].isdigit():
            spec = f"int4-group:group_size={spec[6:]},symmetric=true"
        scheme, _, rest = spec.partition(":")
        marks = {}
        for m in marked:
            name, _, mrest = m.partition(":")
            if not name.strip():
                raise UsageError(
                    f"candidate {label!r}: a '+' names no plugin",
                    "write e.g. int4-g128+outlier or int4-g128+outlier:max_fraction=0.02",
                )
            marks[name.strip()] = _options(label, mrest)
        out.append(Candidate(label, scheme.strip(), _options(label, rest), marks))
    if not out:
        raise UsageError("no candidate schemes", f"pass e.g. {','.join(DEFAULT_CANDIDATES[:2])}")
    return out


def _options(label: str, text: str) -> dict[str, Any]:
    opts: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise UsageError(
                f"candidate {label!r}: {part!r} is not KEY=VALUE",
                "write candidates as SCHEME or SCHEME:KEY=VALUE,KEY=VALUE",
            )
        opts[key.strip()] = _value(value.strip())
    return opts


def _value(text: str) -> Any:
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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
    replay: bool = True,
    **plan_options: Any,
) -> dict[str, Any]:
    """The sensitivity table of ``model`` (see the module docstring); ``plan_options`` go to
    ``engine.plan`` (``only=``, ``skip=``, ``rules=``) to choose the layers. ``replay=False``
    runs every measurement as a full forward pass (same numbers, slower; see
    :mod:`monoquant_plugins.sensitivity_replay`)."""
    config = engine.configure(**plan_options)
    plan = engine.plan(model, config=config)
    with engine.run(config) as run:
        return measure_entries(run, model, plan.selected, data, candidates, replay)


def measure_entries(
    ctx: Any,
    model: nn.Module,
    entries: list[Any],
    data: Any = None,
    candidates: list[Candidate] | None = None,
    replay: bool = True,
    quantizer: Quantizer | None = None,
) -> dict[str, Any]:
    """:func:`measure` for given plan entries of a run (``ctx``); ``quantizer``: how the
    candidates are quantized (default: a :class:`Quantizer` for these)."""
    cands = candidates or parse_candidates(DEFAULT_CANDIDATES)
    quantizer = quantizer or Quantizer(ctx, cands, model, entries, data)
    batches = list(iter_batches(data)) if data is not None else []
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    rows = []
    try:
        targets = {e.name: [getattr(model.get_submodule(e.name), p) for p in e.params]
                   for e in entries}  # fmt: skip
        runs = Replay(model, batches, targets, replay) if batches else None
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
                    row["candidates"][c.label] = _one(quantizer, c.label, param, w, axis,
                                                      name, runs, entry.name, pname)  # fmt: skip
                rows.append(row)
    finally:
        model.train(was_training)
    rows.sort(key=lambda r: _sort_key(r, cands))
    return {
        "candidates": [c.label for c in cands],
        "batches": len(batches),
        "replay": runs.note if runs else "no data",
        "layers": rows,
        "seconds": time.perf_counter() - t0,
    }


def measure_tensors(
    ctx: Any,
    entries: list[Any],
    read: Callable[[str], torch.Tensor],
    candidates: list[Candidate] | None = None,
) -> dict[str, Any]:
    """Data-free :func:`measure` of checkpoint tensors: ``entries`` are checkpoint-mode plan
    entries (named by tensor), each read with ``read(name)`` one at a time and quantized along
    axis 0 as checkpoint mode does; the table holds bits per weight and weight SQNR.
    Candidates marking plugins (``+PLUGIN``) act on modules, which a checkpoint has none of:
    they are listed with that reason."""
    cands = candidates or parse_candidates(DEFAULT_CANDIDATES)
    quantizer = Quantizer(ctx, cands)
    t0 = time.perf_counter()
    rows = []
    for entry in entries:
        w = read(entry.name)
        row: dict[str, Any] = {"name": entry.name, "shape": list(w.shape), "candidates": {}}
        for c in cands:
            row["candidates"][c.label] = _one(quantizer, c.label, None, w, 0, entry.name,
                                              None, entry.name, "")  # fmt: skip
        rows.append(row)
        del w
    rows.sort(key=lambda r: _sort_key(r, cands))
    return {
        "candidates": [c.label for c in cands],
        "batches": 0,
        "replay": "no data",
        "layers": rows,
        "seconds": time.perf_counter() - t0,
    }


def configs(ctx: Any, candidates: list[Candidate] | None) -> tuple[list[Candidate], dict]:
    """The candidates (the defaults for ``None``) and, by label, ``(observer, scheme config,
    observer config, marks)``: how each is quantized (``marks``: plugin name -> its options,
    validated by the plugin's options class, defaults filled in)."""
    cands = candidates or parse_candidates(DEFAULT_CANDIDATES)
    configs = {}
    for c in cands:
        observer = ctx.schemes.get(c.scheme).default_observer
        configs[c.label] = (
            observer,
            ctx.scheme_config(c.scheme, c.options),
            ctx.observers.get(observer).config_class(),
            {
                name: plugin_mark(ctx.registries.options, name, opts, f"candidate {c.label!r}: ")
                for name, opts in c.marks.items()
            },
        )
    return cands, configs


class Quantizer:
    """Each candidate's QTensor of a weight, as the table (and the in-context correction)
    measure it: a plain candidate with ``ctx.quantize_weight``; a candidate marking plugins
    through the quantize hooks of the core, its scheme's plugin and the marked plugins, on a
    trial entry per module whose marked plugins' collectors saw ``data`` (one calibration
    pass per such candidate, on first use; see the module docstring)."""

    def __init__(self, ctx: Any, cands: list[Candidate], model: nn.Module | None = None,
                 entries: Any = (), data: Any = None) -> None:  # fmt: skip
        self.ctx, self.model, self.data = ctx, model, data
        self.cands = {c.label: c for c in cands}
        self.cfgs = configs(ctx, cands)[1]
        self.entries = {e.name: e for e in entries}
        self._trials: dict[str, dict[str, Any]] = {}

    def qtensor(self, label: str, w: torch.Tensor, axis: int, name: str, module: str = "",
                pname: str = "") -> Any:  # fmt: skip
        """``w`` (the float value of ``module``'s parameter ``pname``) quantized as ``label``."""
        c = self.cands[label]
        observer, scheme_cfg, observer_cfg, marks = self.cfgs[label]
        if not marks:
            return self.ctx.quantize_weight(w, c.scheme, observer, axis, scheme_cfg,
                                            observer_cfg, name)  # fmt: skip
        if self.model is None or module not in self.entries:
            raise UsageError(
                f"+{next(iter(marks))} acts on the model's modules, and this pass has none "
                "(checkpoint mode)",
                "use candidates without +PLUGIN for a checkpoint",
            )
        trial = self._trial(label, c, observer, marks)[module]
        mod = self.model.get_submodule(module)
        param = getattr(mod, pname)
        with torch.no_grad():
            saved = None if torch.equal(param, w) else param.detach().clone()
            if saved is not None:
                param.data.copy_(w)
            try:
                res = self.ctx.call("monoquant_quantize_weights", self._plugins(c, marks),
                                    entry=trial, module=mod)  # fmt: skip
            finally:
                if saved is not None:
                    param.data.copy_(saved)
        return res.qtensors[pname]

    def dequantized(self, label: str, w: torch.Tensor, axis: int, name: str, module: str = "",
                    pname: str = "") -> tuple[Any, torch.Tensor]:  # fmt: skip
        """``(qtensor, its float value in w's dtype and shape)``."""
        qt = self.qtensor(label, w, axis, name, module, pname)
        scheme = self.ctx.schemes.get(self.cands[label].scheme)
        wq = scheme.dequantize(qt.without_float_columns()).reshape(w.shape)
        if qt.has_float_columns:
            wq = wq.clone()
            wq[:, qt.extra["float_cols"]] = qt.extra["float_values"].to(wq.dtype)
        return qt, wq.to(w.dtype)

    def _plugins(self, c: Candidate, marks: dict) -> tuple[str, ...]:
        return ("core", self.ctx.schemes.entry(c.scheme).plugin, *marks)

    def _trial(self, label: str, c: Candidate, observer: str, marks: dict) -> dict[str, Any]:
        if label not in self._trials:
            options = {"scheme_options": dict(c.options), **{k: dict(v) for k, v in marks.items()}}
            trials = {
                name: dataclasses.replace(e, scheme=c.scheme, observer=observer, notes=[],
                                          collected={}, calibration_rows=None,
                                          options=dict(options))
                for name, e in self.entries.items()
            }  # fmt: skip
            if self.data is not None:
                self.ctx.calibrate(self.model, list(trials.values()), self.data,
                                   self._plugins(c, marks))  # fmt: skip
            self._trials[label] = trials
        return self._trials[label]


def _one(quantizer, label, param, w, axis, name, runs, target, pname) -> dict[str, Any]:
    try:
        qt, wq = quantizer.dequantized(label, w, axis, name, target, pname)
    except MonoQuantError as e:
        return {"error": getattr(e, "problem", str(e))}
    out: dict[str, Any] = {
        "bits_per_weight": 8 * qt.nbytes / w.numel(),
        "weight_sqnr_db": sqnr_db(w, wq),
    }
    if runs is not None:
        with torch.no_grad():
            param.data.copy_(wq)
            try:
                out["output_sqnr_db"] = _output_sqnr(runs.reference, runs.outputs(target))
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


def cli_candidates(text: str) -> list[str]:
    """Comma-separated candidates; options inside one candidate are separated by ``;``."""
    return [p.strip().replace(";", ",") for p in text.split(",") if p.strip()]
