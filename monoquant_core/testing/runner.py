"""Run the ``monoquant`` command line in-process, as the console script would."""

from __future__ import annotations

import warnings
from typing import Any

import click
from click.testing import CliRunner, Result

from ..cli import build_cli, main
from ..errors import PluginLoadWarning

__all__ = ["MonoQuantRunner"]


@click.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
def _console_script(argv: tuple[str, ...]) -> None:
    main(list(argv))


class MonoQuantRunner:
    """Invoke ``monoquant`` and get a :class:`click.testing.Result` (``exit_code``,
    ``output``, ``stdout``, ``stderr``).

    Example::

        result = MonoQuantRunner().invoke("quantize", "--demo", "--scheme", "int8")
        assert result.exit_code == 0, result.output
    """

    def __init__(self) -> None:
        self.runner = CliRunner()

    def invoke(self, *args: str, engine: Any = None, input: str | None = None) -> Result:
        """Run ``monoquant ARGS``.

        Args:
            args: the command line after ``monoquant``.
            engine: run the command tree of this Engine; by default the console script's own
                path runs (a new Engine with every installed plugin, the environment
                variables and ``--strict-plugins`` honoured, plugin load warnings printed
                as one line on stderr).
            input: text for stdin.
        """
        if engine is not None:
            return self.runner.invoke(build_cli(engine), list(args), input=input)
        with warnings.catch_warnings():  # main() patches showwarning; keep that local
            warnings.simplefilter("always", PluginLoadWarning)
            return self.runner.invoke(_console_script, list(args), input=input)
