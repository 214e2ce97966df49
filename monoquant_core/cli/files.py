"""``monoquant inspect``, ``verify``, ``dequantize`` and ``export``: working with saved
files."""

from __future__ import annotations

import json

import click

from ..batches import iter_batches
from ..engine import Engine
from ..errors import UsageError
from ..inspection import render_inspect, render_verify, verify_error
from ..tables import human_bytes
from .inputs import load_calibration, model_input
from .options import model_source_options

__all__ = ["add_file_commands"]


def add_file_commands(cli: click.Group, engine: Engine) -> None:
    """Add ``inspect``, ``verify``, ``dequantize`` and ``export`` to ``cli``."""

    @cli.command()
    @click.argument("path", type=click.Path())
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def inspect(path: str, as_json: bool) -> None:
        """Show what a file or folder holds: format version, producers, per-tensor scheme,
        size and bits per weight (reads headers only)."""
        info = engine.inspect(path)
        click.echo(json.dumps(info, indent=2) if as_json else render_inspect(info))

    @cli.command()
    @click.argument("original", type=click.Path())
    @click.argument("quantized", type=click.Path())
    @click.option(
        "--min-sqnr",
        type=float,
        default=None,
        metavar="DB",
        help="Fail (exit 1) if any quantized tensor's SQNR is below DB.",
    )
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @click.option("-q", "--quiet", is_flag=True, help="No progress line.")
    def verify(
        original: str, quantized: str, min_sqnr: float | None, as_json: bool, quiet: bool
    ) -> None:
        """Re-read QUANTIZED with the loader and report each tensor's SQNR against ORIGINAL
        and the compression ratio; exit 1 when a check fails (CI quality gate)."""
        res = engine.verify(original, quantized, progress=not quiet)
        click.echo(
            json.dumps(res, indent=2, default=str) if as_json else render_verify(res, min_sqnr)
        )
        err = verify_error(res, min_sqnr)
        if err is not None:
            raise err

    @cli.command()
    @click.argument("quantized", type=click.Path())
    @click.argument("out", type=click.Path())
    @click.option("--overwrite", is_flag=True, help="Replace an existing output.")
    @click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
    def dequantize(quantized: str, out: str, overwrite: bool, quiet: bool) -> None:
        """Write QUANTIZED back as plain float safetensors (same shards) for other tools."""
        n = engine.dequantize_checkpoint(quantized, out, overwrite=overwrite, progress=not quiet)
        if not quiet:
            click.echo(f"wrote {out} ({human_bytes(n)} of float tensors)")

    @cli.command()
    @click.argument("quantized", type=click.Path())
    @click.option("-o", "--output", required=True, type=click.Path(), help="Write here.")
    @click.option(
        "--format",
        "out_format",
        required=True,
        metavar="NAME",
        help="Target format: a serializer name: compressed-tensors (transformers / vLLM), or "
        "onnx (onnxruntime; needs --model or --demo and --example-input).",
    )
    @model_source_options(
        "For graph formats (onnx): a callable returning the float model QUANTIZED was "
        "quantized from (its weights come from QUANTIZED).",
        weights=False,
    )
    @click.option(
        "--example-input",
        metavar="FILE",
        help="For graph formats: a .pt file with the input to trace the model with (a tensor or "
        "a tuple of tensors; a list of batches: the first), or a .safetensors file.",
    )
    @click.option("--overwrite", is_flag=True, help="Replace an existing output.")
    @click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
    def export(
        quantized: str,
        output: str,
        out_format: str,
        demo: bool,
        model_spec: str | None,
        example_input: str | None,
        overwrite: bool,
        quiet: bool,
    ) -> None:
        """Rewrite QUANTIZED (a file or folder written by monoquant quantize) in another format
        without quantizing again: same codes and scales; for compressed-tensors the same shards
        and copied files (a transformers config.json gets the format's quantization_config),
        for onnx one graph traced from the model (docs/deploy.md)."""
        ser = engine.registries.serializers.get(out_format)  # unknown name: one line, first
        if not ser.needs_model:
            if demo or model_spec or example_input:
                raise UsageError(
                    f"--model/--demo/--example-input are for graph formats; {out_format} "
                    "rewrites the tensors only",
                    "drop them, or choose --format onnx",
                )
            res = engine.export(
                quantized, output, out_format, overwrite=overwrite, progress=not quiet
            )
            if not quiet:
                click.echo(
                    f"wrote {output} as {out_format}: {res['quantized']} quantized and "
                    f"{res['tensors']} other tensors, {human_bytes(res['bytes'])}"
                )
            return
        source = model_input(demo, model_spec, None)
        if example_input is None and not demo:
            raise UsageError(
                f"--format {out_format} traces the model and needs --example-input FILE",
                "save one input with torch.save(x, 'x.pt') and pass --example-input x.pt",
            )
        model, sample, _ = source.build()
        example = sample if example_input is None else _first_batch(example_input)
        res = engine.export(
            quantized, output, out_format, model=model, example_inputs=example,
            overwrite=overwrite,
        )  # fmt: skip
        if not quiet:
            what = ", ".join(f"{v} {k}" for k, v in res.items())
            click.echo(f"wrote {output} as {out_format} ({what} layers)")


def _first_batch(spec: str) -> tuple:
    args, kwargs = next(iter_batches(load_calibration(spec)))
    if kwargs:
        raise UsageError(
            f"--example-input {spec!r} holds keyword inputs {sorted(kwargs)}",
            "save the inputs as a tensor or a tuple of positional tensors",
        )
    return args
