"""The run context: what every lifecycle hook and every core helper of one run receives.

A :class:`Run` is created by the host for one verb (``quantize``, ``plan``, ``calibrate``,
checkpoint mode) and lives until that verb returns: ``monoquant_configure(run)`` opens it and
``monoquant_unconfigure(run)`` closes it. It is narrow on purpose: the registries, the frozen
:class:`~monoquant_core.config.Config`, the plugins' validated options, per-run plugin state,
and one way to call hooks with error attribution. Nothing in it outlives the run, so two runs
(of one Engine or of two) never share state.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any

import pluggy
import torch
from torch import nn

from .batches import iter_batches, model_device
from .components import WeightInfo
from .config import Config, entry_configs
from .errors import PluginError
from .hooks import call_each, call_hook
from .options import PluginOptions
from .pipeline import ComponentAccess, quantize_entry_weights
from .qtensor import QTensor
from .registry import Registries, choose_backend

if TYPE_CHECKING:  # pragma: no cover
    from .plan import PlanEntry

__all__ = ["Run"]


class Run(ComponentAccess):
    """One run's context.

    Attributes:
        config: the run's frozen :class:`~monoquant_core.config.Config`.
        registries: every registry (also as ``run.schemes``, ``run.observers``, ...; and
            ``run.quantize_weight`` / ``run.scheme_config``, as on the Engine).
        calibration: the run's calibration data (module mode, ``calibration=``), or None; a
            plugin that measures the model while planning (``sensitivity``) runs it.
        read_tensor: checkpoint mode, while ``monoquant_modify_plan`` runs: reads one input
            tensor by name into memory (a plugin that plans from the weights' values, like
            ``sensitivity``'s data-free allocation, reads them one at a time); else None.
        state: per-run state of plugins, by plugin name (``run.state["gptq"] = ...`` in
            ``monoquant_configure``); dropped with the run. Plugins keep no run state anywhere
            else.
    """

    def __init__(self, config: Config, registries: Registries, pm: pluggy.PluginManager):
        self.config = config
        self.registries = registries
        self.state: dict[str, Any] = {}
        self.calibration: Any = None
        self.read_tensor: Callable[[str], torch.Tensor] | None = None
        self._pm = pm

    # ------------------------------------------------------------------ configuration

    def options(self, plugin: str) -> Any:
        """The validated options of ``plugin`` when the user enabled it for this run, else None.

        Raises:
            PluginError: ``plugin`` registered no options class (a bug in the caller).
        """
        if plugin not in self.registries.options:
            raise PluginError(
                f"run.options({plugin!r}): no plugin named {plugin!r} registered options",
                "register an options dataclass with monoquant_register_options",
            )
        opts: PluginOptions | None = self.config.plugin_options.get(plugin)
        return opts if opts is not None and opts.enable else None

    def entry_configs(self, entry: PlanEntry) -> tuple[Any, Any]:
        """``(scheme_config, observer_config)`` of a plan entry (rules and plugin edits
        included): the one rule, :func:`monoquant_core.config.entry_configs`."""
        return entry_configs(self.config, entry, self.schemes, self.observers)

    # ------------------------------------------------------------------ quantizing

    def quantize_entry_weights(
        self, entry: PlanEntry, module: nn.Module, weights: dict[str, torch.Tensor] | None = None
    ) -> dict[str, QTensor]:
        """Quantize ``weights`` (default: all of the entry's) as the plan entry says."""
        return quantize_entry_weights(self, entry, module, weights)

    def choose_backend(self, info: WeightInfo, forced: str | None = None) -> tuple[str, list[str]]:
        """The backend for one weight and notes on why better-ranked ones were not chosen."""
        return choose_backend(self.backends, info, forced)

    # ------------------------------------------------------------------ hooks

    def call(self, hook: str, only_plugins: Collection[str] | None = None, **kwargs: Any) -> Any:
        """Call a ``firstresult`` hook through pluggy (``run=self`` is passed along); a failure
        names the plugin. ``only_plugins``: only these plugins' implementations take part
        (the core's default implementations are the plugin ``core``)."""
        return call_hook(self._pm, hook, only_plugins, run=self, **kwargs)

    def call_each(
        self, hook: str, only_plugins: Collection[str] | None = None, **kwargs: Any
    ) -> list[tuple[str, Any]]:
        """Call every implementation of ``hook`` in order (``run=self`` is passed along):
        ``[(plugin, result), ...]``; a failure names the plugin. ``only_plugins`` as in
        :meth:`call`."""
        return call_each(self._pm, hook, only_plugins, run=self, **kwargs)

    # ------------------------------------------------------------------ trials

    def calibrate(
        self,
        model: nn.Module,
        entries: list[PlanEntry],
        data: Any,
        only_plugins: Collection[str] | None = None,
    ) -> None:
        """Feed the collectors of ``entries`` (``monoquant_collectors``; with
        ``only_plugins``, only those plugins') with the batches of ``data``, filling each
        entry's ``collected`` and ``calibration_rows``, without warnings or a progress bar.

        For plugins that quantize *trial* entries of their own (copies of plan entries with
        another scheme) as ``quantize`` would: ``run.calibrate(model, trials, data, names)``,
        then ``run.call("monoquant_quantize_weights", entry=trial, module=module,
        only_plugins=("core", *names))``. The model is left as it was."""
        # calibration is a job (layer 6) above the run context (layer 5), which only hands
        # plugins this entry point into it
        from .calibration import run_calibration  # deferred: a job, one layer up

        batches = iter_batches(data, model_device(model))
        run_calibration(self, model, entries, batches, progress=False, warn=False,
                        only_plugins=only_plugins)  # fmt: skip
