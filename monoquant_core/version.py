"""The installed distribution's version (``monoquant.__version__``)."""

from __future__ import annotations

import importlib.metadata as _md

__all__ = ["__version__"]

try:
    __version__ = _md.version("monoquant")
except _md.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"
