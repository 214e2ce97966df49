"""Every hook spec is documented with its exact signature, and is called in the documented order."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import monoquant_core.hookspecs as specs
from monoquant_core import Engine, PluginError, hookimpl
from monoquant_core.cli import build_cli
from monoquant_core.testing import mlp

HOOKS_MD = Path(__file__).resolve().parents[2] / "docs" / "plugins" / "hooks.md"
SPEC_NAMES = sorted(n for n, f in vars(specs).items() if n.startswith("monoquant_") and callable(f))


def test_there_are_thirteen_hooks():
    assert len(SPEC_NAMES) == 13, SPEC_NAMES


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


class _Counter:
    """A collector that records each update (with its input shape) in the call list."""

    def __init__(self, calls, name):
        self.calls, self.name, self.shapes = calls, name, []

    def update(self, x):
        self.shapes.append(tuple(x.shape))
        self.calls.append(f"update:{self.name}")


class Recorder:
    """Implements every hook and records the order of calls."""

    def __init__(self):
        self.calls: list[str] = []

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
    def monoquant_add_cli_options(self, group):
        self.calls.append("add_cli_options")
        group.add_option("--recorder-tag", default="x", help="A tag.")

    @hookimpl
    def monoquant_configure(self, config):
        self.calls.append("configure")
        self.tag = config.plugin_options.get("recorder", {}).get("tag")

    @hookimpl
    def monoquant_modify_plan(self, plan, model, config):
        self.calls.append("modify_plan")

    @hookimpl
    def monoquant_collectors(self, entry, module, config):
        self.calls.append(f"collectors:{entry.name}")
        return {"recorder.count": _Counter(self.calls, entry.name)}

    @hookimpl(wrapper=True)
    def monoquant_quantize_module(self, entry, module, engine):
        self.calls.append(f"quantize_module:{entry.name}")
        result = yield
        result.metrics["recorded"] = True
        return result

    @hookimpl
    def monoquant_module_done(self, entry, result):
        self.calls.append(f"module_done:{entry.name}")

    @hookimpl
    def monoquant_report(self, report, config):
        self.calls.append("report")
        report.extra["recorder"] = len(report.layers)

    @hookimpl
    def monoquant_unconfigure(self, config):
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
        ]
    )
    rec.calls.clear()
    _, report = engine.quantize(mlp())
    assert rec.calls == [
        "configure",
        "modify_plan",
        "quantize_module:0",
        "module_done:0",
        "quantize_module:2",
        "module_done:2",
        "quantize_module:4",
        "module_done:4",
        "report",
        "unconfigure",
    ]
    assert report.extra["recorder"] == 3
    assert report.extra["modules"]["0"] == {"recorded": True}
    rec.calls.clear()
    engine.plan(mlp())
    assert rec.calls == ["configure", "modify_plan", "unconfigure"]


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
        "quantize_module:0",
        "module_done:0",
        "quantize_module:2",
        "module_done:2",
        "quantize_module:4",
        "module_done:4",
        "report",
        "unconfigure",
    ]
    assert report.extra["calibration"]["rows"] == {"0": 20, "2": 20, "4": 20}
    rec.calls.clear()
    engine.quantize(mlp(), calibration=x, sequential=True, min_rows=1)
    per_layer = [
        [f"collectors:{n}", f"update:{n}", f"quantize_module:{n}", f"module_done:{n}"]
        for n in ("0", "2", "4")
    ]
    assert rec.calls == [
        "configure",
        "modify_plan",
        *[c for layer in per_layer for c in layer],
        "report",
        "unconfigure",
    ]


def test_add_cli_options_reaches_configure():
    rec = Recorder()
    engine = Engine(plugins=[rec])
    cli = build_cli(engine)
    assert "add_cli_options" in rec.calls
    result = CliRunner().invoke(cli, ["plan", "--demo", "--recorder-tag", "hello"])
    assert result.exit_code == 0, result.output
    assert rec.tag == "hello"


def test_configure_is_historic():
    engine = Engine()
    engine.plan(mlp())
    rec = Recorder()
    engine.register(rec, name="late")
    assert rec.calls.count("configure") == 1  # replayed on registration


def test_unconfigure_runs_on_failure_and_model_is_untouched():
    class Failing(Recorder):
        @hookimpl
        def monoquant_module_done(self, entry, result):
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


def test_modify_plan_can_skip_and_firstresult_can_take_over():
    from monoquant_core import ModuleResult

    class Policy:
        @hookimpl
        def monoquant_modify_plan(self, plan, model, config):
            plan.get("4").skip("head kept in float by policy")

        @hookimpl
        def monoquant_quantize_module(self, entry, module, engine):
            if entry.name != "0":
                return None
            qt = engine.quantize_weight(module.weight, "int8", "minmax")
            new = engine.replacers.get("linear").replace(
                module, {"weight": qt}, engine.backends.get("reference"), engine.schemes.get("int8")
            )
            return ModuleResult(
                entry, new, {"weight": qt}, {"weight": module.weight}, metrics={"by": "policy"}
            )

    engine = Engine(plugins=[Policy()])
    model, report = engine.quantize(mlp())
    assert [layer.name for layer in report.layers] == ["0.weight", "2.weight"]
    assert ("4", "head kept in float by policy") in report.skipped
    assert report.extra["modules"]["0"] == {"by": "policy"}
    assert type(model[4]).__name__ == "Linear"
