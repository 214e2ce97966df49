"""module_mode.py: quantizing an ``nn.Module`` transactionally (nothing swapped in until every
entry and the report hook succeeded) or sequentially (layer by layer in execution order, every
float module put back on failure)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from monoquant_core import Engine, PluginError, UsageError, hookimpl
from monoquant_core.swap import state_bytes
from monoquant_core.testing import mlp
from tests.helpers import (
    BrokenScalePlugin,
    extreme_weight,
    hook_count,
    one_line,
    quantized_names,
    same_state,
    snapshot,
)


def test_bare_linear_as_model_is_replaced(engine, tmp_path):
    import monoquant_core as mq

    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    q, _ = engine.quantize(lin)
    assert type(q).__name__ == "QuantizedLinear"
    p = tmp_path / "lin.safetensors"
    mq.save(q, str(p))
    assert torch.equal(mq.load(str(p), torch.nn.Linear(8, 4))(x), q(x))


def test_a_failing_report_hook_leaves_the_model_untouched():
    class Sink:
        @hookimpl
        def monoquant_report(self, report):
            raise ConnectionError("report sink down")

    model = mlp()
    before, children = snapshot(model), dict(model.named_children())
    with pytest.raises(PluginError, match="plugin 'sink' raised ConnectionError"):
        Engine(plugins=[Sink()]).quantize(model)
    assert dict(model.named_children()) == children and same_state(before, model)


def test_a_quantize_weights_result_that_is_not_a_module_result_is_named():
    class Wrong:
        @hookimpl
        def monoquant_quantize_weights(self, entry):
            return {"weight": None}

    model = mlp()
    with pytest.raises(PluginError, match="returned dict for '0', expected a ModuleResult"):
        Engine(plugins=[Wrong()]).quantize(model)
    assert quantized_names(model) == set()


def test_report_sizes_are_the_models_stored_bytes_before_and_after(engine):
    model = mlp(dims=(256, 128, 10))
    before = state_bytes(model)
    qmodel, report = engine.quantize(model, skip=["2"])
    assert report.model_bytes_before == before
    assert report.model_bytes_after == state_bytes(qmodel)
    assert report.model_bytes_after == before - 256 * 128 * 3 + 128 * 4  # int8 codes + scales


def test_a_failure_after_some_sequential_layers_restores_every_module():
    class Boom:
        @hookimpl
        def monoquant_module_done(self, entry, result):
            if entry.name == "4":
                raise RuntimeError("late failure")

    engine = Engine(plugins=[Boom()])
    model = mlp()
    originals = {n: m for n, m in model.named_children()}
    before = snapshot(model)
    with pytest.raises(PluginError, match="late failure"):
        engine.quantize(model, calibration=torch.randn(64, 32), sequential=True)
    assert {n: m for n, m in model.named_children()} == originals
    assert same_state(before, model) and hook_count(model) == 0


def test_sequential_runs_in_execution_order_and_sees_quantized_earlier_layers():
    class Reversed(nn.Module):  # registration order != execution order
        def __init__(self):
            super().__init__()
            self.last = nn.Linear(16, 4)
            self.first = nn.Linear(8, 16)

        def forward(self, x):
            return self.last(torch.relu(self.first(x)))

    order = []

    class Watch:
        @hookimpl
        def monoquant_collectors(self, entry, module, run):
            order.append(entry.name)
            return None

    x = torch.randn(40, 8)
    engine = Engine(plugins=[Watch()])
    qmodel, report = engine.quantize(Reversed(), calibration=x, sequential=True)
    assert order == ["first", "last"]
    assert type(qmodel.first).__name__ == "QuantizedLinear"
    assert type(qmodel.last).__name__ == "QuantizedLinear"
    assert report.extra["calibration"]["rows"] == {"first": 40, "last": 40}


def test_sequential_static_statistics_come_from_the_quantized_prefix(engine):
    x = torch.randn(64, 32)
    model = mlp()
    q_seq, _ = engine.quantize(
        mlp(), calibration=x, sequential=True, scheme_options={"activations": "static"}
    )
    q_par, _ = engine.quantize(model, calibration=x, scheme_options={"activations": "static"})
    s_seq = q_seq[4].qtensor().extra["act_scale"]
    s_par = q_par[4].qtensor().extra["act_scale"]
    assert torch.equal(q_seq[0].qtensor().extra["act_scale"], q_par[0].qtensor().extra["act_scale"])
    assert not torch.equal(s_seq, s_par), "layer 4 must be calibrated on quantized outputs"


# --------------------------------------------------------------------------- what cannot be stored


@pytest.mark.parametrize(
    "scheme, options",
    [("int8", {"symmetric": False}), ("int4-group", {}), ("int4-group", {"method": "hqq"})],
)
def test_weights_at_float32_limits_are_quantized_with_finite_numbers(engine, scheme, options):
    """The run succeeded with NaN scales and the report said nan."""
    model = nn.Sequential(nn.Linear(256, 8))
    with torch.no_grad():
        model[0].weight.copy_(extreme_weight())
    qmodel, report = engine.quantize(model, scheme=scheme, scheme_options=options)
    layer = report.layers[0]
    assert math.isfinite(layer.sqnr_db) and math.isfinite(layer.max_abs_err), layer
    qt = qmodel[0].qtensor()
    assert torch.isfinite(qt.scale.float()).all() and torch.isfinite(qt.dequantize()).all()


def test_a_layer_whose_weight_cannot_be_stored_is_kept_in_float_with_the_reason():
    model = mlp()
    before = snapshot(model)
    qmodel, report = Engine(plugins=[BrokenScalePlugin()]).quantize(model, rules=["0=broken-int8"])
    assert quantized_names(qmodel) == {"2", "4"} and isinstance(qmodel[0], nn.Linear)
    assert torch.equal(qmodel[0].weight, before["0.weight"])  # the float layer, untouched
    reason = dict(report.skipped)["0"]
    assert reason.startswith("kept in float: 0.weight: broken-int8 gives 1 of 64 group(s)")


# --------------------------------------------------------------------------- nothing to quantize


def test_a_run_whose_patterns_select_only_layers_kept_in_float_is_an_error(engine):
    """It exited 0 and wrote an unchanged copy."""
    model = nn.Sequential(nn.Linear(64, 16), nn.LayerNorm(16), nn.Linear(16, 8))
    before = snapshot(model)
    with pytest.raises(UsageError) as e:
        engine.quantize(model, scheme="int4-group", only=["0", "2"])
    assert one_line(e.value) == (
        "problem: nothing to quantize: every one of the layers your patterns select is kept in "
        "float: '0' (int4-group: only 64 inputs per row: padding to group_size 128 would store "
        "8.5 bits per weight; use int8 for this layer (e.g. a rule) or a smaller group_size); "
        "'2' (int4-group: only 16 inputs per row: padding to group_size 128 would store 34.0 "
        "bits per weight; use int8 for this layer (e.g. a rule) or a smaller group_size) fix: "
        "change --only / the rules, or the scheme or its options (see `monoquant plan`)"
    )
    assert same_state(before, model) and quantized_names(model) == set()
    plan = engine.plan(model, scheme="int4-group", only=["0", "2"])  # the plan verb still plans
    assert not plan.selected and len(plan) == 3


def test_a_model_without_a_quantizable_layer_is_an_error(engine):
    model = nn.Sequential(nn.LayerNorm(8), nn.Embedding(4, 8))
    with pytest.raises(UsageError, match=r"no layer that can be quantized: '1' \(Embedding lay"):
        engine.quantize(model)
    with pytest.raises(UsageError, match=r"has no layer that can be quantized \(it has no "):
        engine.quantize(nn.Sequential(nn.ReLU()))


def test_a_run_whose_every_weight_is_refused_is_an_error(engine):
    with pytest.raises(UsageError, match=r"quantized: '0' \(kept in float: 0.weight: broken-"):
        Engine(plugins=[BrokenScalePlugin()]).quantize(mlp(), scheme="broken-int8")
