"""Every hook spec is documented with its exact signature and its real built-in users, and the
lifecycle hooks are called in the documented order, once per run, paired, failures named."""

from __future__ import annotations

import inspect
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import monoquant_core.hookspecs as specs
from monoquant_core import (
    Config,
    Engine,
    PluginError,
    PluginLoadError,
    PluginOptions,
    UsageError,
    hookimpl,
)
from monoquant_core.cli import build_cli
from monoquant_core.testing import mlp

HOOKS_MD = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "hooks.md"
SPEC_NAMES = sorted(n for n, f in vars(specs).items() if n.startswith("monoquant_") and callable(f))


def test_the_hooks_are_these():
    assert SPEC_NAMES == [
        "monoquant_add_cli_commands",
        "monoquant_add_cli_options",
        "monoquant_collectors",
        "monoquant_configure",
        "monoquant_model_ready",
        "monoquant_modify_plan",
        "monoquant_module_done",
        "monoquant_quantize_weights",
        "monoquant_register_backends",
        "monoquant_register_observers",
        "monoquant_register_options",
        "monoquant_register_replacers",
        "monoquant_register_schemes",
        "monoquant_register_serializers",
        "monoquant_report",
        "monoquant_unconfigure",
    ]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_hook_documented_with_exact_signature(name):
    func = getattr(specs, name)
    heading = f"## `{name}{inspect.signature(func)}`"
    text = HOOKS_MD.read_text(encoding="utf-8")
    assert heading in text.splitlines(), f"docs/plugins/hooks.md lacks the heading {heading}"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_hook_docstring_is_complete(name):
    doc = inspect.getdoc(getattr(specs, name)) or ""
    for section in ("Called", "Args:", "Returns:", "Example::", "Built-ins:"):
        assert section in doc, f"{name} docstring lacks {section!r}"
    first = getattr(specs, name).monoquant_spec
    if first.get("firstresult"):
        assert "firstresult" in doc.lower()


def _builtins_line(doc: str) -> set[str]:
    line = next(ln for ln in doc.splitlines() if ln.strip().startswith("Built-ins:"))
    if line.strip() == "Built-ins: none.":
        return set()
    return set(re.findall(r"``([a-z0-9-]+)``", line.split("(")[0]))


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_builtins_line_names_the_plugins_that_implement_the_hook(name):
    """Only the built-in distribution: other installed plugins (the example) are left out."""
    engine = Engine(disable=["monoquant-example"])
    builtin = {i.name for i in engine.registries.plugins.values() if i.distribution == "monoquant"}
    impls = {i.plugin_name for i in getattr(engine.pm.hook, name).get_hookimpls()}
    doc = inspect.getdoc(getattr(specs, name)) or ""
    assert _builtins_line(doc) == impls & builtin, f"{name}: fix its 'Built-ins:' line"


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_every_hook_without_a_builtin_user_says_why_it_exists(name):
    doc = inspect.getdoc(getattr(specs, name)) or ""
    if _builtins_line(doc):
        return
    assert "exists" in doc, f"{name} has no built-in user: its docstring must say why it exists"


class _Counter:
    """A collector that records each update (with its input shape) in the call list."""

    def __init__(self, calls, name):
        self.calls, self.name, self.shapes = calls, name, []

    def update(self, x):
        self.shapes.append(tuple(x.shape))
        self.calls.append(f"update:{self.name}")


@dataclass(frozen=True)
class RecorderOptions(PluginOptions):
    tag: str = "x"


class Recorder:
    """Implements every hook and records the order of calls."""

    monoquant_plugin_name = "recorder"

    def __init__(self):
        self.calls: list[str] = []
        self.runs: list[object] = []

    @hookimpl
    def monoquant_register_observers(self, register):
        self.calls.append("register_observers")

    @hookimpl
    def monoquant_register_schemes(self, register):
        self.calls.append("register_schemes")

    @hookimpl
    def monoquant_register_replacers(self, register):
        self.calls.append("register_replacers")

    @hookimpl
    def monoquant_register_serializers(self, register):
        self.calls.append("register_serializers")

    @hookimpl
    def monoquant_register_backends(self, register):
        self.calls.append("register_backends")

    @hookimpl
    def monoquant_register_options(self, register):
        self.calls.append("register_options")
        register(RecorderOptions)

    @hookimpl
    def monoquant_add_cli_options(self, group):
        self.calls.append("add_cli_options")
        group.add_option("--recorder-tag", default=None, help="A tag.")

    @hookimpl
    def monoquant_configure(self, run):
        self.calls.append("configure")
        self.runs.append(run)
        opts = run.options(self.monoquant_plugin_name)
        self.tag = opts.tag if opts else None

    @hookimpl
    def monoquant_modify_plan(self, plan, model, run):
        self.calls.append("modify_plan")

    @hookimpl
    def monoquant_collectors(self, entry, module, run):
        self.calls.append(f"collectors:{entry.name}")
        return {"recorder.count": _Counter(self.calls, entry.name)}

    @hookimpl(wrapper=True)
    def monoquant_quantize_weights(self, entry, module, run):
        self.calls.append(f"quantize_weights:{entry.name}")
        result = yield
        result.metrics["recorded"] = True
        return result

    @hookimpl
    def monoquant_module_done(self, entry, result, run):
        assert result.module is not None
        self.calls.append(f"module_done:{entry.name}")

    @hookimpl
    def monoquant_report(self, report, run):
        self.calls.append("report")
        report.extra["recorder"] = len(report.layers)

    @hookimpl
    def monoquant_unconfigure(self, run):
        assert run is self.runs[-1]
        self.calls.append("unconfigure")


def test_lifecycle_call_order():
    rec = Recorder()
    engine = Engine(plugins=[rec], entry_points=True)
    assert sorted(rec.calls) == sorted(
        [
            "register_observers",
            "register_schemes",
            "register_replacers",
            "register_serializers",
            "register_backends",
            "register_options",
        ]
    )
    rec.calls.clear()
    _, report = engine.quantize(mlp())
    assert rec.calls == [
        "configure",
        "modify_plan",
        "quantize_weights:0",
        "module_done:0",
        "quantize_weights:2",
        "module_done:2",
        "quantize_weights:4",
        "module_done:4",
        "report",
        "unconfigure",
    ]
    assert report.extra["recorder"] == 3
    assert report.extra["modules"]["0"] == {"recorded": True}
    for verb in (lambda: engine.plan(mlp()), lambda: engine.calibrate(mlp(), torch.randn(40, 32))):
        rec.calls.clear()
        verb()
        assert rec.calls[:2] == ["configure", "modify_plan"] and rec.calls[-1] == "unconfigure"
        assert rec.calls.count("configure") == rec.calls.count("unconfigure") == 1


def test_lifecycle_call_order_with_calibration():
    rec = Recorder()
    engine = Engine(plugins=[rec], entry_points=True)
    rec.calls.clear()
    x = torch.randn(2, 5, 32)
    _, report = engine.quantize(mlp(), calibration=[x, x], min_rows=1)
    assert rec.calls == [
        "configure",
        "modify_plan",
        "collectors:0",
        "collectors:2",
        "collectors:4",
        *["update:0", "update:2", "update:4"] * 2,
        "quantize_weights:0",
        "module_done:0",
        "quantize_weights:2",
        "module_done:2",
        "quantize_weights:4",
        "module_done:4",
        "report",
        "unconfigure",
    ]
    assert report.extra["calibration"]["rows"] == {"0": 20, "2": 20, "4": 20}
    rec.calls.clear()
    engine.quantize(mlp(), calibration=x, sequential=True, min_rows=1)
    per_layer = [
        [f"collectors:{n}", f"update:{n}", f"quantize_weights:{n}", f"module_done:{n}"]
        for n in ("0", "2", "4")
    ]
    assert rec.calls == [
        "configure",
        "modify_plan",
        *[c for layer in per_layer for c in layer],
        "report",
        "unconfigure",
    ]


def test_checkpoint_mode_runs_configure_modify_plan_report_unconfigure(tmp_path):
    from monoquant_plugins.safetensors_format import write_safetensors

    src = tmp_path / "m.safetensors"
    write_safetensors(str(src), {"a.weight": torch.randn(8, 32)}, {})
    rec = Recorder()
    engine = Engine(plugins=[rec])
    rec.calls.clear()
    engine.quantize_checkpoint(str(src), str(tmp_path / "q.safetensors"), progress=False)
    assert rec.calls == ["configure", "modify_plan", "report", "unconfigure"]
    rec.calls.clear()
    engine.plan_checkpoint(str(src))
    assert rec.calls == ["configure", "modify_plan", "unconfigure"]


def test_cli_flags_reach_configure_through_the_options():
    rec = Recorder()
    engine = Engine(plugins=[rec])
    cli = build_cli(engine)
    assert "add_cli_options" in rec.calls
    for args, tag in (
        (["--recorder-tag", "hello"], "hello"),
        (["--recorder-opt", "tag=there"], "there"),
        (["--recorder"], "x"),
        ([], None),
    ):
        result = CliRunner().invoke(cli, ["plan", "--demo", *args])
        assert result.exit_code == 0, result.output
        assert rec.tag == tag, args
    result = CliRunner().invoke(cli, ["plan", "--demo", "--recorder-opt", "colour=red"])
    assert result.exit_code == 1
    assert "unknown option 'colour' for plugin 'recorder' (valid keys: enable, tag)" in (
        result.output
    )


def test_configure_is_called_per_run_and_not_replayed():
    engine = Engine()
    for _ in range(3):
        engine.plan(mlp())
    rec = Recorder()
    engine.register(rec)
    assert "configure" not in rec.calls  # nothing replayed from the three earlier runs
    engine.plan(mlp())
    assert rec.calls.count("configure") == 1 and rec.calls.count("unconfigure") == 1
    assert len(rec.runs) == 1


def test_every_run_gets_its_own_context():
    rec = Recorder()
    engine = Engine(plugins=[rec])
    engine.plan(mlp())
    engine.quantize(mlp())
    first, second = rec.runs
    assert first is not second and first.state is not second.state


def test_unconfigure_runs_on_failure_and_model_is_untouched():
    class Failing(Recorder):
        monoquant_plugin_name = "failing"

        @hookimpl
        def monoquant_module_done(self, entry, result, run):
            if entry.name == "2":
                raise RuntimeError("disk on fire")

    rec = Failing()
    engine = Engine(plugins=[rec])
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PluginError, match="plugin 'failing'.*disk on fire") as e:
        engine.quantize(model)
    assert "MONOQUANT_DISABLE_PLUGINS=failing" in str(e.value)
    assert rec.calls[-1] == "unconfigure"
    assert all(type(m).__name__ != "QuantizedLinear" for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


class _Pair:
    def __init__(self, name, log, fail_configure=False, fail_unconfigure=False):
        self.monoquant_plugin_name = name
        self.log, self.fail_configure, self.fail_unconfigure = log, fail_configure, fail_unconfigure

    @hookimpl
    def monoquant_configure(self, run):
        if self.fail_configure:
            raise ValueError("bad setup")
        self.log.append(f"configure:{self.monoquant_plugin_name}")

    @hookimpl
    def monoquant_unconfigure(self, run):
        self.log.append(f"unconfigure:{self.monoquant_plugin_name}")
        if self.fail_unconfigure:
            raise OSError("cannot close")


def test_a_failing_configure_is_named_and_only_configured_plugins_are_unconfigured():
    log: list[str] = []
    plugins = [_Pair("first", log), _Pair("broken", log, fail_configure=True), _Pair("last", log)]
    engine = Engine(plugins=plugins)
    with pytest.raises(PluginError, match="plugin 'broken' raised ValueError in monoquant_confi"):
        engine.plan(mlp())
    # pluggy's order is last-registered first: 'last' was configured before 'broken' failed
    assert log == ["configure:last", "unconfigure:last"]


def test_a_failing_unconfigure_is_named_and_the_others_still_run():
    log: list[str] = []
    plugins = [_Pair("one", log), _Pair("closer", log, fail_unconfigure=True), _Pair("two", log)]
    engine = Engine(plugins=plugins)
    with pytest.raises(PluginError, match="plugin 'closer' raised OSError in monoquant_unconfi"):
        engine.plan(mlp())
    assert sorted(x for x in log if x.startswith("unconfigure")) == [
        "unconfigure:closer",
        "unconfigure:one",
        "unconfigure:two",
    ]


def test_an_unconfigure_failure_after_a_failed_run_does_not_hide_the_run_error():
    log: list[str] = []
    closer = _Pair("closer", log, fail_unconfigure=True)
    engine = Engine(plugins=[closer], entry_points=True)
    bad = Config(scheme="nope", observer="minmax")  # fails in planning, after configure
    with (
        pytest.warns(UserWarning, match="plugin 'closer' raised OSError"),
        pytest.raises(UsageError, match="unknown scheme 'nope'"),
    ):
        engine.quantize(mlp(), config=bad)
    assert "unconfigure:closer" in log


def test_wrappers_are_refused_on_hooks_that_are_called_plugin_by_plugin():
    class Wrapping:
        monoquant_plugin_name = "wrapping"

        @hookimpl(wrapper=True)
        def monoquant_report(self, report, run):
            return (yield)

    with pytest.raises(PluginLoadError, match="implements monoquant_report as a wrapper"):
        Engine(plugins=[Wrapping()], strict=True)


def test_modify_plan_can_skip_and_firstresult_can_take_over():
    from monoquant_core import ModuleResult

    class Policy:
        @hookimpl
        def monoquant_modify_plan(self, plan, model, run):
            plan.get("4").skip("head kept in float by policy")

        @hookimpl
        def monoquant_quantize_weights(self, entry, module, run):
            if entry.name != "0":
                return None
            qt = run.quantize_weight(module.weight, "int8", "minmax", name="0.weight")
            return ModuleResult(
                entry, {"weight": qt}, {"weight": module.weight}, metrics={"by": "policy"}
            )

    engine = Engine(plugins=[Policy()])
    model, report = engine.quantize(mlp())
    assert [layer.name for layer in report.layers] == ["0.weight", "2.weight"]
    assert ("4", "head kept in float by policy") in report.skipped
    assert report.extra["modules"]["0"] == {"by": "policy"}
    assert type(model[0]).__name__ == "QuantizedLinear"  # the core built it, once
    assert type(model[4]).__name__ == "Linear"


def test_a_plugin_result_missing_a_weight_is_named():
    from monoquant_core import ModuleResult

    class Partial:
        @hookimpl
        def monoquant_quantize_weights(self, entry, module, run):
            return ModuleResult(entry, {}, {})

    with pytest.raises(PluginError, match=r"returned weights \[\] for '0'.*needs \['weight'\]"):
        Engine(plugins=[Partial()]).quantize(mlp())


def test_plugin_quantized_weights_get_the_core_provenance():
    class Direct:
        @hookimpl
        def monoquant_quantize_weights(self, entry, module, run):
            from monoquant_core import ModuleResult

            w = module.weight.detach()
            sch = run.schemes.get("int8")
            cfg = sch.config_class()
            spec = sch.spec(tuple(w.shape), 0, cfg)
            obs = run.observers.get("minmax")(spec)
            obs.update(w)
            qt = sch.quantize(w, obs.qparams(), spec, cfg)
            qt.meta["direct"] = True
            return ModuleResult(entry, {"weight": qt}, {"weight": w})

    model, _ = Engine(plugins=[Direct()]).quantize(mlp())
    meta = model[0].qtensor().meta
    assert meta["plugin"] == "int8" and meta["layout"] == "affine" and meta["direct"] is True
    assert meta["observer"] == "minmax" and meta["scheme_config"]["granularity"] == "per-channel"


def test_two_engines_with_different_gptq_options_run_concurrently():
    from monoquant_core.testing.models import correlated_batches

    data = correlated_batches(2, 32)
    results = {}

    def go(key, opts):
        engine = Engine()
        _, report = engine.quantize(
            mlp(),
            scheme="int4-group",
            scheme_options={"group_size": 32},
            calibration=data,
            plugin_options={"gptq": opts},
            progress=False,
        )
        results[key] = report.extra["gptq"]

    threads = [
        threading.Thread(target=go, args=("a", {"damp": 0.05})),
        threading.Thread(target=go, args=("b", {"damp": 0.2, "act_order": False})),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["a"]["config"]["damp"] == 0.05 and results["a"]["config"]["act_order"]
    assert results["b"]["config"]["damp"] == 0.2 and not results["b"]["config"]["act_order"]
    for r in results.values():
        assert sorted(r["layers"]) == ["0", "2", "4"]


def test_a_failing_quantize_weights_wrapper_is_named():
    class Wrap:
        monoquant_plugin_name = "wrap"

        @hookimpl(wrapper=True)
        def monoquant_quantize_weights(self, entry, module, run):
            yield
            raise KeyError("lost")

    class Takeover:
        monoquant_plugin_name = "takeover"

        @hookimpl
        def monoquant_quantize_weights(self, entry, module, run):
            raise ZeroDivisionError("bad math")

    with pytest.raises(PluginError, match="plugin 'wrap' raised KeyError in monoquant_quantize_w"):
        Engine(plugins=[Wrap()]).quantize(mlp())
    with pytest.raises(PluginError, match="plugin 'takeover' raised ZeroDivisionError"):
        Engine(plugins=[Takeover()]).quantize(mlp())
