"""plan.py: PlanEntry / Plan (selection, skips with reasons, the table, JSON) and the result
types."""

from __future__ import annotations

import json
import re

import pytest
import torch

from monoquant_core import Config, ModuleResult, Plan, PlanEntry, QuantResult


def _plan(unit="modules"):
    cfg = Config(scheme="int8", observer="minmax")
    a = PlanEntry("", "Linear", "int8", "minmax", "reference", "linear", {"weight": (4, 8)})
    a.notes.append("picky: N % 16 != 0, using reference")
    b = PlanEntry("norm", "LayerNorm", params={"weight": (8,)})
    b.skip("normalisation layer")
    c = PlanEntry("head", "Linear", "int8", "minmax", None, "linear", {"weight": (2, 8)})
    return Plan([a, b, c], cfg, unit)


def test_skip_clears_the_components_and_keeps_the_reason():
    e = PlanEntry("fc", "Linear", "int8", "minmax", "torch-cpu", "linear")
    assert e.selected
    e.skip("rule 'fc=skip'")
    assert not e.selected and e.skip_reason == "rule 'fc=skip'"
    assert (e.scheme, e.observer, e.backend, e.replacer) == (None, None, None, "linear")


def test_selected_skipped_and_get():
    plan = _plan()
    assert [e.name for e in plan.selected] == ["", "head"]
    assert [e.name for e in plan.skipped] == ["norm"]
    assert [e.name for e in plan] == ["", "norm", "head"] and len(plan) == 3
    assert plan.get("norm").module_type == "LayerNorm"
    with pytest.raises(KeyError):
        plan.get("nope")


def test_render_is_the_plan_table():
    lines = _plan().render().splitlines()
    cells = [re.split(r"\s{2,}", line) for line in lines]
    assert cells[0] == ["module", "type", "shape", "scheme / observer / backend", "why"]
    assert cells[2] == [
        "(root)",
        "Linear",
        "4x8",
        "int8 / minmax / reference",
        "picky: N % 16 != 0, using reference",
    ]
    assert cells[3] == ["norm", "LayerNorm", "8", "keep float", "normalisation layer"]
    assert cells[4] == ["head", "Linear", "2x8", "int8 / minmax"]
    assert lines[-1] == "2 of 3 modules will be quantized."
    tensors = _plan("tensors").render()
    assert tensors.startswith("tensor") and tensors.endswith("2 of 3 tensors will be quantized.")


def test_to_dict_is_json_and_leaves_out_collected_data():
    plan = _plan()
    plan.get("head").collected["x"] = torch.ones(3)
    plan.get("head").calibration_rows = 12
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["config"]["scheme"] == "int8"
    head, norm = data["entries"][2], data["entries"][1]
    assert head["action"] == "quantize" and head["calibration_rows"] == 12
    assert "collected" not in head and "calibration_rows" not in norm
    assert norm == {
        "name": "norm",
        "module_type": "LayerNorm",
        "action": "skip",
        "scheme": None,
        "observer": None,
        "backend": None,
        "replacer": None,
        "params": {"weight": [8]},
        "options": {},
        "skip_reason": "normalisation layer",
        "notes": [],
        "kernels": [],
    }


def test_module_result_defaults_and_quant_result_unpacks():
    entry = PlanEntry("fc", "Linear")
    res = ModuleResult(entry, {})
    assert (res.originals, res.metrics, res.module, res.time_s) == ({}, {}, None, 0.0)
    model, report = QuantResult("m", "r")
    assert (model, report) == ("m", "r")
