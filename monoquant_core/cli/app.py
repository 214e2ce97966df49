"""The ``monoquant`` command group: built per Engine (plugins add options), with one-line
errors. Every user error prints ``monoquant: problem: ... fix: ...`` and exits with code 1."""

from __future__ import annotations

import sys
import warnings
from typing import Any

import click

from ..engine import Engine
from ..errors import MonoQuantError, PluginLoadWarning
from ..loading import ImportInterrupted
from ..version import __version__
from .demo import add_demo
from .evaluate import add_evaluate
from .files import add_file_commands
from .info import add_info_commands
from .options import add_plugin_commands, plugin_flags
from .plan import add_plan
from .quantize import add_quantize

__all__ = ["build_cli", "main"]


class _OneLineError(click.ClickException):
    exit_code = 1

    def __init__(self, message: str, echo: bool = True):
        super().__init__(message)
        self.echo = echo

    def show(self, file: Any = None) -> None:
        if self.echo:  # False on the ranks > 0 of a distributed run: rank 0 says it once
            click.echo(f"monoquant: {self.message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MonoQuantError as e:
            raise _OneLineError(str(e), getattr(e, "echo", True)) from e


def build_cli(engine: Engine) -> click.Group:
    """The click command tree for ``engine`` (plugin options included)."""

    @click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="monoquant")
    @click.option(
        "--strict-plugins",
        is_flag=True,
        help="Make a broken plugin (an import failure, a misspelt hook, a name clash) an error "
        "instead of a warning (also MONOQUANT_STRICT_PLUGINS=1).",
    )
    def cli(strict_plugins: bool) -> None:
        """Mono Quant: post-training quantization for any PyTorch model."""

    flags = plugin_flags(engine)
    add_quantize(cli, engine, flags)
    add_plan(cli, engine, flags)
    add_file_commands(cli, engine)
    add_evaluate(cli, engine)
    add_info_commands(cli, engine)
    add_demo(cli, engine)
    add_plugin_commands(cli, engine)
    return cli


def _one_line_warnings() -> None:
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):  # type: ignore[no-untyped-def]
        if issubclass(category, PluginLoadWarning):
            click.echo(str(message), err=True)
        else:
            original(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def _global_args(argv: list[str]) -> list[str]:
    """The arguments before the sub-command (global options such as --strict-plugins)."""
    out = []
    for a in argv:
        if not a.startswith("-"):
            break
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``monoquant``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _one_line_warnings()
    try:
        engine = Engine(strict=True if "--strict-plugins" in _global_args(argv) else None)
        cli = build_cli(engine)
    except MonoQuantError as e:
        click.echo(f"monoquant: {e}", err=True)
        sys.exit(1)
    except ImportInterrupted as e:  # Ctrl-C on a plugin that hangs while being imported
        click.echo(f"monoquant: {e}", err=True)
        sys.exit(130)
    cli.main(args=argv, prog_name="monoquant")
