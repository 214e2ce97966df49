"""The hook specifications of Mono Quant (pluggy project name ``"monoquant"``).

This file is the plugin author's manual: each hook says when it is called, what every argument
is, what the return value means, whether it is ``firstresult``, and which built-in plugins
implement it (checked by a test against what is actually registered). Implement a hook with
``@monoquant_core.hookimpl`` on a function (or method) of the same name; pluggy passes only the
arguments your function names, so you may omit the ones you don't use.

Call order of one ``Engine.quantize`` run::

    monoquant_register_*          once per Engine (at construction)
    monoquant_configure           once per run, first (every verb: quantize, plan, calibrate,
                                  checkpoint mode)
    monoquant_modify_plan
    only with calibration data (``calibration=...`` / ``--calibration``):
        monoquant_collectors      once per selected entry, before the batches run
                                  (with ``sequential=True``: per entry, right before its batches)
    for each selected entry:
        monoquant_quantize_weights    firstresult; the core plugin is the trylast default
        (the core builds the replacement module with the entry's replacer)
        monoquant_module_done
    monoquant_report
    monoquant_model_ready         after the quantized modules are swapped in (and after load())
    monoquant_unconfigure         once per run, last, also when the run failed

``monoquant_add_cli_options`` and ``monoquant_add_cli_commands`` are called once when the CLI is
built.

Every lifecycle hook receives the :class:`~monoquant_core.run.Run` of the run in progress: its
``config``, its registries, the plugins' options (``run.options(name)``) and per-run plugin
state (``run.state``). Hooks that are not ``firstresult`` are called plugin by plugin (a failure
names its plugin) and take no wrappers; only ``monoquant_quantize_weights`` may be wrapped.

This module imports nothing from the project at run time (the names below are for type
checkers only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch.nn as nn

    from .plan import ModuleResult, Plan, PlanEntry
    from .report import QuantReport
    from .run import Run

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

    Built-ins: ``minmax``, ``histogram``.
    """


@hookspec
def monoquant_register_schemes(register: Any) -> None:
    """Register quantization schemes.

    Called once per Engine, after plugin loading.

    Args:
        register: call ``register(scheme)`` with an instance of a
            :class:`~monoquant_core.components.Scheme` subclass (kebab-case ``name``, a
            ``config_class``, ``capabilities``). A name already registered by another plugin
            leaves the later plugin out with a warning naming both (a
            :class:`~monoquant_core.errors.PluginConflictError` in strict mode).

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_register_schemes(register):
            register(Int8Scheme())

    Built-ins: ``int8``, ``int4-group``, ``fp16`` (the ``fp16`` and ``bf16`` schemes).
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

    Built-ins: ``linear``, ``conv``, ``embedding``, ``gpt2-conv1d``.
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

    Built-ins: ``safetensors``, ``compressed-tensors``, ``onnx``.
    """


@hookspec
def monoquant_register_backends(register: Any) -> None:
    """Register hardware backends that run quantized layers.

    Called once per Engine, after plugin loading. Per layer, the core picks the available
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

    Built-ins: ``reference``, ``torch-cpu``, ``torch-cuda``, ``cpu-vnni``.
    """


@hookspec
def monoquant_register_options(register: Any) -> None:
    """Register the plugin's options: one frozen dataclass, named after the plugin.

    Called once per Engine, after plugin loading. A plugin that registers options is enabled
    for a run only when the user names it: ``plugin_options={"NAME": {...}}`` in Python
    (``{}`` for the defaults, ``{"enable": False}`` to turn it off), ``--NAME`` and
    ``--NAME-opt KEY=VALUE`` on the command line (generated by the core for every plugin
    that registers options). Keys are validated against the dataclass: an unknown key, or an
    unknown plugin name in ``plugin_options``, is a one-line error listing the valid ones.

    Args:
        register: call ``register(OptionsClass)`` once, with a frozen dataclass deriving from
            :class:`~monoquant_core.options.PluginOptions` (every field with a default; the
            ``enable`` field comes from the base class).

    Returns:
        Nothing. Not firstresult. Read the options of a run with ``run.options("NAME")``:
        the dataclass instance, or None when the plugin is not enabled.

    Example::

        @dataclass(frozen=True)
        class ExampleOptions(PluginOptions):
            verbose: bool = False

        @hookimpl
        def monoquant_register_options(register):
            register(ExampleOptions)

    Built-ins: ``outlier``, ``gptq``, ``sensitivity``.
    """


# --------------------------------------------------------------------------- lifecycle


@hookspec
def monoquant_add_cli_commands(cli: Any, engine: Any) -> None:
    """Add sub-commands of the plugin's own to the ``monoquant`` command line.

    Called once when the CLI is built, after the built-in commands. Use it for a verb that
    belongs to the plugin (``monoquant sensitivity`` of the ``sensitivity`` plugin), never to
    replace a built-in command: a name that is already taken is a plugin load error.

    Args:
        cli: the ``click.Group``; add commands with ``@cli.command()`` or ``cli.add_command``.
            Raise :class:`~monoquant_core.UsageError` inside a command for one-line errors.
        engine: the :class:`~monoquant_core.Engine` the CLI runs (its plugins loaded).

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_add_cli_commands(cli, engine):
            @cli.command()
            def hello():
                click.echo(f"{len(engine.schemes.names())} schemes installed")

    Built-ins: ``sensitivity``.
    """


@hookspec
def monoquant_add_cli_options(group: Any) -> None:
    """Add extra command-line flags for the plugin's options (``quantize`` and ``plan``).

    Called once when the CLI is built, after plugins are loaded. Every plugin that registers
    options already gets ``--NAME`` and ``--NAME-opt KEY=VALUE``; use this hook only for
    friendlier spellings of single options (``--outlier-threshold 6``). A flag's value goes
    to the option of the same name, so it is validated like any other.

    Args:
        group: call ``group.add_option("--<plugin>-<key>", ..., help=...)`` with the arguments
            of :func:`click.option`. The names must start with ``--<your plugin name>-``, the
            parameter name must be ``<plugin>_<key>`` (dashes become underscores), and
            ``<key>`` must be a field of your options dataclass. Giving the flag enables the
            plugin, like ``--NAME``.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_add_cli_options(group):
            group.add_option("--example-verbose", is_flag=True, default=None, help="Print more.")

    Built-ins: ``outlier``, ``sensitivity``.
    """


@hookspec
def monoquant_configure(run: Run) -> None:
    """Open a run: set up per-run state from the run's configuration.

    Called once at the start of every run (``Engine.quantize``, ``plan``, ``calibrate``,
    checkpoint mode), before planning, plugin by plugin. Not historic: a plugin registered
    later only sees later runs. Paired with ``monoquant_unconfigure``: every plugin whose
    configure returned gets its unconfigure at the end of the run, also when the run failed.

    Args:
        run: the :class:`~monoquant_core.run.Run` (``run.config``, ``run.options(name)``);
            keep per-run state in ``run.state[<plugin name>]``, never in module globals.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_configure(run):
            opts = run.options("example")
            if opts is not None:
                run.state["example"] = {"verbose": opts.verbose, "seen": []}

    Built-ins: ``gptq``.
    """


@hookspec
def monoquant_modify_plan(plan: Plan, model: nn.Module | None, run: Run) -> None:
    """Change the plan before anything is computed.

    Called once per run after the core builds the default plan (every module with parameters:
    selected with its scheme and observer, or skipped with a reason). Change entries in place:
    ``entry.skip(reason)`` keeps a layer in float; setting ``entry.scheme``,
    ``entry.observer``, ``entry.options["scheme_options"]`` or ``entry.backend`` (forces that
    backend) changes how it is quantized. Afterwards the core re-validates every selected
    entry (scheme veto, capabilities) and chooses backends, so a bad edit fails before any
    compute.

    Args:
        plan: the :class:`~monoquant_core.plan.Plan` (mutable).
        model: the model being quantized (do not modify it here), or None in checkpoint
            mode (``quantize_checkpoint``), where the entries are tensors of the file
            (``run.read_tensor(name)`` loads one, while this hook runs).
        run: the :class:`~monoquant_core.run.Run` (``run.entry_configs(entry)`` gives an
            entry's scheme / observer configs).

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_modify_plan(plan, model, run):
            for entry in plan.selected:
                if entry.name.endswith("lm_head"):
                    entry.skip("lm_head kept in float by my-plugin")

    Built-ins: ``outlier``, ``gptq``, ``sensitivity``.
    """


@hookspec
def monoquant_collectors(entry: PlanEntry, module: nn.Module, run: Run) -> dict[str, Any] | None:
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
    dim``; 0 = it never ran); read them in ``monoquant_quantize_weights``.

    Args:
        entry: the selected :class:`~monoquant_core.plan.PlanEntry`.
        module: the float module (do not modify it).
        run: the :class:`~monoquant_core.run.Run` (registries, e.g.
            ``run.observers.get(entry.observer)``, and ``run.entry_configs(entry)``).

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
        def monoquant_collectors(entry, module, run):
            return {"example.absmax": AbsMax()}

    Built-ins: ``int8``, ``outlier``, ``gptq``.
    """


@hookspec(firstresult=True)
def monoquant_quantize_weights(entry: PlanEntry, module: nn.Module, run: Run) -> Any:
    """Quantize the weights of one planned module.

    Called once per selected plan entry, in plan order (module mode only: checkpoint mode
    has no modules and quantizes each selected tensor with ``run.quantize_weight``).
    firstresult: the first implementation that returns a non-None value wins. The core
    plugin is the ``trylast`` default (observe -> quantize every weight the entry's replacer
    names). Use ``wrapper=True`` to change the default's result (``result = yield``: add
    extras to a QTensor, replace one weight's QTensor). A wrapper may set
    ``entry.options["float_columns"]`` before its ``yield`` (input columns of the ``weight``
    to keep in float16); an implementation that quantizes a weight itself must honour it
    (``monoquant_core.qtensor.float_columns`` / ``without_columns`` / ``attach_float_columns``).

    Only the weights are produced here: the core then builds the replacement module once, with
    the entry's replacer and backend, stamps each QTensor's provenance (producing plugin,
    configs) where a plugin did not, and swaps the modules in only after every entry
    succeeded.

    Args:
        entry: the :class:`~monoquant_core.plan.PlanEntry` (its ``collected`` statistics when
            calibration ran).
        module: the original float module (must not be modified).
        run: the :class:`~monoquant_core.run.Run` (``run.quantize_weight``,
            ``run.quantize_entry_weights``, ``run.entry_configs``, ``run.options``).

    Returns:
        A :class:`~monoquant_core.plan.ModuleResult` (``qtensors``: every weight the
        replacer names, by parameter name; ``originals``: the float weights; ``metrics``:
        values for the report's JSON; ``notes``: one-line facts the text report lists under
        its table), or None to let the next implementation handle it.

    Example::

        @hookimpl(wrapper=True)
        def monoquant_quantize_weights(entry, module, run):
            result = yield
            result.metrics["note"] = "seen by my plugin"
            return result

    Built-ins: ``core``, ``int8``, ``outlier``, ``gptq``.
    """


@hookspec
def monoquant_module_done(entry: PlanEntry, result: ModuleResult, run: Run) -> None:
    """Observe a finished module (progress display, per-layer logging, extra metrics).

    Called after the weights of ``entry`` were quantized and its replacement module built,
    before the next entry (module mode only). It exists so that a plugin can follow a run
    layer by layer, or add metrics, without taking part in quantizing (no built-in needs it).

    Args:
        entry: the :class:`~monoquant_core.plan.PlanEntry`.
        result: the :class:`~monoquant_core.plan.ModuleResult` (``module`` is the replacement;
            its ``metrics`` dict may be extended: the values appear in the report's
            ``extra["modules"]``).
        run: the :class:`~monoquant_core.run.Run`.

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_module_done(entry, result):
            print("done", entry.name, f"{result.time_s:.2f} s")

    Built-ins: none.
    """


@hookspec
def monoquant_report(report: QuantReport, run: Run) -> None:
    """Inspect or extend the final report (add to ``report.extra``, and sections of the
    ``--html`` page to ``report.html_sections``).

    Called once per run after every module (or checkpoint tensor) is quantized and before
    the result is committed: the model's modules are swapped in, or a checkpoint's output
    renamed into place, only after this hook returned, so an exception here changes nothing.

    Args:
        report: the :class:`~monoquant_core.report.QuantReport`.
        run: the :class:`~monoquant_core.run.Run` (its ``state`` holds what your plugin
            gathered during the run).

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_report(report, run):
            report.extra["my-plugin"] = {"layers": len(report.layers)}

    Built-ins: ``gptq``, ``sensitivity``.
    """


@hookspec
def monoquant_model_ready(model: nn.Module, run: Run | None) -> None:
    """A model now holds its quantized modules: attach what a framework around it needs.

    Called once after module mode swapped the quantized modules in (``Engine.quantize``, after
    ``monoquant_report`` and the swap, with the run) and once after ``load(path, model)``
    rebuilt them (``run`` is None there: loading is not a run). It exists for integrations
    with frameworks the model lives in: the built-in ``transformers`` plugin gives a
    transformers model transformers' quantizer for Mono Quant, so that the model's own
    ``save_pretrained`` refuses in one line instead of writing a folder that later loads with
    random weights. Implementations must not change the model's outputs and should not fail:
    the model is already quantized when it is called, and an exception propagates.

    Args:
        model: the model holding Mono Quant modules (what ``quantize`` / ``load`` return).
        run: the :class:`~monoquant_core.run.Run` of ``Engine.quantize``, or None (``load``).

    Returns:
        Nothing. Not firstresult.

    Example::

        @hookimpl
        def monoquant_model_ready(model):
            model.quantized_by = "monoquant"

    Built-ins: ``transformers``.
    """


@hookspec
def monoquant_unconfigure(run: Run) -> None:
    """Close a run: release what ``monoquant_configure`` set up.

    Called once per run, last, whether the run succeeded or raised, for every plugin whose
    ``monoquant_configure`` returned (a plugin that does not implement configure counts as
    configured once the configure phase reached it). Per-run state in ``run.state`` needs no
    cleanup (it dies with the run); this hook is for resources outside the run (open files,
    worker threads, device memory), which is why it exists although no built-in holds any.

    Args:
        run: the :class:`~monoquant_core.run.Run`.

    Returns:
        Nothing. Not firstresult.

    Example::

        class CachingPlugin:
            @hookimpl
            def monoquant_unconfigure(self, run):
                self.cache.clear()

    Built-ins: none.
    """
