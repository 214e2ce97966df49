"""``monoquant plan``: the dry run (what would be quantized, how, and why not)."""

from __future__ import annotations

import json
from typing import Any

import click

from ..engine import Engine
from .inputs import model_from_options
from .options import PluginFlags, attach_plugin_flags, config_from, model_options

__all__ = ["add_plan"]


def add_plan(cli: click.Group, engine: Engine, flags: list[PluginFlags]) -> None:
    """Add the ``plan`` command to ``cli``."""

    @cli.command()
    @click.argument("source", required=False, type=click.Path())
    @model_options
    @click.option("--trust-pickle", is_flag=True, help="Allow a .pt SOURCE that needs unpickling.")
    def plan(source: str | None, trust_pickle: bool, **kw: Any) -> None:
        """Dry run: what would be quantized, with which components, and why not.

        SOURCE (a checkpoint file or folder) is planned from its headers alone.
        """
        config = config_from(engine, flags, kw)
        if source is not None:
            p = engine.plan_checkpoint(source, config=config, trust_pickle=trust_pickle)
        else:
            model, _, _ = model_from_options(kw["demo"], kw["model_spec"], kw["weights"])
            p = engine.plan(model, config)
        click.echo(json.dumps(p.to_dict(), indent=2) if kw["as_json"] else p.render())

    attach_plugin_flags(engine, plan, flags)
