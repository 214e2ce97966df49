"""The sensitivity table of the ``sensitivity`` plugin: per selected weight and candidate
scheme, the stored bits per weight, the weight SQNR and (with data) the model's output SQNR
with only that layer quantized (see :mod:`monoquant_plugins.sensitivity`)."""

from __future__ import annotations

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
from monoquant_core.tables import format_table

from .sensitivity_replay import Replay

__all__ = [
    "DEFAULT_CANDIDATES",
    "Candidate",
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
    """One scheme with options: ``label`` as given (``int4-group:group_size=32``)."""

    label: str
    scheme: str
    options: dict[str, Any] = field(default_factory=dict)


DEFAULT_CANDIDATES = ("fp16", "int8", "int4-g32", "int4-g64", "int4-g128")


def parse_candidates(specs: tuple[str, ...] | list[str]) -> list[Candidate]:
    """``SCHEME[:KEY=VALUE,...]`` each (values as in ``--scheme-opt``: ints, floats, bools,
    strings); ``int4-gN`` is short for ``int4-group:group_size=N`` and ``int4-sN`` for
    ``int4-group:group_size=N,symmetric=true`` (and stay their labels)."""
    out = []
    for spec in specs:
        label = spec
        if spec.startswith("int4-g") and spec[6:].isdigit():
            spec = f"int4-group:group_size={spec[6:]}"
        elif spec.startswith("int4-s") and spec[6:].isdigit():
            spec = f"int4-group:group_size={spec[6:]},symmetric=true"
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
    plan = engine.plan(model, **plan_options)
    return measure_entries(engine, model, plan.selected, data, candidates, replay)


def measure_entries(
    ctx: Any,
    model: nn.Module,
    entries: list[Any],
    data: Any = None,
    candidates: list[Candidate] | None = None,
    replay: bool = True,
) -> dict[str, Any]:
    """:func:`measure` for given plan entries; ``ctx`` is an :class:`~monoquant_core.Engine`
    or a run (both have ``scheme_config``, ``quantize_weight`` and the registries)."""
    cands, cfgs = configs(ctx, candidates)
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
                    row["candidates"][c.label] = _one(ctx, cfgs[c.label], c, param, w, axis,
                                                      name, runs, entry.name)  # fmt: skip
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
    axis 0 as checkpoint mode does; the table holds bits per weight and weight SQNR."""
    cands, cfgs = configs(ctx, candidates)
    t0 = time.perf_counter()
    rows = []
    for entry in entries:
        w = read(entry.name)
        row: dict[str, Any] = {"name": entry.name, "shape": list(w.shape), "candidates": {}}
        for c in cands:
            row["candidates"][c.label] = _one(ctx, cfgs[c.label], c, None, w, 0, entry.name,
                                              None, entry.name)  # fmt: skip
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
    observer config)``: how each is quantized."""
    cands = candidates or parse_candidates(DEFAULT_CANDIDATES)
    configs = {}
    for c in cands:
        observer = ctx.schemes.get(c.scheme).default_observer
        configs[c.label] = (
            observer,
            ctx.scheme_config(c.scheme, c.options),
            ctx.observers.get(observer).config_class(),
        )
    return cands, configs


def _one(ctx, cfg, c, param, w, axis, name, runs, target) -> dict[str, Any]:
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
