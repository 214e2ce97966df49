"""``monoquant quantize``: a model (module mode) or a checkpoint (checkpoint mode)."""

from __future__ import annotations

import os
from typing import Any

import click
import torch

from ..atomic import atomic_write, check_output_path
from ..engine import Engine
from ..errors import UsageError
from ..metrics import sqnr_db
from ..report import QuantReport
from .inputs import load_calibration, model_input, write_text
from .options import PluginFlags, attach_plugin_flags, config_from, model_options

__all__ = ["add_quantize"]


def add_quantize(cli: click.Group, engine: Engine, flags: list[PluginFlags]) -> None:
    """Add the ``quantize`` command to ``cli``."""

    @cli.command()
    @click.argument("source", required=False, type=click.Path())
    @model_options
    @click.option(
        "-o",
        "--output",
        type=click.Path(),
        help="Write the quantized model here (a folder for a folder SOURCE).",
    )
    @click.option("--overwrite", is_flag=True, help="Replace an existing output.")
    @click.option(
        "--format",
        "out_format",
        metavar="NAME",
        default=None,
        help="Output format: a serializer name (`monoquant plugins`): safetensors (default, "
        "Mono Quant's own) or compressed-tensors (for transformers / vLLM; int8 and int4-group "
        "with integer zero points).",
    )
    @click.option(
        "--report",
        "report_path",
        type=click.Path(dir_okay=False),
        help="Also write the report as JSON.",
    )
    @click.option(
        "--html",
        "html_path",
        type=click.Path(dir_okay=False),
        help="Also write the report as one self-contained HTML page (bars and tables).",
    )
    @click.option(
        "--trust-pickle",
        is_flag=True,
        help="Allow a .pt SOURCE that needs full unpickling (runs code from the file).",
    )
    @click.option(
        "--allow-nonfinite",
        is_flag=True,
        help="Keep tensors holding NaN/Inf in float instead of refusing the run.",
    )
    @click.option(
        "--calibration",
        metavar="FILE|PKG.MODULE:FN",
        help="Calibration data for --model/--demo: a .pt file (a tensor, or a list of tensors / "
        "tuples / dicts of model inputs, one per batch), a .safetensors file (one batch per "
        "tensor, in name order), or a function returning an iterable of batches.",
    )
    @click.option(
        "--sequential",
        is_flag=True,
        help="With --calibration: calibrate and quantize layer by layer in execution order, "
        "each layer seeing the outputs of the already quantized ones.",
    )
    @click.option(
        "--calibration-min-rows",
        type=click.IntRange(min=1),
        default=32,
        show_default=True,
        help="Warn when a layer saw fewer calibration input rows than this.",
    )
    @click.option(
        "--stats",
        type=click.Choice(["sample", "full", "off"]),
        default="sample",
        show_default=True,
        help="Per-weight error statistics in the report: exact up to ~1M elements and sampled "
        "rows above (sample), every element (full), or sizes only (off).",
    )
    @click.option(
        "--resume",
        is_flag=True,
        help="Checkpoint mode: continue an interrupted run into the same -o, reusing the tensors "
        "it finished (kept in OUTPUT.monoquant-partial) when their settings and input bytes "
        "are unchanged.",
    )
    @click.option(
        "--workers",
        type=click.IntRange(min=1),
        default=1,
        show_default=True,
        help="Checkpoint mode: split the tensors between N processes on this machine (each "
        "with cores/N threads); the output is byte-identical. Across machines use torchrun "
        "(docs/scale.md).",
    )
    @click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (no progress).")
    def quantize(
        source: str | None, report_path: str | None, html_path: str | None, **kw: Any
    ) -> None:
        """Quantize a model or a checkpoint and print the report.

        SOURCE is a checkpoint: a .safetensors file, a folder of shards, or a .pt state_dict
        (checkpoint mode: no model class needed, streamed tensor by tensor). Without SOURCE,
        give --demo or --model.
        """
        config = config_from(engine, flags, kw)
        if kw["out_format"]:
            engine.registries.serializers.get(kw["out_format"])  # an unknown name: one line
        for path in (report_path, html_path):
            if path:
                check_output_path(path, overwrite=True)
        if source is not None:
            report, label = _checkpoint_mode(engine, config, source, kw)
        else:
            report, label = _module_mode(engine, config, kw)
        if int(os.environ.get("RANK", "0") or 0) != 0:
            return  # a torchrun rank other than 0: rank 0 writes the report and prints it
        if report_path:
            text = report.to_json()
            atomic_write(report_path, lambda tmp: write_text(tmp, text))
        if html_path:
            page = report.to_html()
            atomic_write(html_path, lambda tmp: write_text(tmp, page))
        if not kw["quiet"]:
            _show(report, f"{label}: {config.scheme} / {config.observer}", kw)

    attach_plugin_flags(engine, quantize, flags)


def _checkpoint_mode(
    engine: Engine, config: Any, source: str, kw: dict[str, Any]
) -> tuple[QuantReport, str]:
    if kw["demo"] or kw["model_spec"] or kw["weights"]:
        raise UsageError(
            "SOURCE and --demo/--model/--weights are exclusive",
            "give either a checkpoint path or a model",
        )
    if kw["calibration"] or kw["sequential"]:
        raise UsageError(
            "--calibration/--sequential need a model to run, and checkpoint mode (a SOURCE "
            "file) has none: it is weight-only",
            "pass --model PKG.MODULE:FACTORY --weights FILE instead of SOURCE",
        )
    if not kw["output"]:
        raise UsageError("checkpoint mode needs an output", "pass -o OUTPUT")
    report = engine.quantize_checkpoint(
        source,
        kw["output"],
        config=config,
        overwrite=kw["overwrite"],
        trust_pickle=kw["trust_pickle"],
        allow_nonfinite=kw["allow_nonfinite"],
        progress=not kw["quiet"],
        serializer=kw["out_format"],
        resume=kw["resume"],
        workers=kw["workers"],
    )
    return report, source


def _module_mode(engine: Engine, config: Any, kw: dict[str, Any]) -> tuple[QuantReport, str]:
    """Every argument that can be checked without the model is checked before it is built
    (building a real model takes seconds): the output path, --sequential, the model flags and
    the factory's import, the calibration data (loaded), the --weights file (read)."""
    output = kw["output"]
    if output:
        check_output_path(output, kw["overwrite"])
    if kw["sequential"] and not kw["calibration"]:
        raise UsageError(
            "--sequential needs --calibration (it runs the calibration data layer by layer)",
            "pass --calibration FILE, or drop --sequential",
        )
    for flag, value in (("--resume", kw["resume"]), ("--workers", kw["workers"] > 1)):
        if value:
            raise UsageError(
                f"{flag} is for checkpoint mode (a SOURCE checkpoint); module mode quantizes "
                "one model in one process",
                f"drop {flag}, or quantize the checkpoint file: monoquant quantize SOURCE -o OUT",
            )
    source = model_input(kw["demo"], kw["model_spec"], kw["weights"])
    data = load_calibration(kw["calibration"]) if kw["calibration"] else None
    model, sample, label = source.build()
    with torch.no_grad():
        ref = model(sample) if sample is not None else None
        qmodel, report = engine.quantize(
            model,
            config=config,
            calibration=data,
            sequential=kw["sequential"],
            min_rows=kw["calibration_min_rows"],
            progress=not kw["quiet"],
        )
        if sample is not None:
            report.extra["output_sqnr_db"] = sqnr_db(ref, qmodel(sample))
    if output:
        engine.save(qmodel, output, serializer=kw["out_format"], overwrite=kw["overwrite"])
    return report, label


def _show(report: QuantReport, title: str, kw: dict[str, Any]) -> None:
    if kw["as_json"]:
        click.echo(report.to_json())
        return
    click.echo(title)
    click.echo(report.render())
    if "output_sqnr_db" in report.extra:
        click.echo(
            "model output vs float32 on sample inputs: SQNR "
            f"{report.extra['output_sqnr_db']:.2f} dB"
        )
    output = kw["output"]
    click.echo(f"saved to {output}" if output else "not saved (pass -o FILE.safetensors to save)")
