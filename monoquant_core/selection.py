"""Module-mode layer selection: the default plan, and its validation after plugins edit it.

Selection rules, in order (the first that applies gives the skip reason):

1. no replacer for the module type -> kept in float (normalisation layers and embeddings say so);
2. the name matches a ``skip`` pattern;
3. ``only`` patterns are given and none matches the name;
4. the first matching per-layer rule (:mod:`monoquant_core.rules`) says ``skip``;
5. the replacer is opt-in (``default = False``) and neither an ``only`` pattern nor a rule with
   a scheme names the module;
6. the weight is not a floating tensor, is empty, or is not materialised (meta device);
7. the replacer vetoes it (``skip_reason``), e.g. a parent that reads the weight directly;
8. the weight is tied to another module's parameter (quantizing it would untie them);
9. the scheme's activation mode is not one the replacer honours (``Replacer.activations``:
   only Linear layers quantize their inputs);
10. the scheme vetoes the shape (``Scheme.check``).

A selected module takes the run's scheme / observer / options unless its first matching rule
overrides them (mixed precision by rule).

Patterns are :func:`fnmatch.fnmatchcase` globs on module names as printed by
``model.named_modules()``: ``*`` also matches dots, so ``*.fc1`` matches ``blocks.0.fc1``.
"""

from __future__ import annotations

import fnmatch
import math
from collections import defaultdict
from typing import TYPE_CHECKING

import torch
from torch import nn

from .components import WeightInfo
from .config import Config
from .errors import CapabilityError, UsageError
from .plan import Plan, PlanEntry
from .rules import Rule

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

__all__ = ["build_module_plan", "build_tensor_plan", "matches", "validate_plan"]

_NORMS: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def matches(name: str, patterns: tuple[str, ...]) -> str | None:
    """The first pattern that matches ``name`` (fnmatch, case-sensitive), or None."""
    for pat in patterns:
        if fnmatch.fnmatchcase(name, pat):
            return pat
    return None


def _unsupported_reason(engine: Engine, module: nn.Module) -> str:
    if isinstance(module, _NORMS) or "norm" in type(module).__name__.lower():
        return "normalisation layer: kept in float (small and precision-sensitive)"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding: kept in float (no installed replacer handles embeddings)"
    handled = engine.replacers.handled_names()
    return (
        f"no replacer for {type(module).__name__} "
        f"(installed replacers handle: {', '.join(handled) or 'nothing'})"
    )


def build_module_plan(engine: Engine, model: nn.Module, config: Config) -> Plan:
    """The default plan: every module that owns parameters or has a replacer gets an entry."""
    owners: dict[int, list[str]] = defaultdict(list)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)].append(pname)
    only_hits: dict[str, list[tuple[str, bool, str]]] = {p: [] for p in config.only}
    entries: list[PlanEntry] = []
    replaced: list[str] = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        reg = engine.replacers.for_type(type(module))
        if reg is None and not own:
            continue
        entry = PlanEntry(name=name, module_type=type(module).__name__)
        for pat in config.only:
            if fnmatch.fnmatchcase(name, pat):
                only_hits[pat].append((name, reg is not None, type(module).__name__))
        outer = next((r for r in replaced if r == "" or name.startswith(r + ".")), None)
        if outer is not None:
            entry.params = {p: tuple(t.shape) for p, t in own.items()}
            entry.skip(f"inside {outer or '(root)'!r}, which is replaced as a whole")
        elif reg is None:
            entry.params = {p: tuple(t.shape) for p, t in own.items()}
            entry.skip(_unsupported_reason(engine, module))
        else:
            _select(engine, model, config, entry, module, reg.name, owners)
        entries.append(entry)
        if entry.selected:
            replaced.append(name)
    for rule in config.rules:
        if not any(fnmatch.fnmatchcase(e.name, rule.pattern) for e in entries):
            raise UsageError(
                f"rule {rule.describe()!r} matches no module of the model"
                + _container_hint(model, rule.pattern),
                "check the names with `monoquant plan` (patterns are fnmatch globs)",
            )
    for pat, hits in only_hits.items():
        if any(supported for _, supported, _ in hits):
            continue
        if hits:
            name, _, tname = hits[0]
            handled = engine.replacers.handled_names()
            raise CapabilityError(
                f"--only {pat!r} selects {name!r} ({tname}), but no installed replacer supports "
                f"{tname} (supported: {', '.join(handled)})",
                "change the --only pattern, or install a plugin with a replacer for " + tname,
            )
        raise UsageError(
            f"--only {pat!r} matches no module of the model" + _container_hint(model, pat),
            "check the names with `monoquant plan` (patterns are fnmatch globs on module names)",
        )
    return Plan(entries=entries, config=config)


def _container_hint(model: nn.Module, pattern: str) -> str:
    """' ('blocks.0' is a container; 'blocks.0.*' matches the layers in it)' or ''."""
    for name, _ in model.named_modules():
        if name and fnmatch.fnmatchcase(name, pattern):
            return f" ({name!r} is a container; {pattern + '.*'!r} matches the layers in it)"
    return ""


def _select(
    engine: Engine,
    model: nn.Module,
    config: Config,
    entry: PlanEntry,
    module: nn.Module,
    replacer_name: str,
    owners: dict[int, list[str]],
) -> None:
    replacer = engine.replacers.get(replacer_name)
    entry.replacer = replacer_name
    weights = replacer.weights(module)
    entry.params = {p: tuple(w.shape) for p, w in weights.items()}
    name = entry.name
    skip_pat = matches(name, config.skip)
    only_pat = matches(name, config.only)
    rule = next((r for r in config.rules if fnmatch.fnmatchcase(name, r.pattern)), None)
    reason = _pattern_reason(config, skip_pat, only_pat, rule)
    if reason is None and not replacer.default and not only_pat and not (rule and rule.scheme):
        reason = (
            f"{entry.module_type} layers are opt-in for replacer {replacer_name!r}; "
            f"select with --only {name!r} or a rule"
        )
    if reason is None:
        reason = _weight_reason(weights)
    if reason is None:
        reason = replacer.skip_reason(name, module, model)
    if reason is None:
        for p, w in weights.items():
            others = [o for o in owners.get(id(w), []) if o != (f"{name}.{p}" if name else p)]
            if others:
                reason = f"{p} is tied to {others[0]!r}; quantizing would untie them"
                break
    if reason:
        entry.skip(reason)
        return
    entry.scheme, entry.observer = config.scheme, config.observer
    if rule is not None:
        _apply_rule(engine, entry, rule)
    _finish(engine, config, entry, module, with_backend=False)


def _pattern_reason(
    config: Config, skip_pat: str | None, only_pat: str | None, rule: Rule | None
) -> str | None:
    """The skip reason from user patterns, in precedence order: skip, only, a skip rule."""
    if skip_pat:
        return f"matched skip pattern {skip_pat!r}"
    if config.only and not only_pat:
        return "not matched by any only pattern"
    if rule is not None and rule.skip:
        return f"rule {rule.describe()!r}"
    return None


def _apply_rule(engine: Engine, entry: PlanEntry, rule: Rule) -> None:
    if rule.scheme:
        entry.scheme = rule.scheme
        if rule.scheme_options:
            entry.options["scheme_options"] = dict(rule.scheme_options)
    if rule.observer:
        entry.observer = rule.observer
    if rule.observer_options:
        entry.options["observer_options"] = dict(rule.observer_options)
    if rule.backend:
        entry.backend = rule.backend
    entry.notes.append(f"rule {rule.describe()!r}")


def _weight_reason(weights: dict) -> str | None:
    for p, w in weights.items():
        if not w.is_floating_point():
            return f"{p} has dtype {str(w.dtype).replace('torch.', '')}, not a float"
        if w.numel() == 0:
            return f"{p} is empty"
        if w.device.type == "meta":
            return f"{p} is on the meta device (not materialised)"
    return None


def _finish(
    engine: Engine, config: Config, entry: PlanEntry, module: nn.Module, with_backend: bool
) -> None:
    """Scheme veto and (after plugins edited the plan) backend choice for a selected entry."""
    scheme = engine.schemes.get(entry.scheme)
    replacer = engine.replacers.get(entry.replacer)
    scheme_cfg = config.scheme_config
    if entry.scheme != config.scheme or "scheme_options" in entry.options:
        scheme_cfg = engine.scheme_config(entry.scheme, entry.options.get("scheme_options"))
    notes: list[str] = []
    backend = None
    act = scheme.activations(scheme_cfg)
    if act not in replacer.activations:
        entry.skip(
            f"{entry.scheme} with activations={act!r}: {entry.module_type} layers quantize "
            "weights only here (use activations=none for them, e.g. with a rule)"
        )
        return
    for p, w in replacer.weights(module).items():
        why = scheme.check(tuple(w.shape), scheme_cfg)
        if why:
            entry.skip(f"{entry.scheme}: {why}")
            return
        if not with_backend:
            continue
        spec = scheme.spec(tuple(w.shape), replacer.channel_axis(module, p), scheme_cfg)
        info = WeightInfo(
            entry.scheme,
            spec,
            tuple(w.shape),
            w.dtype,
            w.device.type,
            scheme.activations(scheme_cfg),
        )
        backend, notes = engine.choose_backend(info, entry.backend or config.backend)
    if with_backend:
        entry.backend = backend
        entry.notes.extend(notes)


def validate_plan(engine: Engine, plan: Plan, model: nn.Module) -> None:
    """After ``monoquant_modify_plan``: re-check every selected entry and choose its backend.

    A backend a plugin set on an entry is forced for it (and must support the weight).
    """
    for entry in plan.selected:
        if entry.replacer is None:
            module = model.get_submodule(entry.name)
            reg = engine.replacers.for_type(type(module))
            if reg is None:
                raise CapabilityError(
                    f"a plugin selected {entry.name!r} ({entry.module_type}), but no replacer "
                    f"supports {entry.module_type}",
                    "skip it in monoquant_modify_plan, or install a replacer for it",
                )
            entry.replacer = reg.name
        entry.scheme = entry.scheme or plan.config.scheme
        entry.observer = entry.observer or plan.config.observer
        engine.schemes.get(entry.scheme)
        engine.observers.get(entry.observer)
        if entry.backend is not None:
            engine.backends.get(entry.backend)
        _finish(engine, plan.config, entry, model.get_submodule(entry.name), with_backend=True)


# --------------------------------------------------------------------------- checkpoint mode


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


def build_tensor_plan(
    engine: Engine, tensors: list[tuple[str, tuple[int, ...], torch.dtype]], config: Config
) -> Plan:
    """The plan of checkpoint mode: tensors chosen by rules on names and shapes.

    Patterns (``only``, ``skip``, rules) match the module name (the tensor name without its
    last part, as in module mode) or the full tensor name. By default 2-D ``*.weight`` tensors
    are quantized; biases, 1-D tensors, norms, embeddings and a top-level output head
    (``lm_head``) stay in float, each with its reason. A pattern that names a layer selects
    its weight matrix and keeps its bias / 1-D tensors in float; a pattern (``only`` or a rule
    with a scheme) that matches only 1-D or empty tensors is an error.
    """
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
        reason = _pattern_reason(config, skip_pat, only_pat, rule)
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
            reason = _tensor_scheme(engine, config, entry, rule, tuple(shape))
        if reason:
            entry.skip(reason)
        entries.append(entry)
    _check_tensor_patterns(config, [n for n, _, _ in tensors], hits, tensors)
    return Plan(entries=entries, config=config, unit="tensors")


def _tensor_scheme(
    engine: Engine, config: Config, entry: PlanEntry, rule: Rule | None, shape: tuple[int, ...]
) -> str | None:
    """Give a selected tensor its scheme/observer (rule overrides); the scheme's veto, if any."""
    entry.scheme, entry.observer = config.scheme, config.observer
    if rule is not None:
        _apply_rule(engine, entry, rule)
    scheme_cfg = (
        engine.scheme_config(entry.scheme, entry.options.get("scheme_options"))
        if (entry.scheme != config.scheme or "scheme_options" in entry.options)
        else config.scheme_config
    )
    scheme = engine.schemes.get(entry.scheme)
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
    return f"{entry.scheme}: {why}" if why else None


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
