"""``sensitivity`` candidates that mark a plugin (``int4-g128+outlier``): parsed and validated,
measured as ``quantize`` makes them (a trial entry through the plugin's collectors and quantize
hooks), allocated, saved as rules with the mark, and reproduced bit for bit from those rules."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from monoquant_plugins.sensitivity import measure, parse_candidates
from monoquant_plugins.sensitivity_table import measure_tensors

from monoquant_core import Engine, UsageError
from monoquant_core.metrics import sqnr_db
from monoquant_core.testing.models import activation_batches, activation_transformer

Q = "blocks.0.attn.q_proj"


def test_a_mark_is_parsed_and_validated_by_the_plugins_options():
    (c,) = parse_candidates(["int4-g64+outlier:max_fraction=0.02"])
    assert (c.scheme, c.options, c.marks) == ("int4-group", {"group_size": 64},
                                              {"outlier": {"max_fraction": 0.02}})  # fmt: skip
    with pytest.raises(UsageError, match="a '\\+' names no plugin"):
        parse_candidates(["int4-g128+"])
    model = activation_transformer()
    with pytest.raises(UsageError, match=r"\+nope names no plugin that takes options"):
        measure(Engine(), model, None, parse_candidates(["int4-g128+nope"]))
    with pytest.raises(UsageError, match=r"max_fraction 2.0 is not in \(0, 1\]"):
        measure(Engine(), model, None, parse_candidates(["int4-g128+outlier:max_fraction=2"]))


def test_a_marked_candidate_is_measured_as_quantize_makes_it():
    data = activation_batches(4, seed=1)
    engine = Engine()
    model = activation_transformer(outliers=True)
    res = measure(engine, model, data, parse_candidates(["int4-g128", "int4-g128+outlier"]),
                  only=[Q])  # fmt: skip
    (row,) = res["layers"]
    plain, marked = row["candidates"]["int4-g128"], row["candidates"]["int4-g128+outlier"]
    # the rule the allocator would write quantizes the layer into exactly what was measured
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, _ = engine.quantize(
            activation_transformer(outliers=True),
            scheme="int4-group",
            only=[Q],
            rules=[f"{Q}=int4-group,+outlier"],
            calibration=data,
        )
    qt = q.get_submodule(Q).qtensor()
    w = model.get_submodule(Q).weight.detach()
    assert qt.extra["float_cols"].tolist() == [7, 123, 301]
    assert marked["weight_sqnr_db"] == pytest.approx(sqnr_db(w, qt.dequantize()), abs=1e-9)
    assert marked["bits_per_weight"] == pytest.approx(8 * qt.nbytes / w.numel())
    # three float16 columns of 384 rows and their int64 indices on top of the codes
    extra = (3 * 384 * 16 + 3 * 64) / w.numel()
    assert marked["bits_per_weight"] == pytest.approx(plain["bits_per_weight"] + extra)
    assert marked["output_sqnr_db"] >= plain["output_sqnr_db"] + 3.0


@pytest.mark.slow  # a whole allocation and two quantize runs, 6 s: .ci/run's slow set
def test_allocation_saves_the_marks_and_its_rules_reproduce_it(tmp_path):
    data = activation_batches(4, seed=1)
    engine = Engine()
    rules = tmp_path / "rules.json"
    cands = "int4-g128,int4-g64,int4-g128+outlier"
    opts = {"sensitivity": {"budget": 4.4, "candidates": cands, "save_rules": str(rules)}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q, rep = engine.quantize(activation_transformer(outliers=True), scheme="int4-group",
                                 plugin_options=opts, calibration=data)  # fmt: skip
        saved = json.loads(rules.read_text())
        marked = [r for r in saved if r.get("plugins")]
        assert marked and all(
            r["plugins"] == {"outlier": {"threshold": 6.0, "max_fraction": 0.01, "int4": False}}
            for r in marked
        )
        again, _ = engine.quantize(activation_transformer(outliers=True), scheme="int4-group",
                                   rules=saved, calibration=data)  # fmt: skip
    for r in saved:
        a, b = q.get_submodule(r["pattern"]).qtensor(), again.get_submodule(r["pattern"]).qtensor()
        assert a.tensors().keys() == b.tensors().keys(), r["pattern"]
        assert all(torch.equal(t, b.tensors()[k]) for k, t in a.tensors().items()), r["pattern"]
    assert rep.extra["sensitivity"]["bits_per_weight"] <= 4.4 + 1e-9


def test_a_checkpoint_has_no_modules_to_mark():
    engine = Engine()
    w = activation_transformer().get_submodule(Q).weight.detach()
    entries = [SimpleNamespace(name="w")]  # a checkpoint-mode entry: a tensor name
    res = measure_tensors(
        engine, entries, lambda n: w, parse_candidates(["int4-g128", "int4-g128+outlier"])
    )
    cells = res["layers"][0]["candidates"]
    assert "bits_per_weight" in cells["int4-g128"]
    assert "acts on the model's modules" in cells["int4-g128+outlier"]["error"]
