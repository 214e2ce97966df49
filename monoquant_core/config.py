"""The resolved configuration of one run, how user arguments become one, and the one rule for
which scheme / observer options a plan entry uses.

:func:`build_config` validates every name and option before any hook runs (an unknown scheme,
option key or plugin in ``plugin_options`` is a one-line error listing the valid choices);
:func:`entry_configs` is the only place that decides an entry's component configs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import CapabilityError, MonoQuantError, UsageError
from .options import PluginOptions, config_to_dict, did_you_mean, parse_options, plugin_mark
from .registry import Registries, Registry, safe_available
from .rules import Rule, parse_rules

if TYPE_CHECKING:  # pragma: no cover
    from .plan import PlanEntry

__all__ = [
    "STATS",
    "Config",
    "build_config",
    "entry_configs",
    "resolve_plugin_options",
    "scheme_config",
]

#: the report's statistics modes (see :class:`Config`)
STATS = ("sample", "full", "off")


@dataclass(frozen=True)
class Config:
    """The frozen, resolved configuration of one run.

    Attributes:
        scheme: registry name of the scheme.
        observer: registry name of the observer.
        backend: forced backend name, or None to choose per layer by capability.
        only: fnmatch patterns; when given, only matching module/tensor names are quantized.
        skip: fnmatch patterns of names never quantized.
        scheme_config: the scheme's validated ``config_class`` instance.
        observer_config: the observer's validated ``config_class`` instance.
        plugin_options: plugin name -> its validated :class:`PluginOptions` (only plugins the
            user named; read them with ``run.options(name)``).
        rules: per-layer overrides, first match wins (see :mod:`monoquant_core.rules`).
        stats: the report's per-weight error statistics (SQNR, maximum and relative error):
            ``"sample"`` (default: exact for weights up to about a million elements, larger
            ones measured on evenly spread blocks of rows holding about a million, with the
            fraction in the report), ``"full"`` (every element), ``"off"`` (sizes only).
        expect_batch: input rows (batch x tokens) the model will run at; the plan notes every
            layer whose backend expects to be slower than float there
            (``Backend.expected_speedup``).
    """

    scheme: str
    observer: str
    backend: str | None = None
    only: tuple[str, ...] = ()
    skip: tuple[str, ...] = ()
    scheme_config: Any = None
    observer_config: Any = None
    plugin_options: Mapping[str, PluginOptions] = field(default_factory=dict)
    rules: tuple[Rule, ...] = ()
    stats: str = "sample"
    expect_batch: tuple[int, ...] = (1, 128)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "observer": self.observer,
            "backend": self.backend,
            "only": list(self.only),
            "skip": list(self.skip),
            "scheme_config": config_to_dict(self.scheme_config),
            "observer_config": config_to_dict(self.observer_config),
            "plugin_options": {k: config_to_dict(v) for k, v in self.plugin_options.items()},
            "rules": [r.to_dict() for r in self.rules],
            "stats": self.stats,
            "expect_batch": list(self.expect_batch),
        }


def build_config(
    registries: Registries,
    scheme: str = "int8",
    observer: str | None = None,
    backend: str | None = None,
    only: Iterable[str] | str = (),
    skip: Iterable[str] | str = (),
    scheme_options: Mapping[str, Any] | None = None,
    observer_options: Mapping[str, Any] | None = None,
    plugin_options: Mapping[str, Any] | None = None,
    rules: Iterable[Any] | None = None,
    stats: str = "sample",
    expect_batch: Iterable[int] | int | None = None,
) -> Config:
    """Validate names and options into a frozen :class:`Config` (no hooks are called)."""
    sch = registries.schemes.get(scheme)
    observer = observer or sch.default_observer
    obs = registries.observers.get(observer)
    if backend is not None:
        ok = safe_available(registries.backends.get(backend))
        if ok is not True:
            raise CapabilityError(
                f"backend {backend!r} is not available here: {ok}",
                f"choose another backend ({', '.join(registries.backends.names())}) "
                "or leave --backend out to pick one automatically",
            )
    return Config(
        scheme=scheme,
        observer=observer,
        backend=backend,
        only=_patterns(only),
        skip=_patterns(skip),
        scheme_config=scheme_config(registries.schemes, scheme, scheme_options),
        observer_config=parse_options(obs.config_class, observer_options, f"observer {observer!r}"),
        plugin_options=resolve_plugin_options(registries, plugin_options),
        rules=_check_rules(registries, parse_rules(rules)),
        stats=_stats(stats),
        expect_batch=_rows(expect_batch),
    )


def _rows(value: Iterable[int] | int | None) -> tuple[int, ...]:
    if value is None:
        return (1, 128)
    rows = (value,) if isinstance(value, int) else tuple(value)
    for r in rows:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise UsageError(
                f"expect_batch {r!r} is not a positive number of input rows",
                "give batch x tokens as whole numbers, e.g. --expect-batch 1 --expect-batch 128",
            )
    return tuple(sorted(set(rows)))


def _stats(value: Any) -> str:
    if value not in STATS:
        raise UsageError(
            f"stats={value!r} is not one of {', '.join(STATS)}",
            "use stats='sample' (default), 'full' or 'off' (CLI: --stats)",
        )
    return str(value)


def scheme_config(schemes: Registry, scheme: str, options: Mapping[str, Any] | None = None) -> Any:
    """Parse ``options`` for ``scheme`` into its ``config_class`` and let the scheme veto it."""
    sch = schemes.get(scheme)
    cfg = parse_options(sch.config_class, options, f"scheme {scheme!r}")
    sch.validate_config(cfg)
    return cfg


def entry_configs(
    config: Config, entry: PlanEntry, schemes: Registry, observers: Registry
) -> tuple[Any, Any]:
    """``(scheme_config, observer_config)`` of a plan entry.

    The run's configs, unless the entry uses another scheme / observer than the run or carries
    its own ``scheme_options`` / ``observer_options`` (set by a rule or a plugin): then those
    options alone, parsed for the entry's component (a rule's options replace the run's).
    """
    scheme_cfg, obs_cfg = config.scheme_config, config.observer_config
    if entry.scheme != config.scheme or "scheme_options" in entry.options:
        scheme_cfg = scheme_config(schemes, entry.scheme, entry.options.get("scheme_options"))
    if entry.observer != config.observer or "observer_options" in entry.options:
        obs = observers.get(entry.observer)
        obs_cfg = parse_options(
            obs.config_class, entry.options.get("observer_options"), f"observer {entry.observer!r}"
        )
    return scheme_cfg, obs_cfg


def resolve_plugin_options(
    registries: Registries, raw: Mapping[str, Any] | None
) -> dict[str, PluginOptions]:
    """``plugin_options`` as given by the user -> validated options dataclasses by plugin.

    A key enables that plugin; its value is a mapping of options (``{}`` for the defaults) or
    an instance of the plugin's options class.

    Raises:
        UsageError: an unknown plugin name, a plugin that takes no options, a value that is not
            a mapping, or an unknown option key (each listing the valid choices).
    """
    out: dict[str, PluginOptions] = {}
    if raw is not None and not isinstance(raw, Mapping):
        raise UsageError(
            f"plugin_options is a {type(raw).__name__}, not a dict",
            'pass plugin_options={"PLUGIN": {"key": value}}',
        )
    takers = ", ".join(registries.options.names()) or "none installed"
    for name, opts in (raw or {}).items():
        if name not in registries.options:
            what = "takes no options" if name in registries.plugins else "is not installed"
            raise UsageError(
                f"plugin_options names plugin {name!r}, which {what} "
                f"(plugins that take options: {takers})",
                f"{did_you_mean(name, registries.options.names())}check the name "
                "(`monoquant plugins` lists the installed plugins)",
            )
        cls = registries.options.get(name)
        if isinstance(opts, cls):
            out[name] = opts
            continue
        if opts is not None and not isinstance(opts, Mapping):
            raise UsageError(
                f"plugin_options[{name!r}] is a {type(opts).__name__}, not a dict of options",
                f"pass {{}} to enable {name!r} with its defaults, or {{'key': value}}",
            )
        out[name] = parse_options(cls, opts, f"plugin {name!r}")
    return out


def _check_rules(registries: Registries, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
    checked = []
    for rule in rules:
        try:
            if rule.scheme:
                scheme_config(registries.schemes, rule.scheme, rule.scheme_options or None)
            elif rule.scheme_options:
                raise UsageError("scheme options need a scheme", "name the scheme first")
            if rule.observer or rule.observer_options:
                name = rule.observer or registries.schemes.get(rule.scheme).default_observer
                obs = registries.observers.get(name)
                parse_options(obs.config_class, rule.observer_options, f"observer {name!r}")
            if rule.backend:
                registries.backends.get(rule.backend)
            marks = {name: plugin_mark(registries.options, name, opts, "")
                     for name, opts in rule.plugins.items()}  # fmt: skip
        except MonoQuantError as e:
            raise type(e)(f"rule {rule.describe()!r}: {e.problem}", e.fix) from None
        checked.append(dataclasses.replace(rule, plugins=marks) if marks else rule)
    return tuple(checked)


def _patterns(p: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(p, str):
        p = [p]
    return tuple(x for x in p if x)
