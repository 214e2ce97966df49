"""The Engine: owns one pluggy PluginManager, the registries, and runs the flow.

    load -> register -> configure -> plan -> quantize -> report   (-> save / load)

There is no module-global state: two Engines in one process are independent.
"""

from __future__ import annotations

import time
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import pluggy
import torch
from torch import nn

from . import hookspecs, pipeline
from .components import Scheme, WeightInfo
from .config import Config, config_to_dict, parse_options
from .errors import (
    CapabilityError,
    MonoQuantError,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    UsageError,
)
from .loading import (
    PluginInfo,
    disabled_from_env,
    iter_entry_points,
    load_entry_point,
    report_failure,
    strict_from_env,
)
from .plan import Plan, PlanEntry
from .qtensor import QTensor
from .registry import Registered, Registry, ReplacerRegistry
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


class Engine:
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

    def __init__(
        self,
        plugins: Iterable[Any] = (),
        *,
        entry_points: bool = True,
        disable: Iterable[str] = (),
        strict: bool | None = None,
    ):
        self.pm = pluggy.PluginManager("monoquant")
        self.pm.add_hookspecs(hookspecs)
        self.strict = strict_from_env() if strict is None else bool(strict)
        self.disabled = disabled_from_env() | {d.strip().lower() for d in disable}
        self.failures: list[PluginLoadError] = []
        self._infos: dict[str, PluginInfo] = {}
        self.observers = Registry("observer")
        self.schemes = Registry("scheme")
        self.replacers = ReplacerRegistry()
        self.serializers = Registry("serializer")
        self.backends = Registry("backend")
        self._add(PluginInfo("core", pipeline, "monoquant", _version(), source="core"))
        if entry_points:
            for ep, dname, dver in iter_entry_points(self.disabled):
                try:
                    self._add(load_entry_point(ep, dname, dver))
                except PluginLoadError as e:
                    self._failed(e)
        for obj in plugins:
            self._add(PluginInfo(_plugin_name(obj), obj, None, None, source="argument"))
        self._check_pending()
        for info in list(self._infos.values()):
            self._collect(info)

    # ------------------------------------------------------------------ plugins

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register one more plugin object after construction (its components included)."""
        info = PluginInfo(name or _plugin_name(plugin), plugin, None, None, source="argument")
        self._add(info)
        self._check_pending()
        self._collect(info)

    def _add(self, info: PluginInfo) -> None:
        if info.name in self._infos or self.pm.has_plugin(info.name):
            old = self._infos.get(info.name)
            raise PluginConflictError(
                f"two plugins are named {info.name!r}: {old.origin if old else 'one'} and "
                f"{info.origin}",
                "uninstall one distribution, or disable one with "
                "MONOQUANT_DISABLE_PLUGINS=<distribution name>",
            )
        try:
            self.pm.register(info.plugin, name=info.name)
        except pluggy.PluginValidationError as e:
            self._failed(
                PluginLoadError(
                    f"{info.origin} has an invalid hook implementation: {e}",
                    "compare its signature with docs/plugins/hooks.md",
                )
            )
            return
        info.hooks = sorted(h.name for h in self.pm.get_hookcallers(info.plugin) or [])
        self._infos[info.name] = info

    def _failed(self, err: PluginLoadError) -> None:
        self.failures.append(err)
        report_failure(err, self.strict)

    def report_plugin_failure(self, err: PluginLoadError) -> None:
        """Record a broken plugin: one warning line, or raise ``err`` in strict mode."""
        self._failed(err)

    def _check_pending(self) -> None:
        for name in dir(self.pm.hook):
            if name.startswith("_"):
                continue
            caller = getattr(self.pm.hook, name)
            if not isinstance(caller, pluggy.HookCaller) or caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                info = self._infos.get(impl.plugin_name)
                origin = info.origin if info else f"plugin {impl.plugin_name!r}"
                known = ", ".join(_KINDS.values())
                raise PluginLoadError(
                    f"{origin} implements {name!r}, which is not a Mono Quant hook",
                    f"fix the spelling (hooks are listed in docs/plugins/hooks.md, e.g. {known}),"
                    f" or disable it with MONOQUANT_DISABLE_PLUGINS={impl.plugin_name}",
                )

    def _collect(self, info: PluginInfo) -> None:
        """Call ``info``'s registration hooks with a ``register`` bound to it."""
        for kind, hook in _KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name != info.name:
                    continue
                registry = self.registry(kind)

                def register(component: Any, _kind: str = kind, _reg: Registry = registry) -> None:
                    name = getattr(component, "name", None)
                    _reg.add(
                        Registered(
                            _kind, name, component, info.name, info.distribution, info.version
                        )
                    )

                try:
                    impl.function(**({"register": register} if impl.argnames else {}))
                except PluginConflictError:
                    raise
                except PluginLoadError as e:
                    self._failed(e)
                except Exception as e:
                    self._failed(
                        PluginLoadError(
                            f"{info.origin} failed in {hook}: {type(e).__name__}: {e}",
                            f"report it to the plugin's authors or disable it with "
                            f"MONOQUANT_DISABLE_PLUGINS={info.name}",
                        )
                    )

    def registry(self, kind: str) -> Registry:
        """The registry of ``kind`` (``observer``, ``scheme``, ``replacer``, ...)."""
        return {
            "observer": self.observers,
            "scheme": self.schemes,
            "replacer": self.replacers,
            "serializer": self.serializers,
            "backend": self.backends,
        }[kind]

    def plugins(self) -> list[dict[str, Any]]:
        """Name, distribution, version, hooks and components of every loaded plugin."""
        out = []
        for info in self._infos.values():
            comps: dict[str, list[str]] = {}
            for kind in _KINDS:
                names = [r.name for r in self.registry(kind) if r.plugin == info.name]
                if names:
                    comps[kind] = names
            out.append(
                {
                    "name": info.name,
                    "distribution": info.distribution,
                    "version": info.version,
                    "source": info.source,
                    "hooks": info.hooks,
                    "components": comps,
                }
            )
        return out

    def plugin_info(self, name: str) -> PluginInfo:
        return self._infos[name]

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
            ok = _safe_available(be)
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

    def choose_backend(self, info: WeightInfo, forced: str | None) -> tuple[str, list[str]]:
        """Pick the backend for one weight: ``(name, notes)``; notes say why others were not."""
        if forced is not None:
            why = self.backends.get(forced).supports(info)
            if why:
                raise CapabilityError(
                    f"backend {forced!r} cannot run this weight: {why}",
                    "leave --backend out to choose automatically",
                )
            return forced, []
        notes = []
        ranked = sorted(self.backends, key=lambda r: (-r.component.priority, r.name))
        for reg in ranked:
            be = reg.component
            if info.device not in be.device_types:
                continue
            ok = _safe_available(be)
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
        self, model: nn.Module, *, config: Config | None = None, **options: Any
    ) -> QuantResult:
        """Quantize ``model`` in place, transactionally, and report.

        Every plan entry is quantized first; modules are swapped in only when all succeeded,
        so an error leaves the model untouched. Always use the returned model (a bare
        ``nn.Linear`` passed as the model is itself replaced).

        Args:
            model: any ``nn.Module``.
            config: a :class:`Config` from :meth:`configure`, or pass its keyword arguments
                (``scheme``, ``observer``, ``backend``, ``only``, ``skip``, ``scheme_options``,
                ``observer_options``, ``plugin_options``).

        Returns:
            ``QuantResult(model, report)``.
        """
        config = config or self.configure(**options)
        t0 = time.perf_counter()
        self.config = config
        self.pm.hook.monoquant_configure.call_historic(kwargs={"config": config})
        try:
            plan = self._plan(model, config)
            before = _state_bytes(model)
            results = []
            for entry in plan.selected:
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
                results.append(res)
            after = before + sum(
                _state_bytes(r.module) - _state_bytes(model.get_submodule(r.entry.name))
                for r in results
            )
            report = self._report(plan, results, before, after, config)
            report.time_s = time.perf_counter() - t0
            self._call_plugin_hook("monoquant_report", report=report, config=config)
            for res in results:  # the only mutation of the model, after every hook succeeded
                model = _swap(model, res.entry.name, res.module)
            return QuantResult(model, report)
        finally:
            self.config = None
            self.pm.hook.monoquant_unconfigure(config=config)

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


def _version() -> str:
    from . import __version__

    return __version__


def _plugin_name(obj: Any) -> str:
    """``monoquant_plugin_name``, else the module's last name part, else the class name;
    lower-cased with ``_`` -> ``-`` (it prefixes the plugin's CLI options)."""
    name = getattr(obj, "monoquant_plugin_name", None)
    if not name:
        name = obj.__name__.rpartition(".")[2] if isinstance(obj, types.ModuleType) else None
    if not name:
        name = type(obj).__name__
    return str(name).lower().replace("_", "-")


def _patterns(p: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(p, str):
        p = [p]
    return tuple(x for x in p if x)


def _all_finite(w: torch.Tensor) -> bool:
    """NaN/Inf check without a tensor-sized temporary (amin/amax propagate NaN)."""
    if w.numel() == 0 or not w.is_floating_point():
        return True
    return bool(torch.isfinite(torch.stack([w.amin(), w.amax()])).all())


def _safe_available(backend: Any) -> bool | str:
    try:
        ok = backend.available()
    except Exception as e:
        return f"available() raised {type(e).__name__}: {e}"
    if ok is True:
        return True
    return ok if isinstance(ok, str) and ok else "not available on this machine"


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
