"""Engines for tests: fresh, unaffected by the environment, optionally limited to some
distributions."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import Any

from ..engine import Engine
from ..loading import iter_entry_points

__all__ = ["clean_plugin_env", "hermetic_engine"]

_ENV = ("MONOQUANT_DISABLE_PLUGINS", "MONOQUANT_STRICT_PLUGINS")


@contextlib.contextmanager
def clean_plugin_env() -> Iterator[None]:
    """Hide ``MONOQUANT_DISABLE_PLUGINS`` / ``MONOQUANT_STRICT_PLUGINS`` for the block."""
    saved = {k: os.environ.pop(k) for k in _ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def hermetic_engine(
    plugins: Iterable[Any] = (),
    *,
    entry_points: bool = True,
    distributions: Iterable[str] | None = None,
    disable: Iterable[str] = (),
    strict: bool = True,
) -> Engine:
    """A fresh :class:`~monoquant_core.Engine` whose plugins do not depend on the environment.

    Args:
        plugins: plugin objects to register besides the entry points (e.g. your module).
        entry_points: discover installed plugins (``False``: only ``plugins``).
        distributions: when given, only entry points of these distributions load, plus
            ``monoquant``'s built-ins; other installed plugins are left out.
        disable: plugin or distribution names not to load.
        strict: a plugin that fails to load, misspells a hook or clashes with another
            plugin's name or component names raises instead of warning (the default, so a
            broken plugin fails the test that uses it with the real cause).
    """
    disable = {d.strip().lower() for d in disable}
    if entry_points and distributions is not None:
        keep = {"monoquant", *(d.lower() for d in distributions)}
        for ep, dname, _ in iter_entry_points(set()):
            if not dname or dname.lower() not in keep:
                disable.add(ep.name)
    with clean_plugin_env():
        return Engine(
            plugins=list(plugins), entry_points=entry_points, disable=disable, strict=strict
        )
