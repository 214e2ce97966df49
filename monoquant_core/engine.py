"""The Engine: the public verbs. Each verb that runs hooks is one run (``self.run(config)``)
handed to the module that does the job: module_mode, streaming, files, inspection. There is no
module-global state: two Engines in one process are independent.
"""

from __future__ import annotations

import copy
import importlib
import os
from collections.abc import Callable
from typing import Any

from torch import nn

from .checkpoint_mode import quantize_checkpoint
from .config import Config, build_config
from .distributed import spawn_ranks
from .errors import UsageError
from .evaluation import evaluate_files
from .files import export_model_file, load_model, save_model
from .hooks import call_each
from .host import PluginHost
from .inspection import inspect_path, verify_paths
from .module_mode import calibrate_model, plan_model, quantize_model
from .plan import Plan, QuantResult
from .report import QuantReport
from .rewriting import dequantize_checkpoint, export_checkpoint
from .sources import read_artifact
from .streaming import plan_checkpoint

__all__ = ["Engine"]


def _checkpoint_rank(
    spec: tuple[Any, ...], cfg: Config, src: str, dst: str, kwargs: dict[str, Any]
) -> QuantReport:
    """One ``workers=N`` rank: the same engine, rebuilt from ``spec``, on this rank's share."""
    entry_points, disable, strict, given = spec
    plugins = [importlib.import_module(v) if kind == "module" else v for kind, v in given]
    engine = Engine(plugins, entry_points=entry_points, disable=disable, strict=strict)
    return engine.quantize_checkpoint(src, dst, config=cfg, **kwargs)


class Engine(PluginHost):
    """Plugin host and the verbs of Mono Quant.

    Args:
        plugins: extra plugin objects (modules or instances with ``@hookimpl`` functions).
        entry_points: discover plugins of the ``monoquant`` entry-point group (built-ins are
            declared there too); ``False`` gives a hermetic engine with only ``plugins``.
        disable: plugin or distribution names not to load (``MONOQUANT_DISABLE_PLUGINS``).
        strict: make a plugin that fails to load fatal (``MONOQUANT_STRICT_PLUGINS``).

    Example: ``model, report = Engine().quantize(model, scheme="int8")``.
    """

    def configure(self, scheme: str = "int8", **options: Any) -> Config:
        """Validate names and options into a frozen :class:`Config` (no hooks are called).

        Keywords: ``scheme``, ``observer``, ``backend`` (force one), ``only`` / ``skip``
        (fnmatch patterns), ``scheme_options``, ``observer_options``, ``plugin_options``
        (``{"gptq": {...}}`` enables that plugin; see docs/plugins/options.md) and ``rules``
        (per-layer overrides, first match wins: ``"lm_head=int8"``, ``"embed=skip"``; see
        :mod:`monoquant_core.rules`).
        """
        return build_config(self.registries, scheme, **options)

    def _config(self, config: Config | None, options: dict[str, Any]) -> Config:
        if config is None:
            return self.configure(**options)
        if options:
            raise UsageError(
                f"both config= and keyword options ({', '.join(sorted(options))}) were given",
                "pass a Config from Engine.configure(...), or the keywords, not both",
            )
        return config

    # ------------------------------------------------------------------ module mode

    def plan(self, model: nn.Module, config: Config | None = None, **options: Any) -> Plan:
        """Dry run: the :class:`Plan` for ``model`` (configure, modify_plan, unconfigure)."""
        with self.run(self._config(config, options)) as run:
            return plan_model(run, model)

    def quantize(
        self,
        model: nn.Module,
        *,
        config: Config | None = None,
        calibration: Any = None,
        sequential: bool = False,
        min_rows: int = 32,
        progress: bool = True,
        **options: Any,
    ) -> QuantResult:
        """Quantize ``model`` in place, transactionally: ``QuantResult(model, report)``.

        Every plan entry is quantized first; modules are swapped in only when all succeeded,
        so an error leaves the model untouched. Always use the returned model (a bare
        ``nn.Linear`` passed as the model is itself replaced). ``config``: from
        :meth:`configure`, or pass its keywords. ``calibration``: batches of model inputs
        (see :mod:`monoquant_core.batches`), needed by ``activations="static"`` and ``gptq``.
        ``sequential``: calibrate and quantize one layer at a time in execution order (needs
        ``calibration``). ``min_rows``: warn when a layer saw fewer calibration rows.
        """
        with self.run(self._config(config, options)) as run:
            return quantize_model(
                run,
                model,
                calibration=calibration,
                sequential=sequential,
                min_rows=min_rows,
                progress=progress,
            )

    def calibrate(
        self,
        model: nn.Module,
        data: Any,
        *,
        config: Config | None = None,
        min_rows: int = 32,
        progress: bool = True,
        **options: Any,
    ) -> Plan:
        """Calibration only (the model is not changed): the :class:`Plan` whose selected entries
        hold ``collected`` and ``calibration_rows``; entries that saw no data and need it are
        switched to their weight-only variant, with the reason in ``notes``."""
        with self.run(self._config(config, options)) as run:
            return calibrate_model(run, model, data, min_rows=min_rows, progress=progress)

    # ------------------------------------------------------------------ checkpoint mode

    def quantize_checkpoint(
        self,
        src: str,
        dst: str,
        *,
        config: Config | None = None,
        overwrite: bool = False,
        trust_pickle: bool = False,
        allow_nonfinite: bool = False,
        progress: bool = True,
        serializer: str | None = None,
        resume: bool = False,
        workers: int = 1,
        distributed: bool | None = None,
        **options: Any,
    ) -> QuantReport:
        """Quantize a checkpoint without its model class, streaming tensor by tensor, and
        return the report (docs/checkpoints.md).

        ``src`` is a ``.safetensors`` file, a folder of shards, or a ``.pt`` state_dict;
        ``dst`` a file (or a folder for a folder), written to a temporary path and renamed when
        complete. ``trust_pickle`` allows ``.pt`` files that need full unpickling;
        ``allow_nonfinite`` keeps tensors holding NaN/Inf in float instead of refusing;
        ``serializer`` names the output format (default: by suffix, else ``safetensors``;
        ``compressed-tensors`` for transformers/vLLM, docs/deploy.md).

        Finished tensors are recorded in ``dst + ".monoquant-partial"`` until the output is
        committed; ``resume=True`` reuses those of an interrupted run (same settings, same
        input bytes) instead of computing them again. Under ``torchrun`` (or with a default
        process group already initialised) the ranks share the work and rank 0 writes the
        output, byte-identical to a single-process run (docs/scale.md). ``workers=N`` starts
        N such ranks on this machine (each with ``cores / N`` threads) and returns rank 0's
        report; plugins given as objects must be picklable (or modules). ``distributed=False``
        quantizes on this process alone even under torchrun (e.g. rank 0 of a training job).
        """
        cfg = self._config(config, options)
        if workers > 1:
            if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
                raise UsageError(
                    f"workers={workers} inside a distributed run (WORLD_SIZE is set): the "
                    "ranks are already there",
                    "drop --workers under torchrun, or run without torchrun",
                )
            kwargs = dict(
                overwrite=overwrite, trust_pickle=trust_pickle, allow_nonfinite=allow_nonfinite,
                progress=progress, serializer=serializer, resume=resume,
            )  # fmt: skip
            return spawn_ranks(workers, _checkpoint_rank, self.spawn_spec(), cfg, src, dst, kwargs)
        if workers < 1:
            raise UsageError(f"workers={workers}", "pass 1 or more worker processes")
        with self.run(cfg) as run:
            return quantize_checkpoint(
                run,
                src,
                dst,
                overwrite=overwrite,
                trust_pickle=trust_pickle,
                allow_nonfinite=allow_nonfinite,
                progress=progress,
                serializer=serializer,
                resume=resume,
                distributed=distributed,
            )

    def export(
        self,
        src: str,
        dst: str,
        serializer: str,
        *,
        model: nn.Module | None = None,
        example_inputs: Any = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Rewrite a quantized file or folder in the format of ``serializer`` without
        quantizing again (docs/deploy.md; ``overwrite``, ``progress``): a tensor format
        (``compressed-tensors``) returns ``{"bytes", "quantized", "tensors"}``; a graph format
        (``onnx``) needs the float ``model`` the file was quantized from and
        ``example_inputs`` to trace it with (a tensor or a tuple) and returns its counts."""
        if model is None and example_inputs is None:
            return export_checkpoint(self.registries, src, dst, serializer, **kwargs)
        if model is None or example_inputs is None:
            raise UsageError(
                "exporting a model graph needs both the model and an example input",
                "pass model= and example_inputs= (CLI: --model/--demo and --example-input)",
            )
        art = read_artifact(self.registries, src)
        kwargs.pop("progress", None)
        return export_model_file(
            self.registries, src, dst, serializer, model, example_inputs, art, **kwargs
        )

    def plan_checkpoint(
        self, src: str, *, config: Config | None = None, trust_pickle: bool = False, **options: Any
    ) -> Plan:
        """The checkpoint-mode plan of ``src`` (reads headers only)."""
        with self.run(self._config(config, options)) as run:
            return plan_checkpoint(run, src, trust_pickle)

    def dequantize_checkpoint(self, src: str, dst: str, **kwargs: Any) -> int:
        """A plain float safetensors copy of a quantized file or folder (``overwrite``,
        ``progress``)."""
        return dequantize_checkpoint(self.registries, src, dst, **kwargs)

    def evaluate(
        self,
        model: nn.Module | Callable[[], nn.Module],
        quantized: str | list[str],
        data: Any,
        *,
        backend: str | None = None,
        top1: bool | None = None,
    ) -> dict[str, Any]:
        """Run the float model and each quantized file of it (loaded with :func:`load` into a
        fresh copy) on ``data`` (the ``calibration=`` formats) and compare outputs: SQNR,
        cosine, max error, top-1 agreement for classifier-like outputs (``top1``: force on or
        off), size and bits per weight per file (docs/evaluate.md)."""
        if isinstance(model, nn.Module):
            base = model

            def build() -> nn.Module:
                return copy.deepcopy(base)
        else:
            build = model
        files = [quantized] if isinstance(quantized, (str, os.PathLike)) else list(quantized)
        return evaluate_files(
            self.registries, build, [os.fspath(f) for f in files], data, backend=backend, top1=top1
        )

    def inspect(self, path: str) -> dict[str, Any]:
        """Format version, producers and per-tensor facts of a file or folder (headers only)."""
        return inspect_path(self.registries, path)

    def verify(self, original: str, quantized: str, *, progress: bool = True) -> dict[str, Any]:
        """Per-tensor SQNR of ``quantized`` against ``original``, re-read with the loader."""
        return verify_paths(self.registries, original, quantized, progress=progress)

    # ------------------------------------------------------------------ files

    def save(
        self, model: nn.Module, path: str, *, serializer: str | None = None, overwrite: bool = True
    ) -> None:
        """Write a quantized model atomically (temp file, then rename). See :func:`save`."""
        save_model(self.registries, model, path, serializer=serializer, overwrite=overwrite)

    def load(
        self,
        path: str,
        model: nn.Module | None = None,
        *,
        dequantize: bool = False,
        backend: str | None = None,
        strict: bool = True,
    ) -> Any:
        """Load a file or a folder of shards into ``model``, or as a float state_dict
        (:func:`monoquant_core.load`)."""
        art = read_artifact(self.registries, path)
        out = load_model(
            self.registries,
            path,
            model,
            dequantize=dequantize,
            backend=backend,
            strict=strict,
            artifact=art,
        )
        if model is not None and not dequantize and art.qtensors:
            call_each(self.pm, "monoquant_model_ready", model=out, run=None)
        return out
