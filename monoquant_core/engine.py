"""The Engine: owns one pluggy PluginManager, the registries, and runs the flow.

    load -> register -> configure -> plan -> quantize -> report   (-> save / load)

There is no module-global state: two Engines in one process are independent.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pluggy
import torch
from torch import nn

from .components import QuantizedModule, Scheme, WeightInfo
from .config import Config, config_to_dict, parse_options
from .errors import (
    CapabilityError,
    MonoQuantError,
    PluginError,
    UsageError,
)
from .host import PluginHost, safe_available
from .plan import Plan, PlanEntry
from .qtensor import QTensor
from .report import QuantReport, layer_report
from .rules import Rule, parse_rules

__all__ = ["Engine", "ModuleResult", "QuantResult"]

_KINDS = {
    "observer": "monoquant_register_observers",
    "scheme": "monoquant_register_schemes",
    "replacer": "monoquant_register_replacers",
    "serializer": "monoquant_register_serializers",
    "backend": "monoquant_register_backends",
}


@dataclass
class ModuleResult:
    """What ``monoquant_quantize_module`` returns for one plan entry.

    Attributes:
        entry: the plan entry.
        module: the replacement module (swapped in after every entry succeeded).
        qtensors: quantized weights by parameter name.
        originals: the float weights they came from (for the report's error metrics).
        metrics: free-form per-module values plugins may add (reported under ``extra``).
    """

    entry: PlanEntry
    module: nn.Module
    qtensors: dict[str, QTensor]
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0


class QuantResult(NamedTuple):
    """``Engine.quantize`` result: unpack as ``model, report = engine.quantize(...)``."""

    model: nn.Module
    report: QuantReport


class Engine(PluginHost):
    """Plugin host and orchestrator.

    Args:
        plugins: extra plugin objects (modules or instances with ``@hookimpl`` functions),
            registered after the entry-point plugins.
        entry_points: discover plugins of the ``monoquant`` entry-point group (built-ins are
            declared there too). ``False`` gives a hermetic engine with only ``plugins``.
        disable: plugin or distribution names not to load (added to
            ``MONOQUANT_DISABLE_PLUGINS``).
        strict: make a plugin that fails to load fatal (default: ``MONOQUANT_STRICT_PLUGINS``).

    Example::

        engine = Engine()
        model, report = engine.quantize(model, scheme="int8")
        engine.save(model, "model.safetensors")
    """

    # ------------------------------------------------------------------ configure & plan

    def configure(
        self,
        scheme: str = "int8",
        observer: str | None = None,
        backend: str | None = None,
        only: Iterable[str] | str = (),
        skip: Iterable[str] | str = (),
        scheme_options: Mapping[str, Any] | None = None,
        observer_options: Mapping[str, Any] | None = None,
        plugin_options: Mapping[str, Mapping[str, Any]] | None = None,
        rules: Iterable[Any] | None = None,
    ) -> Config:
        """Validate names and options into a frozen :class:`Config` (no hooks called).

        ``rules`` are per-layer overrides (first match wins): ``"lm_head=int8"``,
        ``("blocks.0.*", {"scheme": "int4-group", "scheme_options": {"group_size": 32}})``,
        ``"embed=skip"``; see :mod:`monoquant_core.rules`.
        """
        sch = self.schemes.get(scheme)
        observer = observer or sch.default_observer
        obs = self.observers.get(observer)
        if backend is not None:
            be = self.backends.get(backend)
            ok = safe_available(be)
            if ok is not True:
                raise CapabilityError(
                    f"backend {backend!r} is not available here: {ok}",
                    f"choose another backend ({', '.join(self.backends.names())}) "
                    "or leave --backend out to pick one automatically",
                )
        return Config(
            scheme=scheme,
            observer=observer,
            backend=backend,
            only=_patterns(only),
            skip=_patterns(skip),
            scheme_config=self.scheme_config(scheme, scheme_options),
            observer_config=parse_options(
                obs.config_class, observer_options, f"observer {observer!r}"
            ),
            plugin_options={k: dict(v) for k, v in (plugin_options or {}).items()},
            rules=self._check_rules(parse_rules(rules)),
        )

    def _check_rules(self, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        for rule in rules:
            try:
                if rule.scheme:
                    self.scheme_config(rule.scheme, rule.scheme_options or None)
                elif rule.scheme_options:
                    raise UsageError("scheme options need a scheme", "name the scheme first")
                if rule.observer or rule.observer_options:
                    name = rule.observer or self.schemes.get(rule.scheme).default_observer
                    obs = self.observers.get(name)
                    parse_options(obs.config_class, rule.observer_options, f"observer {name!r}")
                if rule.backend:
                    self.backends.get(rule.backend)
            except MonoQuantError as e:
                raise type(e)(f"rule {rule.describe()!r}: {e.problem}", e.fix) from None
        return rules

    def scheme_config(self, scheme: str, options: Mapping[str, Any] | None = None) -> Any:
        """Parse and validate ``options`` for ``scheme`` into its ``config_class``."""
        sch = self.schemes.get(scheme)
        cfg = parse_options(sch.config_class, options, f"scheme {scheme!r}")
        sch.validate_config(cfg)
        return cfg

    def plan(self, model: nn.Module, config: Config | None = None, **options: Any) -> Plan:
        """Dry run: the :class:`Plan` for ``model`` (configure/modify_plan/unconfigure hooks)."""
        config = config or self.configure(**options)
        self.pm.hook.monoquant_configure.call_historic(kwargs={"config": config})
        try:
            return self._plan(model, config)
        finally:
            self.pm.hook.monoquant_unconfigure(config=config)

    def _plan(self, model: nn.Module, config: Config) -> Plan:
        from .selection import build_module_plan, validate_plan

        plan = build_module_plan(self, model, config)
        self._call_plugin_hook("monoquant_modify_plan", plan=plan, model=model, config=config)
        validate_plan(self, plan, model)
        return plan

    def ranked_backends(self) -> list[Any]:
        """Available backends, highest priority first (a quantized module's fallbacks)."""
        ranked = sorted(self.backends, key=lambda r: (-r.component.priority, r.name))
        return [r.component for r in ranked if safe_available(r.component) is True]

    def choose_backend(self, info: WeightInfo, forced: str | None) -> tuple[str, list[str]]:
        """Pick the backend for one weight: ``(name, notes)``; notes say why others were not."""
        if forced is not None:
            why = self.backends.get(forced).supports(info)
            if why:
                raise CapabilityError(
                    f"backend {forced!r} cannot run this weight: {why}",
                    "leave --backend (or a rule's backend=) out to choose automatically",
                )
            return forced, []
        notes = []
        ranked = sorted(self.backends, key=lambda r: (-r.component.priority, r.name))
        for reg in ranked:
            be = reg.component
            if info.device not in be.device_types:
                continue
            if not be.capabilities.meant_for(info.scheme, info.activations):
                continue  # not a backend for this kind of weight: nothing to explain
            ok = safe_available(be)
            why = be.supports(info) if ok is True else ok
            if why:
                notes.append(f"{reg.name}: {why}")
                continue
            if notes:
                notes[-1] += f", using {reg.name}"
            return reg.name, notes
        raise CapabilityError(
            f"no installed backend can run a {info.scheme} weight of shape {info.shape} on "
            f"{info.device} ({'; '.join(notes) or 'none registered for this device'})",
            "install a backend plugin for this device, or move the model to the CPU",
        )

    # ------------------------------------------------------------------ quantize

    def component_configs(self, entry: PlanEntry) -> tuple[Any, Any]:
        """The scheme and observer configs for ``entry`` (per-entry options override)."""
        cfg = self.config
        if cfg is None:
            raise UsageError("component_configs() is only valid during Engine.quantize")
        scheme_cfg, obs_cfg = cfg.scheme_config, cfg.observer_config
        if entry.scheme != cfg.scheme or "scheme_options" in entry.options:
            scheme_cfg = self.scheme_config(entry.scheme, entry.options.get("scheme_options"))
        if entry.observer != cfg.observer or "observer_options" in entry.options:
            obs = self.observers.get(entry.observer)
            obs_cfg = parse_options(
                obs.config_class,
                entry.options.get("observer_options"),
                f"observer {entry.observer!r}",
            )
        return scheme_cfg, obs_cfg

    def quantize_entry_weights(
        self,
        entry: PlanEntry,
        module: nn.Module,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, QTensor]:
        """Quantize ``weights`` (default: every weight the entry's replacer names on
        ``module``) as the plan entry says: its scheme, observer, options and channel axes.

        This is what the default ``monoquant_quantize_module`` does; a plugin that computes some
        weights itself (e.g. ``gptq``, the ``weight``) quantizes the others with it.
        """
        replacer = self.replacers.get(entry.replacer)
        scheme_cfg, observer_cfg = self.component_configs(entry)
        if weights is None:
            weights = replacer.weights(module)
        return {
            param: self.quantize_weight(
                weight,
                entry.scheme,
                entry.observer,
                axis=replacer.channel_axis(module, param),
                scheme_config=scheme_cfg,
                observer_config=observer_cfg,
                name=f"{entry.name}.{param}" if entry.name else param,
            )
            for param, weight in weights.items()
        }

    def quantize_weight(
        self,
        weight: torch.Tensor,
        scheme: str,
        observer: str,
        axis: int = 0,
        scheme_config: Any = None,
        observer_config: Any = None,
        name: str = "weight",
    ) -> QTensor:
        """Observe and quantize one float tensor (the single per-tensor code path).

        Raises:
            UsageError: the weight holds NaN or Inf (named in the message).
        """
        reg_s, reg_o = self.schemes.entry(scheme), self.observers.entry(observer)
        sch, obs_cls = reg_s.component, reg_o.component
        scheme_config = scheme_config or sch.config_class()
        observer_config = observer_config or obs_cls.config_class()
        w = weight.detach()
        if not _all_finite(w):
            bad = (~torch.isfinite(w)).sum().item()
            raise UsageError(
                f"weight {name!r} contains {bad} NaN/Inf value(s); quantizing it would hide "
                "a broken model",
                f"fix the weights, or exclude it with --skip '{name.rsplit('.', 1)[0]}'",
            )
        try:
            with torch.no_grad():
                spec = sch.spec(tuple(w.shape), axis, scheme_config)
                obs = obs_cls(spec, observer_config)
                obs.update(w)
                qt = sch.quantize(w, obs.qparams(), spec, scheme_config)
        except MonoQuantError as e:  # name the tensor in a component's error
            raise type(e)(f"{name}: {e.problem}", e.fix) from None
        qt.meta = {
            "plugin": reg_s.plugin,
            "layout": "affine" if type(sch).dequantize is Scheme.dequantize else "custom",
            "scheme_config": config_to_dict(scheme_config),
            "observer": observer,
            "observer_config": config_to_dict(observer_config),
            **qt.meta,
        }
        return qt

    def quantize(
        self,
        model: nn.Module,
        *,
        config: Config | None = None,
        calibration: Any = None,
        sequential: bool = False,
        min_rows: int = 32,
        progress: bool = True,
        **options: Any,
    ) -> QuantResult:
        """Quantize ``model`` in place, transactionally, and report.

        Every plan entry is quantized first; modules are swapped in only when all succeeded,
        so an error leaves the model untouched. Always use the returned model (a bare
        ``nn.Linear`` passed as the model is itself replaced).

        Args:
            model: any ``nn.Module``.
            config: a :class:`Config` from :meth:`configure`, or pass its keyword arguments
                (``scheme``, ``observer``, ``backend``, ``only``, ``skip``, ``scheme_options``,
                ``observer_options``, ``plugin_options``, ``rules``).
            calibration: calibration data (a tensor, a list of tensors / tuples / dicts of
                model inputs, any iterable or ``DataLoader``; see
                :mod:`monoquant_core.calibration`). Plugins' ``monoquant_collectors`` see each
                planned layer's inputs. Needed by ``activations="static"``.
            sequential: calibrate and quantize one layer at a time in execution order (found
                with one forward pass), each layer's statistics collected with every earlier
                layer already quantized. Needs ``calibration``. Modules are swapped in as they
                are done, and all restored if anything fails.
            min_rows: warn when a layer saw fewer calibration input rows than this.
            progress: progress line over calibration batches (only on a terminal).

        Returns:
            ``QuantResult(model, report)``.
        """
        config = config or self.configure(**options)
        if sequential and calibration is None:
            raise UsageError(
                "sequential=True needs calibration data",
                "pass calibration=<batches> (CLI: --calibration FILE), or drop --sequential",
            )
        t0 = time.perf_counter()
        self.config = config
        self.pm.hook.monoquant_configure.call_historic(kwargs={"config": config})
        swapped: list[tuple[str, nn.Module]] = []
        original = model
        try:
            plan = self._plan(model, config)
            self._check_calibration_need(plan, calibration)
            before = _state_bytes(model)
            calib = dict(min_rows=min_rows, progress=progress)
            if sequential:
                results, deltas, model = self._quantize_sequential(
                    model, plan, calibration, swapped, calib
                )
            else:
                if calibration is not None:
                    self._calibrate_entries(model, plan, plan.selected, calibration, calib)
                results = [self._quantize_entry(model, e) for e in plan.selected]
                deltas = [
                    _state_bytes(r.module) - _state_bytes(model.get_submodule(r.entry.name))
                    for r in results
                ]
            report = self._report(plan, results, before, before + sum(deltas), config)
            if calibration is not None:
                from .calibration import CalibrationSummary

                report.extra["calibration"] = CalibrationSummary.of(plan).to_dict()
            report.time_s = time.perf_counter() - t0
            self._call_plugin_hook("monoquant_report", report=report, config=config)
            ranked = self.ranked_backends()
            for res in results:  # the only mutation of the model, after every hook succeeded
                if isinstance(res.module, QuantizedModule):
                    res.module.backend_candidates = ranked
                if not sequential:
                    model = _swap(model, res.entry.name, res.module)
            return QuantResult(model, report)
        except BaseException:
            for name, old in reversed(swapped):  # sequential: put every float module back
                if name:
                    _swap(original, name, old)
            raise
        finally:
            self.config = None
            self.pm.hook.monoquant_unconfigure(config=config)

    def calibrate(
        self,
        model: nn.Module,
        data: Any,
        *,
        config: Config | None = None,
        min_rows: int = 32,
        progress: bool = True,
        **options: Any,
    ) -> Plan:
        """Run calibration only: the :class:`Plan` with each entry's collected statistics.

        Plans ``model`` like :meth:`quantize`, calls ``monoquant_collectors`` and runs ``data``
        through the model (the model is not changed). Each selected entry gets ``collected``
        and ``calibration_rows``; entries that saw no data and need it are switched to their
        weight-only variant with the reason in ``notes``. Use it to inspect what calibration
        sees; :meth:`quantize` with ``calibration=data`` does the same before quantizing.
        """
        config = config or self.configure(**options)
        self.config = config
        self.pm.hook.monoquant_configure.call_historic(kwargs={"config": config})
        try:
            plan = self._plan(model, config)
            calib = dict(min_rows=min_rows, progress=progress)
            self._calibrate_entries(model, plan, plan.selected, data, calib)
            return plan
        finally:
            self.config = None
            self.pm.hook.monoquant_unconfigure(config=config)

    def _check_calibration_need(self, plan: Plan, calibration: Any) -> None:
        if calibration is not None:
            return
        for entry in plan.selected:
            cfg, _ = self.component_configs(entry)
            if self.schemes.get(entry.scheme).needs_calibration(cfg):
                raise UsageError(
                    f"{entry.name or '(root)'}: {entry.scheme} with "
                    f"activations={self.schemes.get(entry.scheme).activations(cfg)!r} needs "
                    "calibration data",
                    "pass calibration=<batches> (CLI: --calibration FILE), or use "
                    "activations=dynamic (no data needed)",
                )

    def _calibrate_entries(
        self,
        model: nn.Module,
        plan: Plan,
        entries: list[PlanEntry],
        data: Any,
        calib: dict[str, Any],
        warn: bool = True,
    ) -> list[Any]:
        from .calibration import apply_fallbacks, iter_batches, model_device, run_calibration

        total = _sized(data)
        if isinstance(data, _Materialized):
            batches = data
        else:
            batches = iter_batches(data, model_device(model))
        states = run_calibration(self, model, entries, batches, total=total, warn=warn, **calib)
        apply_fallbacks(self, plan, model, entries)
        return states

    def _quantize_entry(self, model: nn.Module, entry: PlanEntry) -> ModuleResult:
        module = model.get_submodule(entry.name)
        t1 = time.perf_counter()
        res = self._call_plugin_hook(
            "monoquant_quantize_module", entry=entry, module=module, engine=self
        )
        if not isinstance(res, ModuleResult):
            raise PluginError(
                f"monoquant_quantize_module returned {type(res).__name__} for "
                f"{entry.name!r}, expected a ModuleResult",
                "return the ModuleResult (or None to defer) from every implementation",
            )
        res.time_s = time.perf_counter() - t1
        self._call_plugin_hook("monoquant_module_done", entry=entry, result=res)
        return res

    def _quantize_sequential(
        self,
        model: nn.Module,
        plan: Plan,
        data: Any,
        swapped: list[tuple[str, nn.Module]],
        calib: dict[str, Any],
    ) -> tuple[list[ModuleResult], list[int], nn.Module]:
        """Layer by layer in execution order; each swapped in (and recorded) when done."""
        from .calibration import iter_batches, model_device, warn_calibration

        batches = _Materialized(iter_batches(data, model_device(model)))
        order = _execution_order(model, plan.selected, batches[0])
        results, deltas, states = [], [], []
        ranked = self.ranked_backends()
        for entry in order:
            states += self._calibrate_entries(model, plan, [entry], batches, calib, warn=False)
            if not entry.selected:
                continue
            res = self._quantize_entry(model, entry)
            old = model.get_submodule(entry.name)
            deltas.append(_state_bytes(res.module) - _state_bytes(old))
            if isinstance(res.module, QuantizedModule):
                res.module.backend_candidates = ranked
            model = _swap(model, entry.name, res.module)
            swapped.append((entry.name, old))
            results.append(res)
        warn_calibration(states, calib["min_rows"])
        return results, deltas, model

    #: the Config of the run in progress (None outside ``quantize``).
    config: Config | None = None

    def _report(
        self, plan: Plan, results: list[ModuleResult], before: int, after: int, config: Config
    ) -> QuantReport:
        rep = QuantReport(
            model_bytes_before=before, model_bytes_after=after, config=config.to_dict()
        )
        for res in results:
            e = res.entry
            for p, qt in res.qtensors.items():
                w = res.originals.get(p)
                deq = self.schemes.get(qt.scheme).dequantize(qt)
                rep.layers.append(
                    layer_report(
                        f"{e.name}.{p}" if e.name else p,
                        e.module_type,
                        e.observer or "",
                        e.backend or "",
                        w if w is not None else deq,
                        qt,
                        deq,
                        res.time_s / max(len(res.qtensors), 1),
                    )
                )
            if res.metrics:
                rep.extra.setdefault("modules", {})[e.name] = res.metrics
        rep.skipped = [(e.name, e.skip_reason or "") for e in plan.skipped]
        return rep

    def _call_plugin_hook(self, hook: str, **kwargs: Any) -> Any:
        """Call a lifecycle hook; unexpected exceptions get the plugin's name attached."""
        try:
            return getattr(self.pm.hook, hook)(**kwargs)
        except MonoQuantError:
            raise
        except Exception as e:
            culprit = _culprit(self.pm, hook, e)
            who = f"plugin {culprit!r}" if culprit else "a plugin"
            raise PluginError(
                f"{who} raised {type(e).__name__} in {hook}: {e}",
                "report it to the plugin's authors, or disable it with "
                f"MONOQUANT_DISABLE_PLUGINS={culprit or '<plugin name>'}",
            ) from e

    # ------------------------------------------------------------------ checkpoint mode

    def quantize_checkpoint(
        self,
        src: str,
        dst: str,
        *,
        config: Config | None = None,
        overwrite: bool = False,
        trust_pickle: bool = False,
        allow_nonfinite: bool = False,
        progress: bool = True,
        **options: Any,
    ) -> QuantReport:
        """Quantize a checkpoint without its model class, streaming tensor by tensor.

        Args:
            src: a ``.safetensors`` file, a folder of shards (with or without its
                ``*.safetensors.index.json``), or a ``.pt``/``.pth``/``.bin`` state_dict.
            dst: output file (single-file input) or folder (folder input); written to a
                temporary path and renamed when complete.
            config: a :class:`Config` (or pass :meth:`configure` keywords in ``options``).
            overwrite: replace an existing ``dst``.
            trust_pickle: allow ``.pt`` files that need full unpickling (runs their code).
            allow_nonfinite: keep tensors holding NaN/Inf in float instead of refusing.
            progress: progress line on stderr (only when it is a terminal).

        Returns:
            The :class:`QuantReport` (per-tensor SQNR, sizes, skipped tensors with reasons).
        """
        from .streaming import quantize_checkpoint

        return quantize_checkpoint(
            self,
            src,
            dst,
            config or self.configure(**options),
            overwrite=overwrite,
            trust_pickle=trust_pickle,
            allow_nonfinite=allow_nonfinite,
            progress=progress,
        )

    def plan_checkpoint(
        self, src: str, *, config: Config | None = None, trust_pickle: bool = False, **options: Any
    ) -> Plan:
        """The checkpoint-mode plan of ``src`` (reads headers only)."""
        from .streaming import plan_checkpoint

        return plan_checkpoint(self, src, config or self.configure(**options), trust_pickle)

    def dequantize_checkpoint(
        self, src: str, dst: str, *, overwrite: bool = False, progress: bool = True
    ) -> int:
        """Write a plain float safetensors copy of a quantized file or folder."""
        from .streaming import dequantize_checkpoint

        return dequantize_checkpoint(self, src, dst, overwrite=overwrite, progress=progress)

    def inspect(self, path: str) -> dict[str, Any]:
        """Format version, producers and per-tensor facts of a file or folder (headers only)."""
        from .inspection import inspect_path

        return inspect_path(self, path)

    def verify(self, original: str, quantized: str, *, progress: bool = True) -> dict[str, Any]:
        """Per-tensor SQNR of ``quantized`` against ``original``, re-read with the loader."""
        from .inspection import verify_paths

        return verify_paths(self, original, quantized, progress=progress)

    # ------------------------------------------------------------------ files

    def save(
        self, model: nn.Module, path: str, *, serializer: str | None = None, overwrite: bool = True
    ) -> None:
        """Write a quantized model atomically (temp file, then rename). See :func:`save`."""
        from .checkpoint import save_model

        save_model(self, model, path, serializer=serializer, overwrite=overwrite)

    def load(
        self,
        path: str,
        model: nn.Module | None = None,
        *,
        dequantize: bool = False,
        backend: str | None = None,
    ) -> Any:
        """Load a file into ``model`` (rebuilding quantized modules), or as a float state_dict.

        See :func:`monoquant_core.load`.
        """
        from .checkpoint import load_model

        return load_model(self, path, model, dequantize=dequantize, backend=backend)


class _Materialized(list):
    """Calibration batches held in memory (sequential mode runs them once per layer)."""


def _sized(data: Any) -> int | None:
    if isinstance(data, torch.Tensor):
        return 1
    try:
        return len(data)
    except TypeError:
        return None


def _execution_order(model: nn.Module, entries: list[PlanEntry], batch: Any) -> list[PlanEntry]:
    """``entries`` in the order their modules first run on ``batch`` (unseen ones last)."""
    seen: list[str] = []
    handles = []
    modes = {m: m.training for m in model.modules()}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any) -> None:
            if name not in seen:
                seen.append(name)

        return hook

    try:
        for e in entries:
            handles.append(model.get_submodule(e.name).register_forward_pre_hook(record(e.name)))
        model.eval()
        with torch.no_grad():
            from .calibration import run_batch

            run_batch(model, batch[0], batch[1], 0)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    by_name = {e.name: e for e in entries}
    return [by_name[n] for n in seen] + [e for e in entries if e.name not in seen]


def _patterns(p: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(p, str):
        p = [p]
    return tuple(x for x in p if x)


def _all_finite(w: torch.Tensor) -> bool:
    """NaN/Inf check without a tensor-sized temporary (amin/amax propagate NaN)."""
    if w.numel() == 0 or not w.is_floating_point():
        return True
    return bool(torch.isfinite(torch.stack([w.amin(), w.amax()])).all())


def _state_bytes(model: nn.Module) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in model.state_dict(keep_vars=True).values():
        key = (t.data_ptr(), t.numel())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _swap(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if not name:
        return new
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    return model


def _culprit(pm: pluggy.PluginManager, hook: str, exc: Exception) -> str | None:
    tb = exc.__traceback__
    files = set()
    while tb is not None:
        files.add(tb.tb_frame.f_code.co_filename)
        tb = tb.tb_next
    for impl in getattr(pm.hook, hook).get_hookimpls():
        code = getattr(impl.function, "__code__", None)
        if code is not None and code.co_filename in files:
            return impl.plugin_name
    return None
