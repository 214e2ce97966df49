"""``sensitivity`` in a quantize run's report: the allocation and its trade-off curve in the
JSON (``extra["sensitivity"]``) and drawn in the ``--html`` page (through
``report.html_sections``, the core knows nothing of the plugin); budgets outside the feasible
range and unreachable targets are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from monoquant_plugins.sensitivity import allocate, tradeoff

from monoquant_core import UsageError
from tests.core.test_evaluation import _html_values
from tests.plugins.test_sensitivity import _table

SPEC = "tests.plugins.test_sensitivity:_model"


def test_the_quantize_page_holds_the_allocators_curve(cli, tmp_path):
    torch.manual_seed(2)
    torch.save([torch.randn(8, 64)], tmp_path / "data.pt")
    page, js = tmp_path / "q.html", tmp_path / "q.json"
    res = cli("quantize", "--model", SPEC, "--calibration", tmp_path / "data.pt",
              "--sensitivity-budget", "6", "--sensitivity-opt", "candidates=int8,int4-g32",
              "-o", tmp_path / "q.safetensors", "--report", js, "--html", page, "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    report = json.loads(js.read_text())
    extra = report["extra"]["sensitivity"]
    curve = extra["tradeoff"]
    assert set(curve) == {"allocator (greedy)", "uniform int8", "uniform int4-g32", "this run"}
    assert len(curve["allocator (greedy)"]) == 8
    assert curve["this run"] == [[extra["bits_per_weight"], extra["estimated_sqnr_db"]]]
    bits = [la["bits_per_weight"] * la["numel"] for la in report["layers"]]
    numel = sum(la["numel"] for la in report["layers"])
    assert extra["bits_per_weight"] == pytest.approx(sum(bits) / numel) and sum(bits) / numel <= 6
    # the allocator's curve climbs from the cheapest to the dearest choice
    ys = [y for _, y in curve["allocator (greedy)"]]
    assert ys == sorted(ys) and ys[-1] > ys[0] + 10, ys
    # every point of the page is a JSON number, and every JSON point is on the page
    found = _html_values(page.read_text())
    points = [(d["data-series"], float(d["data-x"]), float(d["data-y"])) for d in found["circle"]]
    assert points == [(name, x, y) for name, pts in curve.items() for x, y in pts]
    # the page's bars are still the core's (bits per weight of each layer)
    bars = {d["data-label"]: float(d["data-value"]) for d in found["rect"]}
    assert {n: v for n, v in bars.items() if n in {la["name"] for la in report["layers"]}}


def test_without_the_plugin_the_page_has_no_curve(cli, tmp_path):
    page = tmp_path / "q.html"
    res = cli("quantize", "--model", SPEC, "-o", tmp_path / "q.safetensors", "--html", page,
              "-q")  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "circle" not in _html_values(page.read_text())


def test_budgets_outside_the_feasible_range_name_it():
    table = _table({"a.weight": {"int4": (4.0, 20.0), "int8": (8.0, 45.0)},
                    "b.weight": {"int4": (4.25, 30.0), "int8": (8.0, 50.0)}})  # fmt: skip
    table["candidates"] = ["int4", "int8"]
    for method in ("greedy", "exact"):
        with pytest.raises(UsageError, match=r"below the cheapest candidates' 4\.125 \(feasible: "
                           r"4\.125 to 8\.000\)"):  # fmt: skip
            allocate(table, budget=4.0, method=method)
        with pytest.raises(UsageError, match=r"above the dearest candidates' 8\.000 \(feasible: "
                           r"4\.125 to 8\.000\)"):  # fmt: skip
            allocate(table, budget=8.5, method=method)
        assert allocate(table, budget=8.0, method=method)["bits_per_weight"] == 8.0
        with pytest.raises(UsageError, match=r"out of reach: the best candidates give an "
                           r"estimated 43\.8 dB"):  # fmt: skip
            allocate(table, target_sqnr=50.0, method=method)
    assert tradeoff(table)["allocator (greedy)"][-1][0] == 8.0


def test_bad_goals_on_the_command_line_are_one_line_errors(cli, tmp_path):
    torch.manual_seed(2)
    torch.save([torch.randn(8, 64)], tmp_path / "data.pt")
    base = (
        "quantize",
        "--model",
        SPEC,
        "--calibration",
        tmp_path / "data.pt",
        "--sensitivity-opt",
        "candidates=int8,int4-g32",
        "-o",
        tmp_path / "q.safetensors",
    )
    for goal, want in ((("--sensitivity-budget", "3"), "below the cheapest candidates' 5.000 "
                        "(feasible: 5.000 to 8.378)"),
                       (("--sensitivity-budget", "12"), "above the dearest"),
                       (("--sensitivity-target-sqnr", "200"), "out of reach: the best "
                        "candidates give an estimated")):  # fmt: skip
        res = cli(*base, *goal)
        assert res.exit_code != 0
        lines = [ln for ln in res.output.splitlines() if ln.startswith("monoquant: problem:")]
        assert len(lines) == 1 and want in lines[0], res.output
    assert not (tmp_path / "q.safetensors").exists()
