"""The plugin host: one pluggy PluginManager, plugin loading and naming, the validated
registries, and the one run setup/teardown every verb goes through.

There is no module-global state: two hosts in one process are independent.
"""

from __future__ import annotations

import contextlib
import types
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import pluggy

from . import hookspecs, pipeline
from .config import Config
from .errors import MonoQuantError, PluginConflictError, PluginLoadError, UsageError
from .hooks import WRAPPABLE, plugin_error
from .loading import (
    PluginInfo,
    disabled_from_env,
    iter_entry_points,
    load_entry_point,
    report_failure,
    strict_from_env,
)
from .markers import PROJECT
from .options import closest
from .pipeline import ComponentAccess
from .registry import KINDS, Registered, Registries, Registry
from .run import Run
from .version import __version__

__all__ = ["PluginHost", "plugin_name"]


class PluginHost(ComponentAccess):
    """Loads plugins (entry points + objects), collects their components, and runs runs.

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
        self._init = (entry_points, tuple(disable), strict)  # for spawn_spec
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.strict = strict_from_env() if strict is None else bool(strict)
        self.disabled = disabled_from_env() | {d.strip().lower() for d in disable}
        self.failures: list[MonoQuantError] = []
        self.registries = Registries()
        self._infos = self.registries.plugins
        self._add(PluginInfo("core", pipeline, "monoquant", __version__, source="core"))
        if entry_points:
            for ep, dname, dver in iter_entry_points(self.disabled):
                try:
                    self._add(load_entry_point(ep, dname, dver))
                except PluginLoadError as e:
                    self._failed(e)
        for obj in plugins:
            self._add(PluginInfo(plugin_name(obj), obj, None, None, source="argument"))
        self._check_pending()
        for info in list(self._infos.values()):
            self._collect(info)

    # ------------------------------------------------------------------ registries

    def registry(self, kind: str) -> Registry:
        """The registry of ``kind`` (``observer``, ``scheme``, ``replacer``, ...)."""
        return self.registries.of(kind)

    # ------------------------------------------------------------------ plugins

    def register(self, plugin: Any, name: str | None = None) -> None:
        """Register one more plugin object after construction (its components included).

        It takes part in runs that start afterwards (``monoquant_configure`` is not replayed).
        """
        info = PluginInfo(name or plugin_name(plugin), plugin, None, None, source="argument")
        self._add(info)
        self._check_pending()
        if self._infos.get(info.name) is info:  # not left out (a taken name, a misspelt hook)
            self._collect(info)

    def spawn_spec(self) -> tuple[Any, ...]:
        """What :func:`host_from_spec` needs to build an equal host in another process (a
        ``--workers`` rank): the constructor's arguments and the plugins given as objects
        (modules by name). Raises a one-line error for a plugin object that cannot be pickled.
        """
        import pickle  # deferred: only --workers needs it

        given: list[tuple[str, Any]] = []
        for info in self._infos.values():
            if info.source != "argument":
                continue
            obj = info.plugin
            if isinstance(obj, types.ModuleType):
                given.append(("module", obj.__name__))
                continue
            try:
                pickle.dumps(obj)
            except Exception as e:
                raise UsageError(
                    f"plugin {info.name!r} cannot be sent to the worker processes ({e})",
                    "define its class at module level (picklable), pass its module instead, or "
                    "install it through an entry point",
                ) from e
            given.append(("object", obj))
        return (*self._init, given)

    def _add(self, info: PluginInfo) -> None:
        """Register ``info``'s plugin with the manager; a plugin whose name is taken, whose
        hooks do not fit their specs or that wraps a hook that takes no wrappers is left out
        (one warning line; an error in strict mode)."""
        if info.name in self._infos or self.pm.has_plugin(info.name):
            old = self._infos.get(info.name)
            self._failed(
                PluginConflictError(
                    f"two plugins are named {info.name!r}: {old.origin if old else 'one'} and "
                    f"{info.origin}",
                    "uninstall one distribution, or disable one with "
                    "MONOQUANT_DISABLE_PLUGINS=<distribution name>",
                ),
                left_out=f"the second plugin {info.name!r}",
            )
            return
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
        except ValueError as e:  # the same object registered under another name
            self._failed(
                PluginConflictError(
                    f"{info.origin} cannot be registered: {e}",
                    "register each plugin object once, under one name",
                ),
                left_out=f"plugin {info.name!r}",
            )
            return
        callers = self.pm.get_hookcallers(info.plugin) or []
        for caller in callers:
            for impl in caller.get_hookimpls():
                wraps = impl.wrapper or impl.hookwrapper
                if impl.plugin_name == info.name and wraps and caller.name not in WRAPPABLE:
                    self.pm.unregister(name=info.name)
                    self._failed(
                        PluginLoadError(
                            f"{info.origin} implements {caller.name} as a wrapper; only "
                            f"{', '.join(sorted(WRAPPABLE))} takes wrappers",
                            "implement it as a plain hook (use tryfirst/trylast for ordering)",
                        )
                    )
                    return
        info.hooks = sorted(c.name for c in callers)
        self._infos[info.name] = info

    def _failed(self, err: MonoQuantError, left_out: str | None = None) -> None:
        self.failures.append(err)
        report_failure(err, self.strict, left_out)

    def report_plugin_failure(self, err: PluginLoadError) -> None:
        """Record a broken plugin: one warning line, or raise ``err`` in strict mode."""
        self._failed(err)

    def _drop(self, name: str) -> None:
        """Leave plugin ``name`` out: unregistered, and its components removed."""
        if self.pm.has_plugin(name):
            self.pm.unregister(name=name)
        self._infos.pop(name, None)
        for kind in KINDS:
            self.registry(kind).discard_plugin(name)

    def _check_pending(self) -> None:
        """A ``@hookimpl`` whose name is not a Mono Quant hook (a typo) leaves its plugin out:
        one warning line naming the plugin and the misspelt hook (an error in strict mode)."""
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
                self._drop(impl.plugin_name)
                close = closest(name, _hook_names(self.pm))
                spelling = f"did you mean {close!r}?" if close else "fix the spelling"
                self._failed(
                    PluginLoadError(
                        f"{origin} implements {name!r}, which is not a Mono Quant hook",
                        f"{spelling} (hooks are listed in docs/plugins/hooks.md), or disable it "
                        f"with MONOQUANT_DISABLE_PLUGINS={impl.plugin_name}",
                    ),
                    left_out=f"plugin {impl.plugin_name!r}",
                )

    def _collect(self, info: PluginInfo) -> None:
        """Call ``info``'s registration hooks with a ``register`` bound to it. A component
        whose name another plugin registered first leaves this plugin out entirely (one
        warning line naming both; an error in strict mode): half a plugin could act on the
        other plugin's component."""
        for kind, hook in KINDS.items():
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                if impl.plugin_name != info.name:
                    continue
                registry = self.registry(kind)

                def register(component: Any, _kind: str = kind, _reg: Registry = registry) -> None:
                    name = info.name if _kind == "options" else getattr(component, "name", None)
                    _reg.add(
                        Registered(
                            _kind, name, component, info.name, info.distribution, info.version
                        )
                    )

                try:
                    impl.function(**({"register": register} if impl.argnames else {}))
                except PluginConflictError as e:
                    self._drop(info.name)
                    self._failed(e, left_out=f"plugin {info.name!r}")
                    return
                except PluginLoadError as e:
                    self._failed(e)
                except (Exception, SystemExit) as e:
                    self._failed(
                        PluginLoadError(
                            f"{info.origin} failed in {hook}: {type(e).__name__}: {e}",
                            f"report it to the plugin's authors or disable it with "
                            f"MONOQUANT_DISABLE_PLUGINS={info.name}",
                        )
                    )

    def plugins(self) -> list[dict[str, Any]]:
        """Name, distribution, version, source, hooks, components and import time (seconds,
        None for plugins not loaded from an entry point) of every loaded plugin."""
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
                    "import_s": info.import_s,
                }
            )
        return out

    def plugin_info(self, name: str) -> PluginInfo:
        return self._infos[name]

    # ------------------------------------------------------------------ runs

    @contextlib.contextmanager
    def run(self, config: Config) -> Iterator[Run]:
        """The one run setup/teardown: ``monoquant_configure`` for every plugin, the body,
        then ``monoquant_unconfigure`` for every plugin that was configured, also when the
        body (or a later plugin's configure) raised. A failing plugin is named."""
        run = Run(config, self.registries, self.pm)
        impls = list(reversed(self.pm.hook.monoquant_configure.get_hookimpls()))
        for i, impl in enumerate(impls):
            try:
                impl.function(*[{"run": run}[a] for a in impl.argnames])
            except BaseException as e:
                self._unconfigure(run, {x.plugin_name for x in impls[i:]}, raising=False)
                if isinstance(e, MonoQuantError) or not isinstance(e, Exception):
                    raise
                raise plugin_error(impl.plugin_name, "monoquant_configure", e) from e
        try:
            yield run
        except BaseException:
            self._unconfigure(run, set(), raising=False)
            raise
        self._unconfigure(run, set(), raising=True)

    def _unconfigure(self, run: Run, exclude: set[str], raising: bool) -> None:
        """Every plugin's ``monoquant_unconfigure`` (all are called even if one fails)."""
        first: MonoQuantError | None = None
        for impl in reversed(self.pm.hook.monoquant_unconfigure.get_hookimpls()):
            if impl.plugin_name in exclude:
                continue
            try:
                impl.function(*[{"run": run}[a] for a in impl.argnames])
            except Exception as e:
                err = e if isinstance(e, MonoQuantError) else None
                err = err or plugin_error(impl.plugin_name, "monoquant_unconfigure", e)
                if raising and first is None:
                    first = err
                elif not raising:
                    warnings.warn(f"monoquant: {err} (after the run had failed)", stacklevel=3)
        if first is not None:
            raise first


def _hook_names(pm: pluggy.PluginManager) -> list[str]:
    """The names of the hooks that have a spec (for "did you mean")."""
    callers = ((n, getattr(pm.hook, n)) for n in dir(pm.hook) if not n.startswith("_"))
    return [n for n, c in callers if isinstance(c, pluggy.HookCaller) and c.has_spec()]


def plugin_name(obj: Any) -> str:
    """``monoquant_plugin_name``, else the module's last name part, else the class name;
    lower-cased with ``_`` -> ``-`` (it prefixes the plugin's CLI options and is written into
    files, so built-in and third-party plugins declare ``monoquant_plugin_name``)."""
    name = getattr(obj, "monoquant_plugin_name", None)
    if not name:
        name = obj.__name__.rpartition(".")[2] if isinstance(obj, types.ModuleType) else None
    if not name:
        name = type(obj).__name__
    return str(name).lower().replace("_", "-")
