"""run.py: the per-run context (options of enabled plugins, the per-entry configs, per-run
state that no other run sees, hook calls that pass the run along)."""

from __future__ import annotations

import pytest
import torch
from monoquant_plugins.outlier import OutlierOptions

from monoquant_core import Engine, PlanEntry, PluginError, Run, hookimpl
from monoquant_core.testing import mlp


def test_options_is_none_unless_the_user_enabled_the_plugin(engine):
    with engine.run(engine.configure()) as run:
        assert run.options("outlier") is None and run.options("gptq") is None
    cfg = engine.configure(plugin_options={"outlier": {"threshold": 4}})
    with engine.run(cfg) as run:
        assert run.options("outlier") == OutlierOptions(threshold=4.0)
        assert run.options("gptq") is None
    with engine.run(engine.configure(plugin_options={"gptq": {"enable": False}})) as run:
        assert run.options("gptq") is None


def test_run_options_of_a_plugin_without_options_is_a_plugin_bug(engine):
    with engine.run(engine.configure()) as run, pytest.raises(PluginError, match="no plugin"):
        run.options("int8")


def test_entry_configs_follow_the_entry(engine):
    cfg = engine.configure(scheme="int8", scheme_options={"symmetric": False})
    with engine.run(cfg) as run:
        same = PlanEntry("a", "Linear", scheme="int8", observer="minmax")
        assert run.entry_configs(same) == (cfg.scheme_config, cfg.observer_config)
        ruled = PlanEntry(
            "b",
            "Linear",
            scheme="int4-group",
            observer="minmax",
            options={"scheme_options": {"group_size": 32}},
        )
        scheme_cfg, _ = run.entry_configs(ruled)
        assert scheme_cfg == engine.scheme_config("int4-group", {"group_size": 32})


def test_state_belongs_to_one_run():
    seen = []

    class Stateful:
        monoquant_plugin_name = "stateful"

        @hookimpl
        def monoquant_configure(self, run):
            assert "stateful" not in run.state  # nothing left over from an earlier run
            run.state["stateful"] = {"entries": []}
            seen.append(run)

        @hookimpl
        def monoquant_module_done(self, entry, run):
            run.state["stateful"]["entries"].append(entry.name)

    engine = Engine(plugins=[Stateful()])
    engine.quantize(mlp())
    engine.quantize(mlp(dims=(32, 10)))
    other = Engine(plugins=[Stateful()])
    other.quantize(mlp(dims=(32, 16, 10)))
    first, second, third = seen
    assert first.state["stateful"]["entries"] == ["0", "2", "4"]
    assert second.state["stateful"]["entries"] == ["0"]
    assert third.state["stateful"]["entries"] == ["0", "2"]
    assert len({id(r.state) for r in seen}) == 3


def test_call_and_call_each_pass_the_run_along(engine):
    got = []

    class Listener:
        monoquant_plugin_name = "listener"

        @hookimpl
        def monoquant_report(self, report, run):
            got.append((report, run))
            return "listened"

    bare = Engine(plugins=[Listener()], entry_points=False)
    with bare.run(engine.configure()) as run:
        results = run.call_each("monoquant_report", report="the report")
    assert results == [("listener", "listened")]
    assert got == [("the report", run)]
    with engine.run(engine.configure()) as run:
        model = mlp()
        entry = engine.plan(model).get("0")
        res = run.call("monoquant_quantize_weights", entry=entry, module=model[0])
    assert set(res.qtensors) == {"weight"} and res.module is None  # the core plugin's result


def test_quantize_entry_weights_and_choose_backend(engine):
    model = mlp()
    plan = engine.plan(model)
    with engine.run(plan.config) as run:
        entry = plan.get("2")
        qts = run.quantize_entry_weights(entry, model[2])
        assert list(qts) == ["weight"] and qts["weight"].shape == (64, 64)
        assert qts["weight"].meta["plugin"] == "int8"
        w = torch.zeros(64, 64)
        only = run.quantize_entry_weights(entry, model[2], {"weight": w})
        assert only["weight"].dequantize().eq(0).all()
        from monoquant_core.components import WeightInfo

        info = WeightInfo.of(qts["weight"])
        name, notes = run.choose_backend(info)
        assert name == entry.backend == "torch-cpu" and notes == []
        assert run.choose_backend(info, "reference") == ("reference", [])
    assert isinstance(run, Run)


def test_trial_entries_calibrate_and_quantize_with_only_the_named_plugins():
    """run.calibrate feeds only the named plugins' collectors; run.call(..., only_plugins)
    runs only those plugins' quantize hooks (the core's default is the plugin ``core``)."""
    seen = []

    class Counter:
        rows = 0

        def update(self, x):
            self.rows += x.shape[0]

    class Spy:
        monoquant_plugin_name = "spy"

        @hookimpl
        def monoquant_collectors(self, entry):
            return {"spy.rows": Counter()}

        @hookimpl(wrapper=True)
        def monoquant_quantize_weights(self, entry):
            seen.append(entry.name)
            return (yield)

    engine = Engine(plugins=[Spy()])
    model = mlp()
    trials = engine.plan(model, scheme="int8").selected
    with engine.run(engine.configure()) as run:
        run.calibrate(model, trials, [torch.randn(5, 32)], only_plugins=("outlier",))
        assert all(t.collected == {} and t.calibration_rows == 5 for t in trials)
        run.calibrate(model, trials, [torch.randn(5, 32)], only_plugins=("spy",))
        assert trials[0].collected["spy.rows"].rows == 5
        layer = model.get_submodule(trials[0].name)
        res = run.call("monoquant_quantize_weights", ("core",), entry=trials[0], module=layer)
        assert res.qtensors["weight"].scheme == "int8" and seen == []
        run.call("monoquant_quantize_weights", ("core", "spy"), entry=trials[0], module=layer)
        assert seen == [trials[0].name]
