"""module_mode.py: quantizing an ``nn.Module`` transactionally (nothing swapped in until every
entry and the report hook succeeded) or sequentially (layer by layer in execution order, every
float module put back on failure)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monoquant_core import Engine, PluginError, hookimpl
from monoquant_core.swap import state_bytes
from monoquant_core.testing import mlp
from tests.helpers import hook_count, quantized_names, same_state, snapshot


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
