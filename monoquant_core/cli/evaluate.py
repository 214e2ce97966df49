"""``monoquant evaluate``: the float model against quantized files of it, on the user's data."""

from __future__ import annotations

import json

import click

from ..atomic import atomic_write, check_output_path
from ..engine import Engine
from ..evaluation import evaluation_error, evaluation_html, render_evaluation
from .inputs import load_calibration, model_input, write_text
from .options import model_source_options, report_options

__all__ = ["add_evaluate"]


def add_evaluate(cli: click.Group, engine: Engine) -> None:
    """Add the ``evaluate`` command to ``cli``."""

    @cli.command()
    @click.argument("quantized", nargs=-1, type=click.Path())
    @model_source_options("Import a callable that returns the float nn.Module.")
    @click.option(
        "--data",
        required=True,
        metavar="FILE|PKG.MODULE:FN",
        help="Inputs, in the --calibration formats: a .pt file (a tensor, or a list of batches), "
        "a .safetensors file (one batch per tensor), or a function returning batches.",
    )
    @click.option("--backend", default=None, help="Force a backend for the quantized models.")
    @click.option(
        "--top1/--no-top1",
        default=None,
        help="Report arg-max agreement of the first output (default: only for 2-D outputs).",
    )
    @click.option("--min-sqnr", type=float, default=None, metavar="DB", help="Fail under DB.")
    @click.option(
        "--min-cosine", type=float, default=None, metavar="C", help="Fail under this cosine."
    )
    @report_options("SQNR bars and the table")
    def evaluate(
        quantized: tuple[str, ...],
        demo: bool,
        model_spec: str | None,
        weights: str | None,
        data: str,
        backend: str | None,
        top1: bool | None,
        min_sqnr: float | None,
        min_cosine: float | None,
        as_json: bool,
        html_path: str | None,
    ) -> None:
        """Run the float model and each QUANTIZED file or folder of it on your inputs and
        compare the outputs: SQNR, cosine, max error, top-1 agreement, size and bits per
        weight, side by side; exit 1 under --min-sqnr / --min-cosine (a CI gate)."""
        if html_path:
            check_output_path(html_path, overwrite=True)
        source = model_input(demo, model_spec, weights)
        batches = load_calibration(data)
        res = engine.evaluate(
            lambda: source.build()[0], list(quantized), batches, backend=backend, top1=top1
        )
        if as_json:
            click.echo(json.dumps(res, indent=2, default=str))
        else:
            click.echo(render_evaluation(res, min_sqnr, min_cosine))
        if html_path:
            text = evaluation_html(res)
            atomic_write(html_path, lambda tmp: write_text(tmp, text))
        err = evaluation_error(res, min_sqnr, min_cosine)
        if err is not None:
            raise err
