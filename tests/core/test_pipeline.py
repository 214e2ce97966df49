"""pipeline.py: the single per-tensor path (observe -> quantize -> provenance), the per-entry
path with the replacer's channel axes, and the core plugin's default."""

from __future__ import annotations

import re

import pytest
import torch
from monoquant_plugins.int8 import Int8Scheme

from monoquant_core import Engine, ModuleResult, UsageError, hookimpl
from monoquant_core.errors import WeightNotRepresentable
from monoquant_core.options import config_to_dict
from monoquant_core.pipeline import (
    check_representable,
    monoquant_quantize_weights,
    provenance,
    quantize_weight,
)
from monoquant_core.testing import mlp
from tests.helpers import BrokenScalePlugin, Conv1D, one_line


class Custom(Int8Scheme):
    """An int8 scheme with its own dequantize: a custom layout."""

    name = "custom-int8"

    def dequantize(self, qt):
        return qt.dequantize()


class CustomPlugin:
    monoquant_plugin_name = "custom"

    @hookimpl
    def monoquant_register_schemes(self, register):
        register(Custom())


def test_every_quantized_weight_carries_its_provenance(engine):
    cfg = engine.scheme_config("int8", {"symmetric": False})
    qt = quantize_weight(engine.registries, torch.randn(4, 8), "int8", "minmax", 0, cfg)
    assert qt.meta["plugin"] == "int8" and qt.meta["layout"] == "affine"
    assert qt.meta["scheme_config"]["symmetric"] is False
    assert qt.meta["observer"] == "minmax"
    assert qt.meta["observer_config"] == {"version": 1, "averaging_constant": None}
    # defaults when no configs are given
    plain = quantize_weight(engine.registries, torch.randn(4, 8), "int8", "minmax")
    assert plain.meta["scheme_config"] == config_to_dict(engine.scheme_config("int8"))
    assert plain.meta["scheme_config"]["symmetric"] is True
    custom = Engine(plugins=[CustomPlugin()])
    prov = provenance(custom.registries, "custom-int8", None, None, None)
    assert prov == {
        "plugin": "custom",
        "layout": "custom",
        "scheme_config": {},
        "observer": None,
        "observer_config": {},
    }


def test_nonfinite_weight_is_refused_with_its_name(engine):
    w = torch.randn(4, 4)
    w[1, 1] = float("nan")
    with pytest.raises(UsageError, match=re.escape("'blocks.0.fc.weight' contains 1 NaN/Inf")):
        engine.quantize_weight(w, "int8", "minmax", name="blocks.0.fc.weight")


def test_a_component_error_names_the_tensor(engine):
    w = torch.randn(4, 4)
    w[0, 0] = 1e6
    with pytest.raises(UsageError) as e:
        engine.quantize_weight(w, "fp16", "minmax", name="head.weight")
    msg = str(e.value)
    assert msg.startswith("problem: head.weight: values exceed float16 range")
    assert "fix: " in msg and "bf16" in msg


def test_entry_weights_use_the_replacers_channel_axis(engine):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(24, 16)

    model = Tiny()
    plan = engine.plan(model)
    entry = plan.get("c_fc")
    with engine.run(plan.config) as run:
        qts = run.quantize_entry_weights(entry, model.c_fc)
    qt = qts["weight"]
    assert qt.axis == 1 and qt.scale.shape == (24, 1)  # one scale per output column
    expected = model.c_fc.weight.detach().abs().amax(dim=0) / 127
    torch.testing.assert_close(qt.scale.squeeze(1), expected)


def test_the_core_default_quantizes_every_weight_and_builds_no_module(engine):
    model = mlp()
    plan = engine.plan(model)
    with engine.run(plan.config) as run:
        res = monoquant_quantize_weights(plan.get("2"), model[2], run)
    assert isinstance(res, ModuleResult) and res.module is None
    assert set(res.qtensors) == {"weight"} and res.originals["weight"] is model[2].weight
    torch.testing.assert_close(
        res.qtensors["weight"].dequantize(), model[2].weight.detach(), atol=0.01, rtol=0
    )


def test_a_scale_that_is_not_finite_is_refused_whoever_computed_it():
    """A scheme's inf scale was written, loaded and computed with (NaN in the report)."""
    engine = Engine(plugins=[BrokenScalePlugin()])
    with pytest.raises(WeightNotRepresentable) as e:
        engine.quantize_weight(torch.randn(4, 8), "broken-int8", "minmax", name="fc.weight")
    assert one_line(e.value) == (
        "problem: fc.weight: broken-int8 gives 1 of 4 group(s) a scale or zero point that is "
        "not finite, or codes that dequantize to inf fix: keep it in float (--skip 'fc'), or "
        "use another scheme for it (a rule)"
    )
    assert isinstance(e.value, UsageError)  # a one-line user error where it is not caught


def test_check_representable_accepts_every_builtin_result(engine):
    w = torch.randn(16, 256)
    for scheme, options in [("int8", {}), ("int8", {"symmetric": False}), ("int4-group", {})]:
        cfg = engine.scheme_config(scheme, options)
        check_representable(engine.quantize_weight(w, scheme, "minmax", 0, cfg), "w")
