"""The ``monoquant`` command line (click): one module per command group, plus the inputs it
reads and the options it shares (see docs/cli.md)."""

from __future__ import annotations

from .app import build_cli, main
from .options import PluginOptionGroup

__all__ = ["PluginOptionGroup", "build_cli", "main"]
