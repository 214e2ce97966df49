"""Generate ``docs/cli.md`` from the click command tree.

Run from the repository root::

    python -m monoquant_core.testing.clidoc > docs/cli.md

The page lists the built-in commands and options only (plugins installed in the environment
are left out), so the output is the same on every machine. ``tests/docs/test_cli_doc.py``
regenerates it and fails when ``docs/cli.md`` differs: change the help texts in
``monoquant_core/cli.py``, then rerun the command above.
"""

from __future__ import annotations

import inspect
import sys

import click

from ..cli import build_cli
from .engines import hermetic_engine

__all__ = ["render_cli_doc"]

_WIDTH = 100
_HEADER = """\
# Command line reference

<!-- Generated from the click command tree by `python -m monoquant_core.testing.clidoc >
docs/cli.md`; tests/docs/test_cli_doc.py fails when this page is out of date. Edit the help
texts in monoquant_core/cli.py, not this page. -->

Every command prints errors as one line `monoquant: problem: ... fix: ...` and exits with
code 1. Installed plugins can add options to `quantize` and `plan`
(`monoquant_add_cli_options`, named `--<plugin>-<option>`); this page shows the built-in
ones. `monoquant COMMAND --help` lists the options of your installation, plugins included.
"""


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("*", "\\*").replace("<", "&lt;")


def _command(cmd: click.Command, ctx: click.Context, path: str) -> list[str]:
    out = [f"## `{path}`", ""]
    if cmd.help:
        out += [inspect.cleandoc(cmd.help).replace("\b\n", ""), ""]
    usage = " ".join([path, *cmd.collect_usage_pieces(ctx)])
    out += ["```text", f"Usage: {usage}", "```", ""]
    options = [p for p in cmd.get_params(ctx) if isinstance(p, click.Option)]
    rows = [r for r in (p.get_help_record(ctx) for p in options) if r]
    if rows:
        out += ["| Option | Description |", "|---|---|"]
        out += [f"| `{decl}` | {_escape(' '.join(text.split()))} |" for decl, text in rows]
        out.append("")
    return out


def render_cli_doc() -> str:
    """The Markdown of ``docs/cli.md`` for the built-in plugins."""
    cli = build_cli(hermetic_engine(distributions=()))
    ctx = cli.make_context("monoquant", [], resilient_parsing=True, terminal_width=_WIDTH)
    lines = [_HEADER]
    names = cli.list_commands(ctx)
    lines += _command(cli, ctx, "monoquant")
    lines += ["Commands:", ""]
    for name in names:
        short = cli.get_command(ctx, name).get_short_help_str(limit=_WIDTH)
        lines.append(f"- [`{name}`](#monoquant-{name}): {_escape(short)}")
    lines.append("")
    for name in names:
        cmd = cli.get_command(ctx, name)
        sub = cmd.make_context(name, [], parent=ctx, resilient_parsing=True)
        lines += _command(cmd, sub, f"monoquant {name}")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(render_cli_doc())


if __name__ == "__main__":
    main()
