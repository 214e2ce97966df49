"""The ``monoquant`` command line (click).

The command tree is built per Engine, so plugins can add options (``monoquant_add_cli_options``).
Every user error prints one line ``monoquant: problem: ... fix: ...`` and exits with code 1.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click
import torch
from torch import nn

from . import __version__
from .checkpoint import atomic_write, check_output_path
from .config import split_key_values
from .engine import Engine
from .errors import MonoQuantError, PluginLoadError, PluginLoadWarning, UsageError
from .host import safe_available
from .qtensor import sqnr_db
from .report import format_table, human_bytes
from .rules import load_rules_file

__all__ = ["build_cli", "main"]


class _OneLineError(click.ClickException):
    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"monoquant: {self.message}", err=True)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MonoQuantError as e:
            raise _OneLineError(str(e)) from e


class PluginOptionGroup:
    """What ``monoquant_add_cli_options(group)`` receives: ``group.add_option(...)``."""

    def __init__(self, plugin: str):
        self.plugin = plugin
        self.options: list[click.Option] = []

    def add_option(self, *param_decls: str, **attrs: Any) -> None:
        """Add a ``click.Option``; long names are ``--<plugin>`` or start with ``--<plugin>-``.

        The option's parameter name (click's, or an explicit one among ``param_decls``) must
        be ``<plugin>_<key>``: it reaches the plugin as ``config.plugin_options[plugin][key]``.
        """
        prefix = f"--{self.plugin}-"
        longs = [d for d in param_decls if d.startswith("--")]
        if not longs or not all(d.startswith(prefix) or d == prefix[:-1] for d in longs):
            raise PluginLoadError(
                f"plugin {self.plugin!r} adds CLI option {param_decls}, which does not start "
                f"with {prefix!r}",
                f"name plugin options {prefix}<name> (or exactly {prefix[:-1]})",
            )
        opt = click.Option(list(param_decls), **attrs)
        stem = self.plugin.replace("-", "_") + "_"
        if not (opt.name or "").startswith(stem) or opt.name == stem:
            raise PluginLoadError(
                f"plugin {self.plugin!r} adds CLI option {param_decls} with parameter name "
                f"{opt.name!r}, which does not start with {stem!r}",
                f"give it an explicit name such as '{stem}enable' among the declarations",
            )
        self.options.append(opt)


def plugin_cli_options(engine: Engine) -> list[tuple[str, click.Option]]:
    """Call each plugin's ``monoquant_add_cli_options`` with a group bound to it."""
    out = []
    for impl in engine.pm.hook.monoquant_add_cli_options.get_hookimpls():
        group = PluginOptionGroup(impl.plugin_name)
        try:
            impl.function(**({"group": group} if impl.argnames else {}))
        except PluginLoadError as e:
            engine.report_plugin_failure(e)
            continue
        except Exception as e:
            engine.report_plugin_failure(
                PluginLoadError(
                    f"plugin {impl.plugin_name!r} failed in monoquant_add_cli_options: "
                    f"{type(e).__name__}: {e}",
                    f"disable it with MONOQUANT_DISABLE_PLUGINS={impl.plugin_name}",
                )
            )
            continue
        out += [(impl.plugin_name, opt) for opt in group.options]
    return out


# ---------------------------------------------------------------------------- model sources


def _import_factory(spec: str, flag: str = "--model", what: str = "the model") -> Callable[[], Any]:
    mod_name, sep, attr = spec.partition(":")
    if not sep or not mod_name or not attr:
        kind, example = ("factory", "build_model") if flag == "--model" else ("function", "batches")
        raise UsageError(
            f"{flag} {spec!r} is not 'package.module:{kind}'",
            f"write e.g. {flag} mypkg.models:{example}",
        )
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise UsageError(
            f"{flag}: cannot import {mod_name!r} ({e})",
            "install the package or run from the folder that contains it",
        ) from e
    finally:
        sys.path.pop(0)
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UsageError(
                f"{flag}: {mod_name!r} has no attribute {attr!r}",
                f"name a function or class that returns {what}",
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(
            f"{flag}: {spec!r} is not callable", f"name a function that returns {what}"
        )
    return obj


def _natural(name: str) -> tuple[Any, ...]:
    import re

    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _load_calibration(spec: str) -> Any:
    """``--calibration``: a .pt / .safetensors file, or ``pkg.module:function`` (a callable
    returning an iterable of batches)."""
    if not os.path.exists(spec) and ":" in spec and not spec.endswith((".pt", ".safetensors")):
        fn = _import_factory(spec, "--calibration", "an iterable of batches")
        try:
            return fn()
        except MonoQuantError:
            raise
        except Exception as e:
            raise UsageError(
                f"--calibration {spec!r} raised {type(e).__name__}: {e}",
                "fix the function; it must return an iterable of batches (a generator is fine)",
            ) from e
    if not os.path.isfile(spec):
        raise UsageError(
            f"--calibration file {spec!r} does not exist",
            "give a .pt or .safetensors file, or a package.module:function that yields batches",
        )
    if spec.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(spec)
        except SafetensorError as e:
            raise UsageError(
                f"--calibration {spec!r} is not a valid safetensors file ({e})", "check the file"
            ) from None
        return [state[k] for k in sorted(state, key=_natural)]
    try:
        data = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(
            f"--calibration {spec!r} is not loadable with torch.load(weights_only=True) "
            f"({type(e).__name__})",
            "save a tensor or a list of tensors / tuples / dicts with torch.save, or use "
            ".safetensors",
        ) from None
    return data


def _load_weights(model: nn.Module, path: str) -> None:
    if not os.path.isfile(path):
        raise UsageError(f"--weights file {path!r} does not exist", "check the path")
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except SafetensorError as e:
            raise UsageError(
                f"--weights {path!r} is not a valid safetensors file ({e})", "check the file"
            ) from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(
                f"--weights {path!r} is not a plain state_dict loadable with weights_only=True "
                f"({type(e).__name__})",
                "save it with torch.save(model.state_dict(), path) or as .safetensors",
            ) from None
    if not isinstance(state, dict):
        raise UsageError(
            f"--weights {path!r} holds a {type(state).__name__}, not a state_dict",
            "save model.state_dict()",
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[:2]
        raise UsageError(
            f"--weights {path!r} does not fit the model: {' '.join(first)}",
            "pass the weights of this --model",
        ) from None


def _model_from_options(
    demo: bool, model_spec: str | None, weights: str | None
) -> tuple[nn.Module, torch.Tensor | None, str]:
    if demo and model_spec:
        raise UsageError("--demo and --model are exclusive", "pass one of them")
    if demo:
        from .demo import demo_inputs, demo_model

        return demo_model(), demo_inputs(), "bundled demo TinyTransformer"
    if not model_spec:
        raise UsageError("no model given", "pass --demo, or --model package.module:factory")
    built = _import_factory(model_spec)()
    if not isinstance(built, nn.Module):
        raise UsageError(
            f"--model {model_spec!r} returned a {type(built).__name__}, not an nn.Module",
            "return the model from the factory",
        )
    if weights:
        _load_weights(built, weights)
    return built, None, model_spec


# ---------------------------------------------------------------------------- commands


def _model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--demo", is_flag=True, help="Use the bundled demo model (a small seeded transformer)."
        ),
        click.option(
            "--model",
            "model_spec",
            metavar="PKG.MODULE:FACTORY",
            help="Import a callable that returns the nn.Module to quantize.",
        ),
        click.option(
            "--weights",
            type=click.Path(dir_okay=False),
            help="Float weights for --model (.safetensors, or a .pt state_dict).",
        ),
        click.option("--scheme", default="int8", show_default=True, help="Quantization scheme."),
        click.option("--observer", default=None, help="Observer (default: the scheme's)."),
        click.option("--backend", default=None, help="Force a backend (default: best per layer)."),
        click.option(
            "--only",
            multiple=True,
            metavar="GLOB",
            help="Quantize only modules whose name matches (fnmatch; repeatable).",
        ),
        click.option(
            "--skip",
            multiple=True,
            metavar="GLOB",
            help="Never quantize modules whose name matches (fnmatch; repeatable).",
        ),
        click.option(
            "--rule",
            "rule",
            multiple=True,
            metavar="GLOB=SCHEME[,k=v]",
            help="Per-layer override, first match wins: 'lm_head=int8', "
            "'blocks.0.*=int4-group,group_size=32', 'embed=skip' (repeatable).",
        ),
        click.option(
            "--rules",
            "rules_file",
            type=click.Path(dir_okay=False),
            help="Rules file: a JSON list of rules, or TOML [[rule]] tables.",
        ),
        click.option("--scheme-opt", multiple=True, metavar="KEY=VALUE", help="Scheme option."),
        click.option("--observer-opt", multiple=True, metavar="KEY=VALUE", help="Observer option."),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _configure(engine: Engine, plugin_map: dict[str, tuple[str, str]], kw: dict[str, Any]):
    rules: list[Any] = []
    rules_file = kw.pop("rules_file")
    if rules_file:
        rules.extend(load_rules_file(rules_file))
    rules.extend(kw.pop("rule"))
    plugin_options: dict[str, dict[str, Any]] = {}
    for param, (plugin, key) in plugin_map.items():
        if param in kw:
            plugin_options.setdefault(plugin, {})[key] = kw.pop(param)
    return engine.configure(
        scheme=kw.pop("scheme"),
        observer=kw.pop("observer"),
        backend=kw.pop("backend"),
        only=kw.pop("only"),
        skip=kw.pop("skip"),
        scheme_options=split_key_values(kw.pop("scheme_opt"), "--scheme-opt"),
        observer_options=split_key_values(kw.pop("observer_opt"), "--observer-opt"),
        plugin_options=plugin_options,
        rules=rules,
    )


def build_cli(engine: Engine) -> click.Group:
    """The click command tree for ``engine`` (plugin options included)."""
    plugin_opts = plugin_cli_options(engine)
    plugin_map = {}
    for plugin, opt in plugin_opts:
        plugin_map[opt.name] = (plugin, opt.name[len(plugin.replace("-", "_")) + 1 :])

    def with_plugin_options(cmd: click.Command) -> click.Command:
        cmd.params.extend(opt for _, opt in plugin_opts)
        return cmd

    @click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="monoquant")
    @click.option(
        "--strict-plugins",
        is_flag=True,
        help="Fail when a plugin cannot be loaded (also MONOQUANT_STRICT_PLUGINS=1).",
    )
    def cli(strict_plugins: bool) -> None:
        """Mono Quant: post-training quantization for any PyTorch model."""

    @cli.command()
    @click.argument("source", required=False, type=click.Path())
    @_model_options
    @click.option(
        "-o",
        "--output",
        type=click.Path(),
        help="Write the quantized model here (a folder for a folder SOURCE).",
    )
    @click.option("--overwrite", is_flag=True, help="Replace an existing output.")
    @click.option(
        "--report",
        "report_path",
        type=click.Path(dir_okay=False),
        help="Also write the report as JSON.",
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
    @click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors (no progress).")
    def quantize(
        source,
        demo,
        model_spec,
        weights,
        calibration,
        sequential,
        calibration_min_rows,
        output,
        overwrite,
        report_path,
        trust_pickle,
        allow_nonfinite,
        quiet,
        as_json,
        **kw,
    ):
        """Quantize a model or a checkpoint and print the report.

        SOURCE is a checkpoint: a .safetensors file, a folder of shards, or a .pt state_dict
        (checkpoint mode: no model class needed, streamed tensor by tensor). Without SOURCE,
        give --demo or --model.
        """
        config = _configure(engine, plugin_map, kw)
        if report_path:
            check_output_path(report_path, overwrite=True)
        if source is not None:
            if demo or model_spec or weights:
                raise UsageError(
                    "SOURCE and --demo/--model/--weights are exclusive",
                    "give either a checkpoint path or a model",
                )
            if calibration or sequential:
                raise UsageError(
                    "--calibration/--sequential need a model to run, and checkpoint mode "
                    "(a SOURCE file) has none: it is weight-only",
                    "pass --model PKG.MODULE:FACTORY --weights FILE instead of SOURCE",
                )
            if not output:
                raise UsageError("checkpoint mode needs an output", "pass -o OUTPUT")
            report = engine.quantize_checkpoint(
                source,
                output,
                config=config,
                overwrite=overwrite,
                trust_pickle=trust_pickle,
                allow_nonfinite=allow_nonfinite,
                progress=not quiet,
            )
            label = source
        else:
            if output:
                check_output_path(output, overwrite)
            if sequential and not calibration:
                raise UsageError("--sequential needs --calibration", "pass --calibration DATA")
            model, sample, label = _model_from_options(demo, model_spec, weights)
            data = _load_calibration(calibration) if calibration else None
            with torch.no_grad():
                ref = model(sample) if sample is not None else None
                qmodel, report = engine.quantize(
                    model,
                    config=config,
                    calibration=data,
                    sequential=sequential,
                    min_rows=calibration_min_rows,
                    progress=not quiet,
                )
                if sample is not None:
                    report.extra["output_sqnr_db"] = sqnr_db(ref, qmodel(sample))
            if output:
                engine.save(qmodel, output, overwrite=overwrite)
        if report_path:
            text = report.to_json()
            atomic_write(report_path, lambda tmp: _write_text(tmp, text))
        if quiet:
            return
        if as_json:
            click.echo(report.to_json())
            return
        click.echo(f"{label}: {config.scheme} / {config.observer}")
        click.echo(report.render())
        if "output_sqnr_db" in report.extra:
            click.echo(
                f"model output vs float32 on sample inputs: SQNR "
                f"{report.extra['output_sqnr_db']:.2f} dB"
            )
        click.echo(
            f"saved to {output}" if output else "not saved (pass -o FILE.safetensors to save)"
        )

    with_plugin_options(quantize)

    @cli.command()
    @click.argument("source", required=False, type=click.Path())
    @_model_options
    @click.option("--trust-pickle", is_flag=True, help="Allow a .pt SOURCE that needs unpickling.")
    def plan(source, demo, model_spec, weights, trust_pickle, as_json, **kw):
        """Dry run: what would be quantized, with which components, and why not.

        SOURCE (a checkpoint file or folder) is planned from its headers alone.
        """
        config = _configure(engine, plugin_map, kw)
        if source is not None:
            p = engine.plan_checkpoint(source, config=config, trust_pickle=trust_pickle)
        else:
            model, _, _ = _model_from_options(demo, model_spec, weights)
            p = engine.plan(model, config)
        click.echo(json.dumps(p.to_dict(), indent=2) if as_json else p.render())

    with_plugin_options(plan)

    @cli.command()
    @click.argument("path", type=click.Path())
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def inspect(path, as_json):
        """Show what a file or folder holds: format version, producers, per-tensor scheme,
        size and bits per weight (reads headers only)."""
        from .inspection import render_inspect

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
    def verify(original, quantized, min_sqnr, as_json, quiet):
        """Re-read QUANTIZED with the loader and report each tensor's SQNR against ORIGINAL
        and the compression ratio; exit 1 when a check fails (CI quality gate)."""
        from .inspection import render_verify, verify_failed

        res = engine.verify(original, quantized, progress=not quiet)
        click.echo(
            json.dumps(res, indent=2, default=str) if as_json else render_verify(res, min_sqnr)
        )
        if verify_failed(res, min_sqnr):
            low = res["min_sqnr_db"]
            raise UsageError(
                "verification failed: "
                + (f"min SQNR {low:.2f} dB" if low is not None else "no quantized tensor")
                + (f" (threshold {min_sqnr:.2f} dB)" if min_sqnr is not None else "")
                + (f", {len(res['missing'])} tensor(s) missing" if res["missing"] else "")
                + (
                    f", {len(res['mismatched_copies'])} copied tensor(s) altered"
                    if res["mismatched_copies"]
                    else ""
                ),
                "quantize with a finer scheme (e.g. int8, or int4-group with group_size=32) or "
                "lower --min-sqnr",
            )

    @cli.command()
    @click.argument("quantized", type=click.Path())
    @click.argument("out", type=click.Path())
    @click.option("--overwrite", is_flag=True, help="Replace an existing output.")
    @click.option("-q", "--quiet", is_flag=True, help="Print nothing but errors.")
    def dequantize(quantized, out, overwrite, quiet):
        """Write QUANTIZED back as plain float safetensors (same shards) for other tools."""
        n = engine.dequantize_checkpoint(quantized, out, overwrite=overwrite, progress=not quiet)
        if not quiet:
            click.echo(f"wrote {out} ({human_bytes(n)} of float tensors)")

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def env(as_json):
        """Show the detected hardware (CPU instruction set, GPUs) and which backends run here."""
        info = environment(engine)
        if as_json:
            click.echo(json.dumps(info, indent=2))
            return
        for key in (
            "monoquant",
            "torch",
            "python",
            "cpu_capability",
            "threads",
            "quantized_engines",
            "cuda",
            "gpus",
        ):
            value = info[key]
            click.echo(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
        rows = [
            [b["name"], str(b["priority"]), b["available"], ", ".join(b["devices"]), b["numerics"]]
            for b in info["backends"]
        ]
        click.echo("")
        click.echo(format_table(["backend", "priority", "available", "devices", "numerics"], rows))

    @cli.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    def plugins(as_json):
        """List installed plugins: name, distribution, version, hooks, components."""
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

    return cli


def environment(engine: Engine) -> dict[str, Any]:
    """Hardware and backend availability as data (``monoquant env``)."""
    import platform

    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            gpus.append(f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    backends = []
    for reg in sorted(engine.backends, key=lambda r: -r.component.priority):
        be = reg.component
        ok = safe_available(be)
        backends.append(
            {
                "name": reg.name,
                "plugin": reg.plugin,
                "priority": be.priority,
                "devices": list(be.device_types),
                "available": "yes" if ok is True else f"no: {ok}",
                "numerics": be.capabilities.numerics,
            }
        )
    return {
        "monoquant": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "cuda": f"yes ({torch.version.cuda})" if cuda else "no",
        "gpus": gpus or ["none"],
        "backends": backends,
    }


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")


def _one_line_warnings() -> None:
    original = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
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
    cli.main(args=argv, prog_name="monoquant")
