"""``monoquant env`` and ``monoquant plugins``: this machine and the installed plugins."""

from __future__ import annotations

import json

import click

from ..engine import Engine
from ..hardware import SHOWCASE_SHAPE, environment
from ..loading import slow_import_after
from ..tables import format_table

__all__ = ["add_info_commands"]

_ENV_KEYS = (
    "monoquant",
    "torch",
    "python",
    "cpu_capability",
    "isa",
    "threads",
    "quantized_engines",
    "cuda",
    "gpus",
)


def add_info_commands(cli: click.Group, engine: Engine) -> None:
    """Add ``env`` and ``plugins`` to ``cli``."""

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def env(as_json: bool) -> None:
        """Show the detected hardware (CPU instruction set, GPUs) and which backends run here."""
        info = environment(engine.registries)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        for key in _ENV_KEYS:
            value = info[key]
            click.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
        rows = [
            [b["name"], str(b["priority"]), b["available"], ", ".join(b["devices"]), b["numerics"]]
            for b in info["backends"]
        ]
        click.echo("")
        click.echo(format_table(["backend", "priority", "available", "devices", "numerics"], rows))
        w = "x".join(map(str, SHOWCASE_SHAPE))
        for b in info["backends"]:
            if b["kernels"]:
                click.echo(f"\n{b['name']} kernels (a {w} weight, by input rows M):")
                for label, kernels in b["kernels"].items():
                    click.echo(f"  {label}: {'; '.join(kernels)}")

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def plugins(as_json: bool) -> None:
        """List installed plugins: name, distribution, version, hooks, components.

        Plugins that failed to load are listed after the table, and so are plugins whose
        import took longer than MONOQUANT_SLOW_IMPORT_S seconds (default 10). A plugin that
        hangs while being imported is named on stderr after that time.
        """
        data = engine.plugins()
        failed = [str(f) for f in engine.failures]
        if as_json:
            click.echo(json.dumps({"plugins": data, "failed": failed}, indent=2))
            return
        rows = []
        for p in data:
            comps = "; ".join(f"{k}: {', '.join(v)}" for k, v in p["components"].items())
            rows.append(
                [
                    p["name"],
                    p["distribution"] or f"({p['source']})",
                    p["version"] or "",
                    comps or ", ".join(h.removeprefix("monoquant_") for h in p["hooks"]),
                ]
            )
        click.echo(format_table(["plugin", "distribution", "version", "provides"], rows))
        for f in failed:
            click.echo(f"failed to load: {f}")
        slow_s = slow_import_after()
        for p in data:
            if slow_s is not None and (p["import_s"] or 0) >= slow_s:
                click.echo(
                    f"slow to import: plugin {p['name']!r} took {p['import_s']:.1f} s; "
                    f"MONOQUANT_DISABLE_PLUGINS={p['name']} skips it"
                )
