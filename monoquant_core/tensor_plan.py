"""Checkpoint-mode selection: which tensors of a file are quantized, judging by names and
shapes alone (there is no model), with the same patterns and rules as module mode.
"""

from __future__ import annotations

import math

import torch

from .config import Config
from .errors import UsageError
from .plan import Plan, PlanEntry
from .rules import Rule
from .run import Run
from .selection import add_notes, apply_rule, matches, pattern_reason

__all__ = ["build_tensor_plan", "picked_tensors"]


def _tensor_default_reason(module: str, param: str, shape: tuple[int, ...]) -> str | None:
    """Why a tensor is not a Linear-like weight, judging by name and shape only."""
    last = module.rpartition(".")[2].lower()
    if param != "weight":
        return f"{param!r} is not a weight (biases and buffers stay in float)"
    if len(shape) != 2:
        return f"{len(shape)}-D tensor: only 2-D Linear-like weights are selected by default"
    if math.prod(shape) == 0:
        return "weight is empty"
    if "norm" in last or last.startswith("ln"):
        return "normalisation layer: kept in float (small and precision-sensitive)"
    if _embedding_like(module):
        return "embedding: kept in float by default (sensitive); select it with a rule"
    if last in ("lm_head", "output", "head") and module.count(".") == 0:
        return "output head: kept in float by default; select it with a rule"
    return None


def _embedding_like(module: str) -> bool:
    last = module.rpartition(".")[2].lower()
    return "embed" in last or "position" in last or last in ("wte", "wpe", "pos")


def _tensor_match(module: str, name: str, patterns: tuple[str, ...]) -> str | None:
    return matches(module, patterns) or matches(name, patterns)


def build_tensor_plan(run: Run, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> Plan:
    """The plan of checkpoint mode: tensors chosen by rules on names and shapes.

    Patterns (``only``, ``skip``, rules) match the module name (the tensor name without its
    last part, as in module mode) or the full tensor name. By default 2-D ``*.weight`` tensors
    are quantized; biases, 1-D tensors, norms, embeddings and a top-level output head
    (``lm_head``) stay in float, each with its reason. A pattern that names a layer selects
    its weight matrix and keeps its bias / 1-D tensors in float; a pattern (``only`` or a rule
    with a scheme) that matches only 1-D or empty tensors is an error.
    """
    config = run.config
    entries = []
    hits: dict[str, list[bool]] = {}  # pattern -> quantizable? for each tensor it selected
    for name, shape, dtype in tensors:
        module, _, param = name.rpartition(".")
        entry = PlanEntry(name=name, module_type="tensor", params={param or name: tuple(shape)})
        rule = next((r for r in config.rules if _tensor_match(module, name, (r.pattern,))), None)
        only_pat = _tensor_match(module, name, config.only)
        skip_pat = _tensor_match(module, name, config.skip)
        explicit = bool(only_pat) or bool(rule and rule.scheme)
        shaped = len(shape) >= 2 and math.prod(shape) > 0
        reason = pattern_reason(config, skip_pat, only_pat, rule)
        if reason is None and not dtype.is_floating_point:
            reason = f"dtype {str(dtype).replace('torch.', '')} is not a float"
        elif reason is None and explicit:
            for pat in (only_pat, rule.pattern if rule and rule.scheme else None):
                if pat:
                    hits.setdefault(pat, []).append(shaped)
            if not shaped:
                reason = f"{len(shape)}-D or empty tensor: nothing to quantize (kept in float)"
        elif reason is None:
            reason = _tensor_default_reason(module, param, tuple(shape))
        if reason is None:
            reason = _tensor_scheme(run, entry, rule, tuple(shape))
        if reason:
            entry.skip(reason)
        entries.append(entry)
    _check_tensor_patterns(config, [n for n, _, _ in tensors], hits, tensors)
    return Plan(entries=entries, config=config, unit="tensors")


def _tensor_scheme(
    run: Run, entry: PlanEntry, rule: Rule | None, shape: tuple[int, ...]
) -> str | None:
    """Give a selected tensor its scheme/observer (rule overrides); the scheme's veto, if any."""
    entry.scheme, entry.observer = run.config.scheme, run.config.observer
    if rule is not None:
        apply_rule(entry, rule)
    scheme_cfg, _ = run.entry_configs(entry)
    scheme = run.schemes.get(entry.scheme)
    act = scheme.activations(scheme_cfg)
    if scheme.needs_calibration(scheme_cfg):
        raise UsageError(
            f"{entry.name}: {entry.scheme} with activations={act!r} needs calibration data, "
            "and checkpoint mode has no model to run it through (it is weight-only)",
            "use activations=dynamic or none here, or quantize in module mode with --model "
            "PKG.MODULE:FACTORY --weights FILE --calibration DATA",
        )
    if act != "none" and (len(shape) != 2 or _embedding_like(entry.name.rpartition(".")[0])):
        return (
            f"{entry.scheme} with activations={act!r}: only Linear-like weights quantize "
            "their inputs (use activations=none for this tensor, e.g. with a rule)"
        )
    why = scheme.check(shape, scheme_cfg)
    if why:
        return f"{entry.scheme}: {why}"
    add_notes(entry, scheme.notes(shape, scheme_cfg))
    return None


def _check_tensor_patterns(
    config: Config,
    names: list[str],
    hits: dict[str, list[bool]],
    tensors: list[tuple[str, tuple[int, ...], torch.dtype]],
) -> None:
    for pat, flags in hits.items():
        if flags and not any(flags):
            name, shape = next(
                (n, s) for n, s, _ in tensors if _tensor_match(n.rpartition(".")[0], n, (pat,))
            )
            raise UsageError(
                f"pattern {pat!r} selects only tensors that cannot be quantized, e.g. {name!r} "
                f"of shape {tuple(shape)} (1-D and empty tensors have no channels to scale)",
                "point the pattern at weight matrices",
            )
    for rule in config.rules:
        if not any(_tensor_match(n.rpartition(".")[0], n, (rule.pattern,)) for n in names):
            raise UsageError(
                f"rule {rule.describe()!r} matches no tensor of the checkpoint",
                "check the names with `monoquant plan FILE`",
            )
    for pat in config.only:
        if not any(_tensor_match(n.rpartition(".")[0], n, (pat,)) for n in names):
            raise UsageError(
                f"--only {pat!r} matches no tensor of the checkpoint",
                "check the names with `monoquant plan FILE`",
            )


def picked_tensors(config: Config, plan: Plan) -> list[PlanEntry]:
    """The entries of a tensor plan that ``--only`` patterns or non-skip rules name."""
    patterns = (*config.only, *(r.pattern for r in config.rules if not r.skip))
    return [e for e in plan if _tensor_match(e.name.rpartition(".")[0], e.name, patterns)]
