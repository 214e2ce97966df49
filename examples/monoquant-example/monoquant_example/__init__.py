"""monoquant-example: a Mono Quant plugin adding the ``nf4`` scheme and a verbose report.

Declared in ``pyproject.toml`` as the entry point ``example`` of the group ``monoquant``. Its
name is fixed by ``monoquant_plugin_name`` (the same as the entry point's), so it is the same
whether the plugin is installed or passed as an object: the CLI generates ``--example`` and
``--example-opt KEY=VALUE`` for its options, and Python enables it with
``plugin_options={"example": {...}}``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from monoquant_core import PluginOptions, hookimpl

from .nf4 import NF4Config, NF4Scheme

__all__ = ["ExampleOptions", "NF4Config", "NF4Scheme"]

#: the plugin's name (must equal the entry point's name)
monoquant_plugin_name = "example"


@dataclass(frozen=True)
class ExampleOptions(PluginOptions):
    """Print the SQNR of every nf4 layer on stderr (monoquant-example).

    Attributes:
        verbose: print one line per nf4 layer (and count them in ``report.extra``).
    """

    verbose: bool = True


@hookimpl
def monoquant_register_schemes(register):
    register(NF4Scheme())


@hookimpl
def monoquant_register_options(register):
    register(ExampleOptions)


@hookimpl
def monoquant_add_cli_options(group):
    group.add_option("--example-verbose", is_flag=True, default=None, help="Same as --example.")


@hookimpl
def monoquant_report(report, run):
    opts = run.options("example")
    if opts is None or not opts.verbose:
        return
    layers = [layer for layer in report.layers if layer.scheme == "nf4"]
    report.extra["example"] = {"nf4_layers": len(layers)}
    for layer in layers:
        db = "-" if layer.sqnr_db is None else f"{layer.sqnr_db:.2f}"  # None: --stats off
        print(f"example: {layer.name}: nf4 {db} dB", file=sys.stderr)
