"""The plugin host: one pluggy PluginManager, plugin loading, and the validated registries.

:class:`~monoquant_core.engine.Engine` extends it with the quantization flow. There is no
module-global state: two hosts in one process are independent.
"""

from __future__ import annotations

import types
from collections.abc import Iterable
from typing import Any

import pluggy

from . import hookspecs, pipeline
from .errors import PluginConflictError, PluginLoadError
from .loading import (
    PluginInfo,
    disabled_from_env,
    iter_entry_points,
    load_entry_point,
    report_failure,
    strict_from_env,
)
from .registry import Registered, Registry, ReplacerRegistry

__all__ = ["PluginHost", "safe_available"]

KINDS = {
    "observer": "monoquant_register_observers",
    "scheme": "monoquant_register_schemes",
    "replacer": "monoquant_register_replacers",
    "serializer": "monoquant_register_serializers",
    "backend": "monoquant_register_backends",
}


class PluginHost:
    """Loads plugins (entry points + objects) and collects their components.

    Args: see :class:`~monoquant_core.engine.Engine`.
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
                known = ", ".join(KINDS.values())
                raise PluginLoadError(
                    f"{origin} implements {name!r}, which is not a Mono Quant hook",
                    f"fix the spelling (hooks are listed in docs/plugins/hooks.md, e.g. {known}),"
                    f" or disable it with MONOQUANT_DISABLE_PLUGINS={impl.plugin_name}",
                )

    def _collect(self, info: PluginInfo) -> None:
        """Call ``info``'s registration hooks with a ``register`` bound to it."""
        for kind, hook in KINDS.items():
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
            for kind in KINDS:
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


def safe_available(backend: Any) -> bool | str:
    try:
        ok = backend.available()
    except Exception as e:
        return f"available() raised {type(e).__name__}: {e}"
    if ok is True:
        return True
    return ok if isinstance(ok, str) and ok else "not available on this machine"
