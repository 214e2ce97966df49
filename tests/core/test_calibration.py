"""calibration.py: data forms, the collectors hook, hooks always removed, warnings, fallbacks
and bad input (one-line errors, model unchanged). Sequential mode: test_module_mode.py."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from monoquant_core import (
    CalibrationWarning,
    Engine,
    PluginConflictError,
    PluginError,
    UsageError,
    hookimpl,
)
from monoquant_core.testing import mlp, transformer_block
from tests.helpers import Branchy, Terminal, hook_count, same_state, snapshot


class Rows:
    """A collector: counts rows and keeps the shapes it saw."""

    def __init__(self):
        self.shapes = []

    def update(self, x):
        self.shapes.append(tuple(x.shape))


class Collecting:
    def __init__(self, name="probe.rows"):
        self.name = name
        self.by_entry = {}

    @hookimpl
    def monoquant_collectors(self, entry, module, run):
        c = self.by_entry[entry.name] = Rows()
        return {self.name: c}


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)

    def forward(self, x, scale=1.0):
        return self.b(self.a(x) * scale)


@pytest.mark.parametrize(
    "data, rows",
    [
        (torch.randn(6, 8), 6),
        ([torch.randn(6, 8), torch.randn(2, 3, 8)], 12),
        ([(torch.randn(5, 8), 2.0)], 5),
        ([{"x": torch.randn(4, 8), "scale": 0.5}], 4),
        ({"x": torch.randn(3, 8)}, 3),
        ((torch.randn(2, 8) for _ in range(3)), 6),
        (torch.utils.data.DataLoader(torch.randn(10, 8), batch_size=4), 10),
    ],
    ids=["tensor", "list", "tuples", "dicts", "one-dict", "generator", "dataloader"],
)
def test_data_forms_feed_the_first_input_of_every_planned_layer(data, rows):
    probe = Collecting()
    engine = Engine(plugins=[probe])
    model = TwoInputs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        plan = engine.calibrate(model, data)
    for name in ("a", "b"):
        entry = plan.get(name)
        assert entry.calibration_rows == rows
        assert entry.collected["probe.rows"] is probe.by_entry[name]
        assert all(s[-1] == 8 for s in probe.by_entry[name].shapes)
    assert hook_count(model) == 0
    assert "collected" not in plan.get("a").to_dict()
    assert plan.get("a").to_dict()["calibration_rows"] == rows


def test_without_calibration_rows_stay_none_and_collectors_are_not_called():
    probe = Collecting()
    engine = Engine(plugins=[probe])
    engine.quantize(mlp())
    assert probe.by_entry == {}


def test_calibration_runs_in_eval_mode_and_restores_training_flags():
    seen = []

    class Mode:
        @hookimpl
        def monoquant_collectors(self, entry, module, run):
            class C:
                def update(self, x):
                    seen.append(module.training)

            return {"mode.c": C()}

    model = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5), nn.Linear(8, 2)).train()
    Engine(plugins=[Mode()]).calibrate(model, torch.randn(40, 8))
    assert seen and not any(seen)
    assert all(m.training for m in model.modules())


@pytest.mark.parametrize(
    "data, match",
    [
        ([], "calibration data is empty"),
        (iter(()), "calibration data is empty"),
        ([torch.randn(4, 7)], r"calibration batch 0 \(inputs 4x7\) failed in the model"),
        ("data.pt", "calibration data is a str"),
        (42, "int is not a tensor or an iterable"),
        ([torch.randn(4, 32), "x"], "calibration batch 1 is a str"),
    ],
    ids=["empty-list", "empty-iter", "wrong-shape", "string", "number", "bad-item"],
)
def test_bad_calibration_input_is_one_line_and_leaves_the_model_unchanged(data, match):
    probe = Collecting()
    engine = Engine(plugins=[probe])
    model = mlp()
    before = snapshot(model)
    with pytest.raises(UsageError, match=match) as e:
        engine.quantize(model, calibration=data, scheme_options={"activations": "static"})
    assert "\n" not in str(e.value) and "fix:" in str(e.value)
    assert hook_count(model) == 0
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.Sequential)) for m in model.modules())
    assert same_state(before, model)


@pytest.mark.parametrize("sequential", [False, True])
def test_generator_raising_midway_is_a_clear_error_with_no_hooks_and_no_quantized_layer(
    sequential,
):
    def batches():
        yield torch.randn(16, 32)
        yield torch.randn(16, 32)
        raise OSError("disk vanished")

    engine = Engine(plugins=[Collecting()])
    model = mlp()
    before = snapshot(model)
    with pytest.raises(UsageError, match="raised OSError while producing batch 2: disk vanished"):
        engine.quantize(
            model,
            calibration=batches(),
            sequential=sequential,
            scheme_options={"activations": "static"},
        )
    assert hook_count(model) == 0
    assert not any(type(m).__name__ == "QuantizedLinear" for m in model.modules())
    assert same_state(before, model)


def test_collector_name_clash_names_both_plugins():
    with pytest.raises(PluginConflictError, match="plugin 'one'.*plugin 'two'|plugin 'two'.*one"):
        engine = Engine(plugins=[])
        engine.register(Collecting("same.name"), name="one")
        engine.register(Collecting("same.name"), name="two")
        engine.calibrate(mlp(), torch.randn(40, 32))


def test_a_failing_collector_is_a_plugin_error_and_hooks_are_removed():
    class Bad:
        @hookimpl
        def monoquant_collectors(self, entry):
            class C:
                def update(self, x):
                    raise ZeroDivisionError("oops")

            return {"bad.c": C()}

    model = mlp()
    with pytest.raises(PluginError, match="plugin 'bad': collector 'bad.c' of '0' raised"):
        Engine(plugins=[Bad()]).quantize(model, calibration=torch.randn(40, 32))
    assert hook_count(model) == 0


def test_a_collector_without_update_is_a_plugin_error():
    class Bad:
        @hookimpl
        def monoquant_collectors(self, entry):
            return {"bad.c": object()}

    with pytest.raises(PluginError, match="has no update"):
        Engine(plugins=[Bad()]).calibrate(mlp(), torch.randn(40, 32))


def test_too_few_rows_warns_and_the_threshold_is_configurable(engine):
    with pytest.warns(CalibrationWarning, match="only 4 input row"):
        engine.calibrate(mlp(), torch.randn(4, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        engine.calibrate(mlp(), torch.randn(4, 32), min_rows=4)


def test_nan_inputs_warn_and_are_not_fed(engine):
    probe = Collecting()
    engine.register(probe)
    x = torch.randn(40, 32)
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.warns(CalibrationWarning, match="NaN/Inf in the inputs of '0'"):
        plan = engine.calibrate(mlp(), [x, bad], min_rows=1)
    assert plan.get("0").calibration_rows == 40
    assert probe.by_entry["0"].shapes == [(40, 32)]  # the batch holding a NaN was not fed


def test_a_layer_without_data_falls_back_to_weight_only_with_the_reason(engine):
    model = Branchy()
    x = torch.randn(64, 32)
    ref = model(x)
    with pytest.warns(CalibrationWarning, match="1 planned layer.*'unused'"):
        qmodel, report = engine.quantize(
            model, calibration=x, scheme_options={"activations": "static"}
        )
    assert qmodel.unused.qtensor().activations == "none"
    assert qmodel.used.qtensor().activations == "static"
    assert report.extra["calibration"]["fallbacks"] == {
        "unused": "saw no calibration data: weight-only (activations=none)"
    }
    assert report.extra["calibration"]["rows"] == {"used": 64, "unused": 0}
    assert (qmodel(x) - ref).abs().max() < 0.1
    with pytest.warns(CalibrationWarning):
        plan = engine.calibrate(Branchy(), x, scheme_options={"activations": "static"})
    assert any("saw no calibration data" in n for n in plan.get("unused").notes)


def test_static_without_data_fails_before_any_compute(engine):
    model = mlp()
    with pytest.raises(UsageError, match="activations='static' needs calibration data"):
        engine.quantize(model, scheme_options={"activations": "static"})
    with pytest.raises(UsageError, match="sequential=True needs calibration data"):
        engine.quantize(model, sequential=True)


def test_transformer_block_calibrates_every_linear(engine):
    block = transformer_block()
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationWarning)
        plan = engine.calibrate(block, [torch.randn(2, 8, 64) for _ in range(3)], min_rows=16)
    rows = {e.name: e.calibration_rows for e in plan.selected}
    assert rows and set(rows.values()) == {48}, rows


@pytest.mark.parametrize("sized", [True, False])
def test_progress_line_counts_batches_on_a_terminal(engine, monkeypatch, sized):
    tty = Terminal()
    monkeypatch.setattr("sys.stderr", tty)
    batches = [torch.randn(16, 32) for _ in range(3)]
    engine.calibrate(mlp(), batches if sized else iter(batches), min_rows=1)
    assert ("3/3 batches" if sized else "3 batches") in tty.text, tty.text
    tty.text = ""
    engine.calibrate(mlp(), batches, min_rows=1, progress=False)
    assert tty.text == ""
