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
10. the scheme vetoes the shape (``Scheme.check``, given the weight's shape with the replacer's
    channel axis first: a GPT-2 ``Conv1D``'s stored ``[in, out]`` is checked as ``[out, in]``).

A selected module also gets the scheme's remarks (``Scheme.notes``) in its plan notes. A run
(not the plan verb) whose plan selects nothing is refused by :func:`require_selected`.

A selected module takes the run's scheme / observer / options unless its first matching rule
overrides them (mixed precision by rule).

Patterns are :func:`fnmatch.fnmatchcase` globs on module names as printed by
``model.named_modules()``: ``*`` also matches dots, so ``*.fc1`` matches ``blocks.0.fc1``.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from typing import TYPE_CHECKING

from torch import nn

from .components import WeightInfo
from .config import Config
from .errors import CapabilityError, UsageError
from .plan import Plan, PlanEntry
from .registry import Registries
from .rules import Rule

if TYPE_CHECKING:  # pragma: no cover  (annotations only: Run builds on this module)
    from .run import Run

__all__ = [
    "add_notes",
    "apply_rule",
    "build_module_plan",
    "channel_first",
    "check_entry",
    "matches",
    "pattern_reason",
    "picked_modules",
    "require_selected",
    "validate_plan",
]

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


def _unsupported_reason(registries: Registries, module: nn.Module) -> str:
    if isinstance(module, _NORMS) or "norm" in type(module).__name__.lower():
        return "normalisation layer: kept in float (small and precision-sensitive)"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding: kept in float (no installed replacer handles embeddings)"
    handled = registries.replacers.handled_names()
    return (
        f"no replacer for {type(module).__name__} "
        f"(installed replacers handle: {', '.join(handled) or 'nothing'})"
    )


def build_module_plan(run: Run, model: nn.Module) -> Plan:
    """The default plan: every module that owns parameters or has a replacer gets an entry."""
    config = run.config
    owners: dict[int, list[str]] = defaultdict(list)
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)].append(pname)
    only_hits: dict[str, list[tuple[str, bool, str]]] = {p: [] for p in config.only}
    entries: list[PlanEntry] = []
    replaced: list[str] = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        reg = run.replacers.for_type(type(module))
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
            entry.skip(_unsupported_reason(run.registries, module))
        else:
            _select(run, model, entry, module, reg.name, owners)
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
            handled = run.replacers.handled_names()
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
    run: Run,
    model: nn.Module,
    entry: PlanEntry,
    module: nn.Module,
    replacer_name: str,
    owners: dict[int, list[str]],
) -> None:
    config = run.config
    replacer = run.replacers.get(replacer_name)
    entry.replacer = replacer_name
    weights = replacer.weights(module)
    entry.params = {p: tuple(w.shape) for p, w in weights.items()}
    name = entry.name
    skip_pat = matches(name, config.skip)
    only_pat = matches(name, config.only)
    rule = next((r for r in config.rules if fnmatch.fnmatchcase(name, r.pattern)), None)
    reason = pattern_reason(config, skip_pat, only_pat, rule)
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
        apply_rule(entry, rule)
    check_entry(run, entry, module, with_backend=False)


def pattern_reason(
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


def apply_rule(entry: PlanEntry, rule: Rule) -> None:
    """Give a selected entry what its first matching rule says (scheme, options, ...)."""
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
    for name, opts in rule.plugins.items():  # validated by config (defaults filled in)
        entry.options[name] = dict(opts)
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


def check_entry(run: Run, entry: PlanEntry, module: nn.Module, with_backend: bool) -> None:
    """The scheme's and replacer's veto on a selected entry and, when ``with_backend``, its
    backend choice (after plugins edited the plan; again after a calibration fallback)."""
    scheme = run.schemes.get(entry.scheme)
    replacer = run.replacers.get(entry.replacer)
    scheme_cfg, _ = run.entry_configs(entry)
    notes: list[str] = []
    kernels: list[str] = []
    backend = None
    act = scheme.activations(scheme_cfg)
    if act not in replacer.activations:
        entry.skip(
            f"{entry.scheme} with activations={act!r}: {entry.module_type} layers quantize "
            "weights only here (use activations=none for them, e.g. with a rule)"
        )
        return
    for p, w in replacer.weights(module).items():
        axis = replacer.channel_axis(module, p)
        shape = channel_first(tuple(w.shape), axis)
        why = scheme.check(shape, scheme_cfg)
        if why:
            entry.skip(f"{entry.scheme}: {why}")
            return
        add_notes(
            entry, [f"{p}: {n}" if p != "weight" else n for n in scheme.notes(shape, scheme_cfg)]
        )
        if not with_backend:
            continue
        spec = scheme.spec(tuple(w.shape), axis, scheme_cfg)
        info = WeightInfo(entry.scheme, spec, tuple(w.shape), w.dtype, w.device.type, act)
        backend, notes = run.choose_backend(info, entry.backend or run.config.backend)
        kernels = [k.describe() for k in run.backends.get(backend).kernels(info)]
        notes += _slow_notes(run, backend, info)
    if with_backend:
        entry.backend = backend
        entry.notes.extend(notes)
        entry.kernels = kernels


def add_notes(entry: PlanEntry, notes: list[str]) -> None:
    """Append the ``notes`` an entry does not have yet (entries are checked more than once)."""
    entry.notes.extend(n for n in notes if n not in entry.notes)


def channel_first(shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """``shape`` with the channel axis moved to the front, as :meth:`Scheme.check` sees it
    (the ``[out, in]`` of a GPT-2 ``Conv1D``, which stores ``[in, out]`` with axis 1)."""
    if not shape:
        return shape
    axis %= len(shape)
    return (shape[axis], *shape[:axis], *shape[axis + 1 :])


def _slow_notes(run: Run, backend: str, info: WeightInfo) -> list[str]:
    """Notes for the ``expect_batch`` rows at which ``backend`` expects to be slower than a
    float ``nn.Linear`` in the weight's dtype."""
    out = []
    be = run.backends.get(backend)
    dtype = str(info.dtype).replace("torch.", "")
    for rows in run.config.expect_batch:
        speed = be.expected_speedup(info, rows)
        if speed is not None and speed < 1.0:
            out.append(
                f"warning: {backend} is expected slower than a {dtype} nn.Linear at "
                f"M={rows} (about {speed:.1f}x; docs/performance.md)"
            )
    return out


def validate_plan(run: Run, plan: Plan, model: nn.Module) -> None:
    """After ``monoquant_modify_plan``: re-check every selected entry and choose its backend.

    A backend a plugin set on an entry is forced for it (and must support the weight).
    """
    for entry in plan.selected:
        if entry.replacer is None:
            module = model.get_submodule(entry.name)
            reg = run.replacers.for_type(type(module))
            if reg is None:
                raise CapabilityError(
                    f"a plugin selected {entry.name!r} ({entry.module_type}), but no replacer "
                    f"supports {entry.module_type}",
                    "skip it in monoquant_modify_plan, or install a replacer for it",
                )
            entry.replacer = reg.name
        entry.scheme = entry.scheme or run.config.scheme
        entry.observer = entry.observer or run.config.observer
        run.schemes.get(entry.scheme)
        run.observers.get(entry.observer)
        if entry.backend is not None:
            run.backends.get(entry.backend)
        check_entry(run, entry, model.get_submodule(entry.name), with_backend=True)


def require_selected(plan: Plan, picked: list[PlanEntry], what: str = "model") -> None:
    """Refuse a run that would quantize nothing (the ``plan`` verb still returns such a plan).

    ``picked`` are the entries the user's ``--only`` patterns and scheme rules name; the
    one-line error says why each of them was kept in float, or, when no pattern named any
    (a plain run), why the model's layers were.

    Raises:
        UsageError: ``plan`` selects nothing.
    """
    if plan.selected:
        return
    unit = "layers" if plan.unit == "modules" else "tensors"
    if picked:
        problem = f"nothing to quantize: every one of the {unit} your patterns select is kept "
        problem += "in float: " + _why_each(picked)
        fix = "change --only / the rules, or the scheme or its options (see `monoquant plan`)"
    else:
        problem = f"nothing to quantize: the {what} has no {unit[:-1]} that can be quantized"
        kept = sorted(plan.entries, key=lambda e: e.replacer is None)  # replaceable first
        problem += (": " + _why_each(kept)) if kept else " (it has no weights)"
        fix = "check the reasons with `monoquant plan`"
    raise UsageError(problem, fix)


def _why_each(entries: list[PlanEntry], shown: int = 4) -> str:
    """``'fc1' (reason); 'fc2' (reason)`` for the first ``shown`` entries, then
    ``; and N more``."""
    text = "; ".join(f"{e.name or '(root)'!r} ({e.skip_reason})" for e in entries[:shown])
    return text + (f"; and {len(entries) - shown} more" if len(entries) > shown else "")


def picked_modules(config: Config, plan: Plan) -> list[PlanEntry]:
    """The entries of a module plan that ``--only`` patterns or non-skip rules name."""
    patterns = (*config.only, *(r.pattern for r in config.rules if not r.skip))
    return [e for e in plan if matches(e.name, patterns)]
