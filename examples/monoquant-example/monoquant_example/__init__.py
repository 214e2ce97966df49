"""monoquant-example: a Mono Quant plugin adding the ``nf4`` scheme and ``--example-verbose``.

Declared in ``pyproject.toml`` as the entry point ``example`` of the group ``monoquant``; the
entry point's name is the plugin's name, so its CLI options start with ``--example-`` and
arrive in ``config.plugin_options["example"]``.
"""

from __future__ import annotations

import sys

from monoquant_core import hookimpl

from .nf4 import NF4Config, NF4Scheme

__all__ = ["NF4Config", "NF4Scheme"]


@hookimpl
def monoquant_register_schemes(register):
    register(NF4Scheme())


@hookimpl
def monoquant_add_cli_options(group):
    group.add_option(
        "--example-verbose",
        is_flag=True,
        help="Print the SQNR of every nf4 layer on stderr (monoquant-example).",
    )


@hookimpl
def monoquant_report(report, config):
    if not config.plugin_options.get("example", {}).get("verbose"):
        return
    layers = [layer for layer in report.layers if layer.scheme == "nf4"]
    report.extra["example"] = {"nf4_layers": len(layers)}
    for layer in layers:
        print(f"example: {layer.name}: nf4 {layer.sqnr_db:.2f} dB", file=sys.stderr)
