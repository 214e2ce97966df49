"""The hook specifications of Mono Quant (pluggy project name ``"monoquant"``).

This file is the plugin author's manual: each hook says when it is called, what every argument
is, what the return value means, whether it is ``firstresult``, and which built-in uses it.
Implement a hook with ``@monoquant_core.hookimpl`` on a function (or method) of the same name;
pluggy passes only the arguments your function names, so you may omit the ones you don't use.

Call order of one ``Engine.quantize`` run::

    monoquant_register_*          once per Engine (at construction)
    monoquant_configure           historic: also replayed to plugins registered later
    monoquant_modify_plan
    only with calibration data (``calibration=...`` / ``--calibration``):
        monoquant_collectors      once per selected entry, before the batches run
                                  (with ``sequential=True``: per entry, right before its batches)
    for each selected entry:
        monoquant_quantize_module     firstresult; the core's pipeline plugin is the trylast default
        monoquant_module_done
    monoquant_report
    monoquant_unconfigure         always, also when the run failed

``monoquant_add_cli_options`` is called once when the CLI is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch.nn as nn

    from .config import Config
    from .engine import Engine, ModuleResult
    from .plan import Plan, PlanEntry
    from .report import QuantReport

hookspec = pluggy.HookspecMarker("monoquant")


# --------------------------------------------------------------------------- registration


@hookspec
def monoquant_register_observers(register: Any) -> None:
    """Register observer classes.

    Called once per :class:`~monoquant_core.Engine`, right after its plugins are loaded.

    Args:
        register: call ``register(ObserverClass)`` once per observer. The argument is a
            subclass of :class:`~monoquant_core.components.Observer` (a class, because each
            observed tensor gets a fresh instance) with a kebab-case ``name``. ``register`` is
            bound to your plugin, so the component is stamped with your plugin and distribution.

    Returns:
        Nothing. Not firstresult: every plugin's implementation is called.

    Example::

        @hookimpl
        def monoquant_register_observers(register):
            register(MinMaxObserver)

    Built-ins: ``minmax``.
    """


@hookspec
def monoquant_register_schemes(register: Any) -> None:
    """Register quantization schemes.

    Called once per Engine, after plugin loading.

    Args:
        register: call ``register(scheme)`` with an instance of a
            :class:`~monoquant_core.components.Scheme` subclass (kebab-case ``name``, a
            ``config_class``, ``capabilities``). A name already registered by another plugin
            raises :class:`~monoquant_core.errors.PluginConflictError` naming both.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_register_schemes(register):
            register(Int8Scheme())

    Built-ins: ``int8``.
    """


@hookspec
def monoquant_register_replacers(register: Any) -> None:
    """Register module replacers (the ``nn.Module`` types that can be quantized).

    Called once per Engine, after plugin loading. Lookup is by module type along the MRO, so a
    replacer for ``nn.Linear`` also handles subclasses of ``nn.Linear``.

    Args:
        register: call ``register(replacer)`` with a
            :class:`~monoquant_core.components.Replacer` instance whose ``module_types`` lists
            the classes it handles. Two replacers for the same type conflict.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_register_replacers(register):
            register(LinearReplacer())

    Built-ins: ``linear`` (``nn.Linear`` -> ``QuantizedLinear``).
    """


@hookspec
def monoquant_register_serializers(register: Any) -> None:
    """Register file formats.

    Called once per Engine, after plugin loading.

    Args:
        register: call ``register(serializer)`` with a
            :class:`~monoquant_core.components.Serializer` instance (``name``, ``suffixes``,
            ``sniff``, ``write``, ``read``). The core wraps ``write`` in a temp-file-then-rename.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_register_serializers(register):
            register(SafetensorsSerializer())

    Built-ins: ``safetensors``.
    """


@hookspec
def monoquant_register_backends(register: Any) -> None:
    """Register hardware backends that run quantized layers.

    Called once per Engine, after plugin loading. Per layer, the Engine picks the available
    backend with the highest ``priority`` whose ``supports()`` accepts the weight, unless the
    user forces one (``backend=`` / ``--backend``).

    Args:
        register: call ``register(backend)`` with a
            :class:`~monoquant_core.components.Backend` instance. ``available()`` must be cheap
            and must not import heavy modules at import time.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_register_backends(register):
            register(ReferenceBackend())

    Built-ins: ``reference`` (dequantize + ``F.linear``; the ground truth).
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def monoquant_add_cli_options(group: Any) -> None:
    """Add plugin options to the ``quantize`` and ``plan`` commands.

    Called once when the CLI is built, after plugins are loaded.

    Args:
        group: call ``group.add_option("--<plugin>-<name>", ..., help=...)`` with the arguments
            of :func:`click.option`. Option names must start with ``--<your plugin name>-`` so
            plugins cannot collide. Parsed values arrive in
            ``config.plugin_options["<plugin>"]["<name>"]`` (dashes become underscores).

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_add_cli_options(group):
            group.add_option("--example-verbose", is_flag=True, help="Print more.")

    Built-ins: none.
    """


@hookspec(historic=True)
def monoquant_configure(config: Config) -> None:
    """Receive the resolved configuration at the start of a run.

    Called at the start of every ``Engine.quantize`` / ``Engine.plan`` run, before planning.
    Historic: a plugin registered later (``engine.register(...)``) is called with past
    configurations too.

    Args:
        config: the frozen :class:`~monoquant_core.config.Config` of this run.

    Returns:
        Nothing. Not firstresult.

    Example::

        class ExamplePlugin:
            @hookimpl
            def monoquant_configure(self, config):
                self.verbose = config.plugin_options.get("example", {}).get("verbose", False)

    Built-ins: none.
    """


@hookspec
def monoquant_modify_plan(plan: Plan, model: nn.Module | None, config: Config) -> None:
    """Change the plan before anything is computed.

    Called once per run after the Engine builds the default plan (every module with
    parameters: selected with its scheme and observer, or skipped with a reason). Change entries
    in place: ``entry.skip(reason)`` keeps a layer in float; setting ``entry.scheme``,
    ``entry.observer``, ``entry.options["scheme_options"]`` or ``entry.backend`` (forces that
    backend) changes how it is quantized. Afterwards the Engine re-validates every selected
    entry (scheme veto, capabilities) and chooses backends, so a bad edit fails before any
    compute.

    Args:
        plan: the :class:`~monoquant_core.plan.Plan` (mutable).
        model: the model being quantized (do not modify it here), or None in checkpoint
            mode (``quantize_checkpoint``), where the entries are tensors of the file.
        config: the run's :class:`~monoquant_core.config.Config`.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_modify_plan(plan, model, config):
            for entry in plan.selected:
                if entry.name.endswith("lm_head"):
                    entry.skip("lm_head kept in float by my-plugin")

    Built-ins: none.
    """


@hookspec
def monoquant_collectors(
    entry: PlanEntry, module: nn.Module, config: Config, engine: Engine
) -> dict[str, Any] | None:
    """Ask for statistics of a planned module's inputs during calibration.

    Called once per selected entry (module mode only), and only when calibration data is
    given (``Engine.quantize(model, calibration=data)``, ``Engine.calibrate``,
    ``--calibration``), after ``monoquant_modify_plan`` and before any batch runs. With
    ``sequential=True`` it is called for one entry at a time, in execution order, right before
    that entry's batches (every earlier layer is already quantized). Not firstresult: every
    plugin may add collectors.

    The core attaches ONE forward pre-hook per planned module and, on every batch, calls
    ``collector.update(x)`` of every collector of that module with the module's first
    positional input: detached, unchanged shape, on the module's device (batches holding
    NaN/Inf are not fed, and warned about). The hooks are removed when calibration ends, also
    when a batch raises. Afterwards ``entry.collected[name]`` holds each collector and
    ``entry.calibration_rows`` the number of input rows the module saw (``numel // last
    dim``; 0 = it never ran); read them in ``monoquant_quantize_module``.

    Args:
        entry: the selected :class:`~monoquant_core.plan.PlanEntry`.
        module: the float module (do not modify it).
        config: the run's :class:`~monoquant_core.config.Config`.
        engine: the running :class:`~monoquant_core.Engine` (registries, e.g.
            ``engine.observers.get(entry.observer)``, and ``engine.component_configs(entry)``).

    Returns:
        A dict of collector name -> collector (any object with ``update(x: torch.Tensor) ->
        None``), or None for none. Use names prefixed with your plugin name; the same name
        from two plugins for one entry is a :class:`~monoquant_core.errors.PluginConflictError`
        naming both.

    Example::

        class AbsMax:
            def __init__(self):
                self.value = None

            def update(self, x):
                a = x.abs().reshape(-1, x.shape[-1]).amax(0)
                self.value = a if self.value is None else torch.maximum(self.value, a)

        @hookimpl
        def monoquant_collectors(entry, module, config):
            return {"example.absmax": AbsMax()}

    Built-ins: ``int8`` (the activation observer of ``activations="static"``),
    ``outlier`` (per-column absolute maxima) and ``gptq`` (the input Hessian ``2 X^T X``).
    """


@hookspec(firstresult=True)
def monoquant_quantize_module(entry: PlanEntry, module: nn.Module, engine: Engine) -> Any:
    """Quantize one planned module and return its replacement.

    Called once per selected plan entry, in plan order (module mode only: checkpoint mode
    has no modules and quantizes each selected tensor with ``engine.quantize_weight``).
    firstresult: the first implementation that returns a non-None value wins. The core's
    pipeline plugin is the ``trylast`` default (observe -> quantize -> replace). Use
    ``wrapper=True`` to run code around it (e.g. to add extra tensors to the result) with
    ``result = yield``.

    Args:
        entry: the :class:`~monoquant_core.plan.PlanEntry`.
        module: the original float module (must not be modified: the swap happens only after
            every entry succeeded, so a failure leaves the model untouched).
        engine: the running :class:`~monoquant_core.Engine` (its registries, helpers such as
            ``engine.quantize_weight``).

    Returns:
        A :class:`~monoquant_core.engine.ModuleResult` (``module`` = the replacement,
        ``qtensors`` = the quantized weights by parameter name, ``metrics``), or None to let
        the next implementation handle it.

    Example::

        @hookimpl(wrapper=True)
        def monoquant_quantize_module(entry, module, engine):
            result = yield
            result.metrics["note"] = "seen by my plugin"
            return result

    Built-ins: the core pipeline (``monoquant_core.pipeline``).
    """


@hookspec
def monoquant_module_done(entry: PlanEntry, result: ModuleResult) -> None:
    """Observe a finished module (progress bars, per-layer logging, extra metrics).

    Called after ``monoquant_quantize_module`` returned for ``entry``, before the next entry
    (module mode only).

    Args:
        entry: the :class:`~monoquant_core.plan.PlanEntry`.
        result: the :class:`~monoquant_core.engine.ModuleResult` (its ``metrics`` dict may be
            extended; the values appear in the report's ``extra``).

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_module_done(entry, result):
            print("done", entry.name)

    Built-ins: none.
    """


@hookspec
def monoquant_report(report: QuantReport, config: Config) -> None:
    """Inspect or extend the final report (add to ``report.extra``).

    Called once per run after every module (or checkpoint tensor) is quantized and before
    the result is committed: the model's modules are swapped in, or a checkpoint's output
    renamed into place, only after this hook returned, so an exception here changes nothing.

    Args:
        report: the :class:`~monoquant_core.report.QuantReport`.
        config: the run's :class:`~monoquant_core.config.Config`.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_report(report, config):
            report.extra["my-plugin"] = {"layers": len(report.layers)}

    Built-ins: none.
    """


@hookspec
def monoquant_unconfigure(config: Config) -> None:
    """Clean up at the end of a run.

    Called once per run, last, whether the run succeeded or raised.

    Args:
        config: the run's :class:`~monoquant_core.config.Config`.

    Returns:
        Nothing. Not firstresult.

    Example::

        class CachingPlugin:
            @hookimpl
            def monoquant_unconfigure(self, config):
                self.cache.clear()

    Built-ins: none.
    """
