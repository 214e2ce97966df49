"""Validated component registries (one per kind), stamped with the registering plugin, and
how a backend is chosen for a weight."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from .components import Backend, WeightInfo
from .errors import CapabilityError, PluginConflictError, PluginLoadError, UsageError
from .loading import PluginInfo
from .options import did_you_mean

__all__ = [
    "KINDS",
    "NAME_RE",
    "Registered",
    "Registries",
    "Registry",
    "ReplacerRegistry",
    "choose_backend",
    "ranked_backends",
    "safe_available",
]

#: component kind -> the registration hook that fills its registry
KINDS = {
    "observer": "monoquant_register_observers",
    "scheme": "monoquant_register_schemes",
    "replacer": "monoquant_register_replacers",
    "serializer": "monoquant_register_serializers",
    "backend": "monoquant_register_backends",
    "options": "monoquant_register_options",
}

NAME_RE = re.compile(r"^[a-z][a-z0-9]*(?:-[a-z0-9]+)*$")


@dataclass(frozen=True)
class Registered:
    """A component plus where it came from."""

    kind: str
    name: str
    component: Any
    plugin: str
    distribution: str | None
    version: str | None

    @property
    def origin(self) -> str:
        """``plugin 'x' (distribution d 1.0)`` for messages."""
        dist = f"{self.distribution} {self.version or ''}".strip() if self.distribution else None
        return f"plugin {self.plugin!r}" + (f" (distribution {dist})" if dist else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "plugin": self.plugin,
            "distribution": self.distribution,
            "version": self.version,
        }


class Registry:
    """Name -> component for one kind (``scheme``, ``observer``, ...)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, Registered] = {}

    def add(self, item: Registered) -> None:
        if not isinstance(item.name, str) or not NAME_RE.match(item.name):
            fixed = re.sub(r"[^a-z0-9]+", "-", str(item.name).lower()).strip("-") or "my-name"
            raise PluginLoadError(
                f"{item.origin} registered {self.kind} {item.name!r}: component names must be "
                "lower-case kebab-case",
                f"rename it, e.g. {fixed!r}",
            )
        old = self._items.get(item.name)
        if old is not None:
            raise PluginConflictError(
                f"{self.kind} {item.name!r} is registered twice: by {old.origin} and by "
                f"{item.origin}",
                "uninstall one of the two distributions, or disable one plugin with "
                f"MONOQUANT_DISABLE_PLUGINS={item.plugin} (or {old.plugin})",
            )
        self._items[item.name] = item

    def entry(self, name: str) -> Registered:
        try:
            return self._items[name]
        except KeyError:
            avail = ", ".join(sorted(self._items)) or "(none installed)"
            raise UsageError(
                f"unknown {self.kind} {name!r} (available: {avail})",
                f"{did_you_mean(name, self._items)}choose one of: {avail}, or install the "
                f"plugin that provides {name!r}",
            ) from None

    def get(self, name: str) -> Any:
        return self.entry(name).component

    def discard_plugin(self, plugin: str) -> None:
        """Remove every component ``plugin`` registered (the plugin is left out)."""
        self._items = {k: v for k, v in self._items.items() if v.plugin != plugin}

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[Registered]:
        return iter(sorted(self._items.values(), key=lambda r: r.name))

    def __len__(self) -> int:
        return len(self._items)


class ReplacerRegistry(Registry):
    """Replacers, also indexed by module type; lookup walks the module class's MRO.

    ``module_types`` may hold classes or fully qualified class names (``"pkg.mod.Class"``),
    so a replacer for an optional library's layer does not have to import that library.
    """

    def __init__(self) -> None:
        super().__init__("replacer")
        self._by_type: dict[type | str, Registered] = {}

    def add(self, item: Registered) -> None:
        types = tuple(getattr(item.component, "module_types", ()))
        if not types or not all(isinstance(t, (type, str)) for t in types):
            raise PluginLoadError(
                f"{item.origin} registered replacer {item.name!r} without module_types",
                "set module_types = (nn.SomeModule, ...) on the replacer",
            )
        for t in types:
            old = self._by_type.get(t)
            if old is not None:
                raise PluginConflictError(
                    f"module type {_type_name(t)} has two replacers: {old.name!r} from "
                    f"{old.origin} and {item.name!r} from {item.origin}",
                    f"disable one plugin with MONOQUANT_DISABLE_PLUGINS={item.plugin} "
                    f"(or {old.plugin})",
                )
        super().add(item)
        for t in types:
            self._by_type[t] = item

    def discard_plugin(self, plugin: str) -> None:
        super().discard_plugin(plugin)
        self._by_type = {t: r for t, r in self._by_type.items() if r.plugin != plugin}

    def for_type(self, cls: type[nn.Module]) -> Registered | None:
        """The replacer registered for ``cls`` or its nearest base class, or None."""
        for base in cls.__mro__:
            hit = self._by_type.get(base) or self._by_type.get(_type_name(base))
            if hit is not None:
                return hit
        return None

    def handled_names(self) -> list[str]:
        """Short names of every handled module type (for messages)."""
        return sorted({_type_name(t).rpartition(".")[2] for t in self._by_type})


def _type_name(t: type | str) -> str:
    return t if isinstance(t, str) else f"{t.__module__}.{t.__qualname__}"


class Registries:
    """Every registry of one plugin host, plus the loaded plugins' facts.

    Attributes:
        observers / schemes / replacers / serializers / backends: component registries.
        options: plugin name -> the :class:`~monoquant_core.options.PluginOptions` dataclass
            that plugin registered (one per plugin, named after it).
        plugins: plugin name -> :class:`~monoquant_core.loading.PluginInfo` (distribution,
            version; written into files as their producers).
    """

    def __init__(self) -> None:
        self.observers = Registry("observer")
        self.schemes = Registry("scheme")
        self.replacers = ReplacerRegistry()
        self.serializers = Registry("serializer")
        self.backends = Registry("backend")
        self.options = Registry("options")
        self.plugins: dict[str, PluginInfo] = {}

    def of(self, kind: str) -> Registry:
        """The registry of ``kind`` (a key of :data:`KINDS`)."""
        return {
            "observer": self.observers,
            "scheme": self.schemes,
            "replacer": self.replacers,
            "serializer": self.serializers,
            "backend": self.backends,
            "options": self.options,
        }[kind]


# --------------------------------------------------------------------------- backends


def safe_available(backend: Backend) -> bool | str:
    """``backend.available()``: True, or the reason it is not (never raises)."""
    try:
        ok = backend.available()
    except Exception as e:
        return f"available() raised {type(e).__name__}: {e}"
    if ok is True:
        return True
    return ok if isinstance(ok, str) and ok else "not available on this machine"


def ranked_backends(backends: Registry) -> list[Backend]:
    """Available backends, highest priority first (a quantized module's fallbacks)."""
    ranked = sorted(backends, key=lambda r: (-r.component.priority, r.name))
    return [r.component for r in ranked if safe_available(r.component) is True]


def choose_backend(
    backends: Registry, info: WeightInfo, forced: str | None = None
) -> tuple[str, list[str]]:
    """The backend for one weight: ``(name, notes)``; notes say why better ones were not.

    ``forced`` must support the weight. Otherwise the available backend with the highest
    ``priority`` that is meant for the weight (``capabilities.schemes`` / ``activations``) and
    ``supports()`` it wins.

    Raises:
        CapabilityError: the forced backend cannot run the weight, or no backend can.
    """
    if forced is not None:
        why = backends.get(forced).supports(info)
        if why:
            raise CapabilityError(
                f"backend {forced!r} cannot run this weight: {why}",
                "leave --backend (or a rule's backend=) out to choose automatically",
            )
        return forced, []
    notes: list[str] = []
    for reg in sorted(backends, key=lambda r: (-r.component.priority, r.name)):
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
