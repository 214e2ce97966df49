"""Validated component registries (one per kind), stamped with the registering plugin."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from torch import nn

from .errors import PluginConflictError, PluginLoadError, UsageError

__all__ = ["NAME_RE", "Registered", "Registry", "ReplacerRegistry"]

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
                f"choose one of: {avail}, or install the plugin that provides {name!r}",
            ) from None

    def get(self, name: str) -> Any:
        return self.entry(name).component

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
