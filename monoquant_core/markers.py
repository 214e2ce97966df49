"""The hook markers: the only part of Mono Quant a plugin must import to implement a hook.

This module imports nothing else from the project, so plugins (and the core's own plugin) can
use :data:`hookimpl` without pulling in the engine.
"""

from __future__ import annotations

import pluggy

__all__ = ["PROJECT", "hookimpl"]

#: the pluggy project name (also the entry-point group)
PROJECT = "monoquant"

#: The marker for hook implementations: ``@hookimpl def monoquant_register_schemes(register)``.
hookimpl = pluggy.HookimplMarker(PROJECT)
