"""Correcting an allocation of the ``sensitivity`` plugin by measuring it in context.

The allocator (:mod:`.sensitivity_allocate`) adds up per-layer output noises measured one
layer at a time around the float model. The noises of several quantized layers do not add
exactly: a layer's error passes through the other layers' errors (and through normalisations
and softmaxes that react to them). With calibration data the plugin therefore measures the
chosen mix itself and corrects it (:func:`refine`):

1. every selected weight is set to its allocated candidate (dequantized) and the model's output
   noise on the calibration batches is measured (the *measured* output SQNR, reported next to
   the estimate);
2. each weight is then set, one at a time, to each of its other candidates while every other
   weight keeps its allocated one, and the output noise is measured again: the change from the
   mix is that layer's noise *in context* (the forward passes replay the mix's earlier module
   outputs, :mod:`.sensitivity_replay`);
3. the allocator solves again on these changes (same budget, same method), the new mix is
   measured, and it is kept only when its measured noise is lower than the old one's.

A round costs about one more sensitivity pass (the candidates are quantized again; nothing is
kept between passes but a float copy of the selected weights, to restore them exactly).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .sensitivity_allocate import allocate
from .sensitivity_replay import Replay, flat_output

__all__ = ["refine"]


def _noise(ref: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """Output noise power relative to the signal, over all batches."""
    num = sum(float((r * r).sum()) for r in ref)
    den = sum(float(((g - r) ** 2).sum()) for r, g in zip(ref, got, strict=True))
    return den / num if num > 0 else math.inf


def _db(noise: float) -> float:
    if not math.isfinite(noise):
        return -math.inf
    return math.inf if noise <= 0 else -10 * math.log10(noise)


class _Weights:
    """The selected weights of ``model``: their float values, and each candidate's
    dequantized value on demand (quantized by the sensitivity table's ``quantizer``)."""

    def __init__(self, ctx: Any, model: nn.Module, entries: list[Any], quantizer: Any):
        self.quantizer = quantizer
        self.params: dict[str, nn.Parameter] = {}
        self.module: dict[str, str] = {}
        self.pname: dict[str, str] = {}
        self.axis: dict[str, int] = {}
        for entry in entries:
            module = model.get_submodule(entry.name)
            replacer = ctx.replacers.for_type(type(module)).component
            for pname in entry.params:
                name = f"{entry.name}.{pname}" if entry.name else pname
                self.params[name] = getattr(module, pname)
                self.module[name] = entry.name
                self.pname[name] = pname
                self.axis[name] = replacer.channel_axis(module, pname)
        self.float = {n: p.detach().clone() for n, p in self.params.items()}

    def dequantized(self, name: str, label: str) -> torch.Tensor:
        return self.quantizer.dequantized(label, self.float[name], self.axis[name], name,
                                          self.module[name], self.pname[name])[1]  # fmt: skip

    def set(self, choice: dict[str, str]) -> dict[str, torch.Tensor]:
        """Every weight at its chosen candidate; returns those values."""
        chosen = {}
        with torch.no_grad():
            for name, label in choice.items():
                chosen[name] = self.dequantized(name, label)
                self.params[name].data.copy_(chosen[name])
        return chosen

    def restore(self) -> None:
        with torch.no_grad():
            for name, p in self.params.items():
                p.data.copy_(self.float[name])


def _run(model: nn.Module, batches: list[Any]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [flat_output(model(*args, **kwargs)) for args, kwargs in batches]


def refine(
    ctx: Any,
    model: nn.Module,
    entries: list[Any],
    batches: list[Any],
    table: dict[str, Any],
    quantizer: Any,
    res: dict[str, Any],
    budget: float | None,
    method: str = "greedy",
    rounds: int = 1,
    replay: bool = True,
) -> dict[str, Any]:
    """``res`` (an :func:`allocate` result on ``table``) corrected by ``rounds`` rounds of
    in-context measurement (see the module docstring); the returned allocation adds
    ``measured_sqnr_db`` (the mix's output SQNR on ``batches``), ``first_estimate_db`` and
    ``first_measured_sqnr_db`` (the allocation before correction) and ``rounds``: per round
    the estimate and the measurement of its candidate mix and whether it was kept. Without a
    ``budget`` (a target SQNR) only the measurement is added. The model's weights are
    restored exactly."""
    was_training = model.training
    model.eval()
    weights = _Weights(ctx, model, entries, quantizer)
    out = dict(res)
    try:
        reference = _run(model, batches)
        weights.set(res["choice"])
        noise = _noise(reference, _run(model, batches))
        out["first_estimate_db"] = res["estimated_sqnr_db"]
        out["first_measured_sqnr_db"] = out["measured_sqnr_db"] = _db(noise)
        log = []
        for _ in range(rounds if budget is not None else 0):
            delta_table, base = _in_context(ctx, model, weights, batches, reference, table,
                                            out["choice"], replay)  # fmt: skip
            new = allocate(delta_table, budget=budget, method=method)
            estimate = base + new["noise"]
            weights.set(new["choice"])
            measured = _noise(reference, _run(model, batches))
            kept = measured < noise
            log.append({"estimated_sqnr_db": _db(estimate), "measured_sqnr_db": _db(measured),
                        "kept": kept})  # fmt: skip
            if not kept:
                weights.set(out["choice"])
                break
            noise = measured
            out.update(choice=new["choice"], bits_per_weight=new["bits_per_weight"],
                       estimated_sqnr_db=_db(estimate), measured_sqnr_db=_db(measured))  # fmt: skip
            if new["choice"] == res["choice"]:
                break
        out["rounds"] = log
    finally:
        weights.restore()
        model.train(was_training)
    return out


def _in_context(ctx, model, weights, batches, reference, table, choice, replay):
    """The table of each weight's candidates measured in the mix ``choice``: per candidate
    the change of the output noise when only that weight moves to it (shifted per weight to
    be >= 0, the shifts and the mix's own noise returned as ``base``)."""
    chosen = weights.set(choice)
    targets = {weights.module[n]: [p] for n, p in weights.params.items()}
    runs = Replay(model, batches, targets, replay)
    mix = _noise(reference, runs.reference)
    rows, base = [], mix
    for row in table["layers"]:
        name = row["name"]
        deltas: dict[str, tuple[float, float]] = {}
        for label, v in row["candidates"].items():
            if "error" in v:
                continue
            if label == choice[name]:
                deltas[label] = (v["bits_per_weight"], 0.0)
                continue
            with torch.no_grad():
                weights.params[name].data.copy_(weights.dequantized(name, label))
                got = runs.outputs(weights.module[name])
                weights.params[name].data.copy_(chosen[name])
            deltas[label] = (v["bits_per_weight"], _noise(reference, got) - mix)
        low = min(d for _, d in deltas.values())
        base += low
        cells = {lab: {"bits_per_weight": b, "noise": d - low} for lab, (b, d) in deltas.items()}
        rows.append({"name": name, "shape": row["shape"], "candidates": cells})
    return {"candidates": table["candidates"], "batches": len(batches), "layers": rows}, base
