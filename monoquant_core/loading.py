"""Plugin discovery: entry points of group ``monoquant``, each loaded in isolation.

A plugin that fails to import (an exception or ``sys.exit()``) costs one warning line naming
its distribution and the cause; the tool keeps working (strict mode makes it fatal).
``MONOQUANT_DISABLE_PLUGINS`` (comma separated plugin or distribution names) keeps plugins
from being imported at all. A plugin still importing after ``MONOQUANT_SLOW_IMPORT_S``
seconds (default 10) gets one line on stderr saying how to skip it: a hanging import cannot
be interrupted from inside the process, so that line is how the user finds the culprit.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import MonoQuantError, PluginLoadError, PluginLoadWarning

__all__ = [
    "ENTRY_POINT_GROUP",
    "ImportInterrupted",
    "PluginInfo",
    "disabled_from_env",
    "iter_entry_points",
    "load_entry_point",
    "report_failure",
    "slow_import_after",
    "strict_from_env",
]

ENTRY_POINT_GROUP = "monoquant"
_TRUE = {"1", "true", "yes", "on"}
#: seconds an entry point may import before the "has been importing for" line is printed
SLOW_IMPORT_S = 10.0


class ImportInterrupted(KeyboardInterrupt):
    """Ctrl-C while a plugin was being imported (a ``KeyboardInterrupt``, so it ends the
    process as usual); names the plugin so that the command line can say how to skip it."""

    def __init__(self, plugin: str, distribution: str):
        self.plugin, self.distribution = plugin, distribution
        super().__init__(
            f"interrupted while importing plugin {plugin!r} ({distribution}); "
            f"MONOQUANT_DISABLE_PLUGINS={plugin} skips it"
        )


@dataclass
class PluginInfo:
    """A registered plugin and where it came from (shown by ``monoquant plugins``)."""

    name: str
    plugin: Any
    distribution: str | None = None
    version: str | None = None
    source: str = "entry-point"  # "entry-point", "core", "argument"
    hooks: list[str] = field(default_factory=list)
    #: seconds its import took (None: not imported from an entry point)
    import_s: float | None = None

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


def slow_import_after() -> float | None:
    """``MONOQUANT_SLOW_IMPORT_S`` (seconds, default 10; ``0`` turns the hint off)."""
    raw = os.environ.get("MONOQUANT_SLOW_IMPORT_S", "").strip()
    try:
        after = float(raw) if raw else SLOW_IMPORT_S
    except ValueError:
        after = SLOW_IMPORT_S
    return after if after > 0 else None


def _dist(dname: str | None, dver: str | None) -> str:
    return f"{dname} {dver}".strip() if dname else "an unknown distribution"


def _hint_slow_import(name: str, dist: str, after: float) -> None:
    """The one line printed while an entry point is still importing (from a timer thread)."""
    try:
        sys.stderr.write(
            f"monoquant: plugin {name!r} ({dist}) has been importing for {after:g} s; "
            f"MONOQUANT_DISABLE_PLUGINS={name} skips it\n"
        )
        sys.stderr.flush()
    except Exception:  # stderr closed or replaced: the hint is best effort
        pass


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
    """Import one entry point; raises :class:`PluginLoadError` naming the distribution.

    Any exception of the import is caught, ``SystemExit`` included (a plugin calling
    ``sys.exit()`` must not end every command); ``KeyboardInterrupt`` goes through. While the
    import takes longer than :func:`slow_import_after` seconds, one line on stderr names the
    plugin and the ``MONOQUANT_DISABLE_PLUGINS`` value that skips it; Ctrl-C during the import
    raises :class:`ImportInterrupted` (a ``KeyboardInterrupt``) naming it.
    """
    dist = _dist(dname, dver)
    after = slow_import_after()
    timer = None
    if after is not None:
        timer = threading.Timer(after, _hint_slow_import, (ep.name, dist, after))
        timer.daemon = True
        timer.start()
    start = time.perf_counter()
    try:
        obj = ep.load()
    except KeyboardInterrupt as e:  # goes through, naming the plugin (a hanging import?)
        raise ImportInterrupted(ep.name, dist) from e
    except (Exception, SystemExit) as e:  # any import-time failure of third-party code
        cause = (
            f"it called sys.exit({e.code!r}) while being imported"
            if isinstance(e, SystemExit)
            else f"{type(e).__name__}: {e}"
        )
        raise PluginLoadError(
            f"plugin {ep.name!r} from {dist} failed to load ({ep.value}): {cause}",
            f"upgrade or uninstall {dname or 'it'}, or skip it with "
            f"MONOQUANT_DISABLE_PLUGINS={ep.name}",
        ) from e
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()  # no thread left behind (a forked --workers rank needs none)
    took = time.perf_counter() - start
    declared = getattr(obj, "monoquant_plugin_name", None)
    if declared is not None and declared != ep.name:
        raise PluginLoadError(
            f"entry point {ep.name!r} of {dname or 'an unknown distribution'} loads a plugin "
            f"that names itself {declared!r}",
            "make the entry point name and monoquant_plugin_name the same (the name prefixes "
            "the plugin's CLI options and is written into files)",
        )
    return PluginInfo(name=ep.name, plugin=obj, distribution=dname, version=dver, import_s=took)


def report_failure(err: MonoQuantError, strict: bool, left_out: str | None = None) -> None:
    """Raise in strict mode, else emit one warning line (``left_out``: what the tool keeps
    working without, e.g. ``"plugin 'clash'"``; default "it")."""
    if strict:
        raise err
    warnings.warn(
        f"monoquant: {err} (the tool keeps working without {left_out or 'it'})",
        PluginLoadWarning,
        stacklevel=3,
    )
