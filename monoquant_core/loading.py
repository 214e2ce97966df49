"""Plugin discovery: entry points of group ``monoquant``, each loaded in isolation.

A plugin that fails to import costs one warning line naming its distribution and the cause;
the tool keeps working (strict mode makes it fatal). ``MONOQUANT_DISABLE_PLUGINS`` (comma
separated plugin or distribution names) keeps plugins from being imported at all.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import PluginLoadError, PluginLoadWarning

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginInfo",
    "disabled_from_env",
    "iter_entry_points",
    "load_entry_point",
    "report_failure",
    "strict_from_env",
]

ENTRY_POINT_GROUP = "monoquant"
_TRUE = {"1", "true", "yes", "on"}


@dataclass
class PluginInfo:
    """A registered plugin and where it came from (shown by ``monoquant plugins``)."""

    name: str
    plugin: Any
    distribution: str | None = None
    version: str | None = None
    source: str = "entry-point"  # "entry-point", "core", "argument"
    hooks: list[str] = field(default_factory=list)

    @property
    def origin(self) -> str:
        dist = f"{self.distribution} {self.version or ''}".strip() if self.distribution else None
        return f"plugin {self.name!r}" + (f" (distribution {dist})" if dist else "")


def _norm(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def disabled_from_env() -> set[str]:
    """Names in ``MONOQUANT_DISABLE_PLUGINS`` (plugin or distribution names, comma separated)."""
    raw = os.environ.get("MONOQUANT_DISABLE_PLUGINS", "")
    return {_norm(n) for n in raw.split(",") if n.strip()}


def strict_from_env() -> bool:
    return os.environ.get("MONOQUANT_STRICT_PLUGINS", "").strip().lower() in _TRUE


def iter_entry_points(disable: set[str]) -> list[tuple[md.EntryPoint, str | None, str | None]]:
    """Entry points of the ``monoquant`` group, deduplicated, minus disabled ones.

    Returns ``(entry_point, distribution_name, distribution_version)`` in a stable order.
    """
    seen: set[tuple[str, str, str | None]] = set()
    out = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        dname = dist.metadata["Name"] if dist is not None else None
        dver = dist.version if dist is not None else None
        key = (ep.name, ep.value, dname)
        if key in seen:
            continue
        seen.add(key)
        if _norm(ep.name) in disable or (dname and _norm(dname) in disable):
            continue
        out.append((ep, dname, dver))
    out.sort(key=lambda t: (t[1] != "monoquant", t[0].name))
    return out


def load_entry_point(ep: md.EntryPoint, dname: str | None, dver: str | None) -> PluginInfo:
    """Import one entry point; raises :class:`PluginLoadError` naming the distribution."""
    try:
        obj = ep.load()
    except Exception as e:  # any import-time failure of third-party code
        dist = f"{dname} {dver}" if dname else "an unknown distribution"
        raise PluginLoadError(
            f"plugin {ep.name!r} from {dist} failed to load ({ep.value}): {type(e).__name__}: {e}",
            f"upgrade or uninstall {dname or 'it'}, or skip it with "
            f"MONOQUANT_DISABLE_PLUGINS={ep.name}",
        ) from e
    declared = getattr(obj, "monoquant_plugin_name", None)
    if declared is not None and declared != ep.name:
        raise PluginLoadError(
            f"entry point {ep.name!r} of {dname or 'an unknown distribution'} loads a plugin "
            f"that names itself {declared!r}",
            "make the entry point name and monoquant_plugin_name the same (the name prefixes "
            "the plugin's CLI options and is written into files)",
        )
    return PluginInfo(name=ep.name, plugin=obj, distribution=dname, version=dver)


def report_failure(err: PluginLoadError, strict: bool) -> None:
    """Raise in strict mode, else emit one warning line."""
    if strict:
        raise err
    warnings.warn(
        f"monoquant: {err} (the tool keeps working without it)", PluginLoadWarning, stacklevel=3
    )
