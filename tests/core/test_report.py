"""report.py: per-weight metrics, skipped layers with their reasons and model totals, as a
table and as JSON, and building the report of a module-mode run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from monoquant_core import Config, ModuleResult, Plan, PlanEntry, QuantReport, UsageError
from monoquant_core.metrics import sqnr_db
from monoquant_core.report import build_report
from monoquant_core.testing import mlp, tiny_models


def test_report_sizes_and_json(engine):
    model = mlp(dims=(256, 256, 256))
    _, report = engine.quantize(model)
    assert report.compression_ratio > 3.5, report.compression_ratio
    layer = report.layer("0.weight")
    assert layer.bits_per_weight == pytest.approx(8 + 32 / 256)
    assert layer.sqnr_db > 40
    data = report.to_dict()
    assert data["layers"][0]["name"] == "0.weight"
    text = report.render()
    assert "0.weight" in text and "smaller" in text


def test_build_report_has_a_row_per_weight_the_skips_and_plugin_metrics(engine):
    w0, w1 = torch.randn(8, 16), torch.zeros(4, 8)
    e0 = PlanEntry("enc.fc", "Linear", "int8", "minmax", "reference", "linear")
    e1 = PlanEntry("", "Linear", "int8", "minmax", "torch-cpu", "linear")
    skipped = PlanEntry("norm", "LayerNorm")
    skipped.skip("normalisation layer")
    also = PlanEntry("ln2", "LayerNorm")
    also.skip("normalisation layer")
    plan = Plan([e0, skipped, e1, also], Config(scheme="int8", observer="minmax"))
    q0 = engine.quantize_weight(w0, "int8", "minmax")
    q1 = engine.quantize_weight(w1, "int8", "minmax")
    results = [
        ModuleResult(e0, {"weight": q0}, {"weight": w0}, {"note": 1}, time_s=0.5),
        ModuleResult(e1, {"weight": q1}, {}, time_s=0.25),
    ]
    rep = build_report(engine.schemes, plan, results, before=1000, after=250)
    assert [r.name for r in rep.layers] == ["enc.fc.weight", "weight"]
    r0, r1 = rep.layers
    assert (r0.module_type, r0.scheme, r0.observer, r0.backend) == (
        "Linear",
        "int8",
        "minmax",
        "reference",
    )
    assert r0.shape == (8, 16) and r0.numel == 128 and r0.bytes_before == 512
    assert r0.bytes_after == q0.nbytes and r0.time_s == 0.5
    assert r0.sqnr_db == pytest.approx(sqnr_db(w0, q0.dequantize()))
    assert r1.sqnr_db == math.inf  # no original given: compared with itself
    assert rep.skipped == [("norm", "normalisation layer"), ("ln2", "normalisation layer")]
    assert rep.extra == {"modules": {"enc.fc": {"note": 1}}}
    assert rep.compression_ratio == 4.0 and rep.min_sqnr_db == r0.sqnr_db
    assert rep.config["scheme"] == "int8"
    text = rep.render()
    assert "kept in float (2):\n  norm, ln2: normalisation layer" in text
    assert "1000 B -> 250 B (4.00x smaller), 2 weights quantized" in text
    data = json.loads(rep.to_json())
    assert data["layers"][1]["sqnr_db"] == "inf" and data["layers"][0]["shape"] == [8, 16]
    assert data["skipped"][0] == {"name": "norm", "reason": "normalisation layer"}


def test_an_empty_report():
    rep = QuantReport()
    assert rep.compression_ratio == 0.0 and rep.min_sqnr_db is None
    assert rep.to_dict()["min_sqnr_db"] is None
    assert "0 weights quantized, min SQNR - dB" in rep.render()
    with pytest.raises(KeyError):
        rep.layer("fc.weight")


# --------------------------------------------------------------------------- statistics modes


def _big_model():
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, 2048), nn.Linear(256, 64))


def test_stats_full_sample_and_off():
    from monoquant_core import Engine
    from monoquant_core.metrics import error_stats

    engine = Engine()
    full = engine.quantize(_big_model(), scheme="int4-group", stats="full")
    sample = engine.quantize(_big_model(), scheme="int4-group")  # the default
    off = engine.quantize(_big_model(), scheme="int4-group", stats="off")
    big_full, big_sample, big_off = (r.report.layer("0.weight") for r in (full, sample, off))
    qt = full.model[0].qtensor()
    exact = error_stats(_big_model()[0].weight, qt.dequantize())
    assert (big_full.sqnr_db, big_full.max_abs_err) == pytest.approx(exact[:2], rel=1e-6)
    assert big_full.stats_fraction == 1.0
    assert 0.3 < big_sample.stats_fraction < 0.75  # 2 M elements, a budget of about 1 M
    assert big_sample.sqnr_db == pytest.approx(big_full.sqnr_db, abs=0.1)
    assert big_sample.max_abs_err <= big_full.max_abs_err
    small = sample.report.layer("1.weight")
    assert small.stats_fraction == 1.0  # small weights are always exact
    assert small.sqnr_db == full.report.layer("1.weight").sqnr_db
    assert "measured on evenly spread rows" in sample.report.render()
    assert (big_off.sqnr_db, big_off.max_abs_err, big_off.rel_err) == (None, None, None)
    assert off.report.min_sqnr_db is None and "min SQNR - dB" in off.report.render()
    assert big_off.bytes_after == big_full.bytes_after  # sizes are always reported
    with pytest.raises(UsageError, match="stats='some' is not one of sample, full, off"):
        engine.configure(stats="some")


# --------------------------------------------------------------------------- plugin facts per layer


def test_plugin_notes_are_listed_under_the_table_and_in_the_json():
    """Facts plugins record per layer were only in the JSON's free-form metrics: a plugin's
    ``ModuleResult.notes`` are shown as ``layer: note`` (the core knows no plugin's keys)."""
    rep = QuantReport(notes=[("enc.q", "3 outlier columns kept in float"), ("", "a fact")])
    assert "\nnotes:\n  enc.q: 3 outlier columns kept in float\n  (root): a fact\n" in rep.render()
    assert json.loads(rep.to_json())["notes"] == [
        {"name": "enc.q", "note": "3 outlier columns kept in float"},
        {"name": "", "note": "a fact"},
    ]
    assert "notes:" not in QuantReport().render()


def test_real_runs_note_their_outlier_columns_and_activation_scales(engine):
    model = tiny_models()["outliers"]
    data = [model.inputs.repeat(10, 1)]
    _, rep = engine.quantize(
        model.build(),
        scheme_options={"activations": "dynamic"},
        plugin_options={"outlier": {}},
        calibration=data,
    )
    kept = {n: m["outlier_columns"] for n, m in rep.extra["modules"].items()}
    assert sum(kept.values()) > 0, kept
    notes = dict(rep.notes)
    for name, n in kept.items():
        assert notes.get(name, "").startswith(f"{n} outlier column") == (n > 0), notes
    assert f"\n  {next(iter(notes))}: " in rep.render()
    _, rep = engine.quantize(
        model.build(), scheme_options={"activations": "static"}, calibration=data
    )
    notes = dict(rep.notes)
    for name, m in rep.extra["modules"].items():
        want = f"static activation scale {m['act_scale']:.4g}, zero point {m['act_zero_point']}"
        assert notes[name] == want
