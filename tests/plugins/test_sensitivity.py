"""``sensitivity`` plugin: per layer and candidate, bits/weight and SQNRs equal to a direct
computation; the model is restored exactly; the command comes from the plugin through
``monoquant_add_cli_commands`` (a clashing command is a plugin load error)."""

from __future__ import annotations

import json
import math

import click
import pytest
import torch
from monoquant_plugins.sensitivity import measure, parse_candidates
from torch import nn

from monoquant_core import Engine, UsageError
from monoquant_core.metrics import sqnr_db


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                         nn.Linear(64, 8))  # fmt: skip


def test_numbers_equal_a_direct_computation_and_the_model_is_restored():
    engine = Engine()
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    data = [torch.randn(16, 64) for _ in range(2)]
    cands = parse_candidates(["int8", "int4-g32"])
    res = measure(engine, model, data, cands)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res["candidates"] == ["int8", "int4-g32"] and res["batches"] == 2
    assert {r["name"] for r in res["layers"]} == {"0.weight", "2.weight", "4.weight"}
    with torch.no_grad():
        ref = torch.cat([model(x).reshape(-1) for x in data]).double()
    for row in res["layers"]:
        mname = row["name"].rsplit(".", 1)[0]
        w = model.get_submodule(mname).weight.detach().clone()
        for c in cands:
            cfg = engine.configure(scheme=c.scheme, scheme_options=c.options)
            qt = engine.quantize_weight(
                w, c.scheme, cfg.observer, 0, cfg.scheme_config, cfg.observer_config, row["name"]
            )
            wq = engine.schemes.get(c.scheme).dequantize(qt).to(w.dtype)
            got = row["candidates"][c.label]
            assert got["bits_per_weight"] == pytest.approx(8 * qt.nbytes / w.numel())
            assert got["weight_sqnr_db"] == pytest.approx(sqnr_db(w, wq))
            other = _model()
            other.get_submodule(mname).weight.data.copy_(wq)
            with torch.no_grad():
                out = torch.cat([other(x).reshape(-1) for x in data]).double()
            want = 10 * math.log10(float((ref**2).sum()) / float(((out - ref) ** 2).sum()))
            assert got["output_sqnr_db"] == pytest.approx(want, abs=1e-6)
            assert got["output_sqnr_db"] < 80  # each candidate really changed the output
    # most sensitive first: the output SQNR of the cheapest candidate ascends
    keys = [r["candidates"]["int4-g32"]["output_sqnr_db"] for r in res["layers"]]
    assert keys == sorted(keys)
    # more bits, less error, for every layer
    for r in res["layers"]:
        c = r["candidates"]
        assert c["int8"]["output_sqnr_db"] > c["int4-g32"]["output_sqnr_db"]


def test_without_data_only_weights_are_measured():
    res = measure(Engine(), _model(), None, parse_candidates(["int8"]))
    row = res["layers"][0]["candidates"]["int8"]
    assert res["batches"] == 0 and "output_sqnr_db" not in row and row["weight_sqnr_db"] > 30


@pytest.mark.parametrize(
    "spec, scheme, options",
    [
        ("int4-g64", "int4-group", {"group_size": 64}),
        ("int4-group:group_size=32,symmetric=true", "int4-group",
         {"group_size": 32, "symmetric": True}),
        ("fp16", "fp16", {}),
    ],
)  # fmt: skip
def test_candidate_specs(spec, scheme, options):
    (c,) = parse_candidates([spec])
    assert (c.label, c.scheme, c.options) == (spec, scheme, options)


def test_bad_candidates_are_one_line_errors():
    with pytest.raises(UsageError, match="is not KEY=VALUE"):
        parse_candidates(["int8:oops"])
    with pytest.raises(UsageError, match="no candidate"):
        parse_candidates([])
    with pytest.raises(UsageError, match="nope"):
        measure(Engine(), _model(), None, parse_candidates(["nope"]))


def test_the_command_comes_from_the_plugin(cli, tmp_path):
    torch.manual_seed(2)
    torch.save([torch.randn(8, 64)], tmp_path / "data.pt")
    spec = "tests.plugins.test_sensitivity:_model"
    res = cli("sensitivity", "--model", spec, "--calibration", tmp_path / "data.pt",
              "--candidates", "int8,int4-g32", "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["candidates"] == ["int8", "int4-g32"] and len(data["layers"]) == 3
    table = cli("sensitivity", "--model", spec, "--candidates", "int8")
    assert table.exit_code == 0 and "weight SQNR dB" in table.output
    disabled = Engine(disable=["sensitivity"])
    from monoquant_core.cli.app import build_cli

    assert "sensitivity" not in build_cli(disabled).commands


def test_a_plugin_command_that_clashes_is_a_load_error(tmp_path):
    from monoquant_core import PluginLoadWarning, hookimpl
    from monoquant_core.cli.app import build_cli

    class Clash:
        monoquant_plugin_name = "clash"

        @hookimpl
        def monoquant_add_cli_commands(self, cli):
            @cli.command("quantize")
            def quantize() -> None:
                click.echo("mine")

    engine = Engine(plugins=[Clash()])
    with pytest.warns(PluginLoadWarning, match="adds the command.*quantize.*already exist"):
        group = build_cli(engine)
    assert group.commands["quantize"].callback.__module__ != __name__


def _table(rows):
    """A measure() table from ``{name: {label: (bits/weight, output SQNR)}}`` (shape 10x10)."""
    return {
        "batches": 1,
        "layers": [
            {
                "name": name,
                "shape": [10, 10],
                "candidates": {
                    label: {"bits_per_weight": b, "weight_sqnr_db": db, "output_sqnr_db": db}
                    for label, (b, db) in cands.items()
                },
            }
            for name, cands in rows.items()
        ],
    }


def test_allocation_spends_bits_where_they_buy_most():
    from monoquant_plugins.sensitivity import allocate

    table = _table(
        {
            "a.weight": {"int4": (4.0, 20.0), "int8": (8.0, 45.0)},  # sensitive
            "b.weight": {"int4": (4.0, 40.0), "int8": (8.0, 60.0)},  # robust
        }
    )
    res = allocate(table, budget=6.0)
    assert res["choice"] == {"a.weight": "int8", "b.weight": "int4"}
    assert res["bits_per_weight"] == pytest.approx(6.0)
    noise = 10 ** (-45 / 10) + 10 ** (-40 / 10)
    assert res["estimated_sqnr_db"] == pytest.approx(-10 * math.log10(noise))
    assert allocate(table, budget=4.0)["choice"] == {"a.weight": "int4", "b.weight": "int4"}
    assert allocate(table, budget=8.0)["choice"] == {"a.weight": "int8", "b.weight": "int8"}
    # a target: the fewest bits reaching it
    assert allocate(table, target_sqnr=38.0)["choice"] == {"a.weight": "int8", "b.weight": "int4"}
    with pytest.raises(UsageError, match="below the cheapest candidates' 4.00"):
        allocate(table, budget=3.0)
    with pytest.raises(UsageError, match="out of reach"):
        allocate(table, target_sqnr=80.0)


def test_a_budget_in_a_quantize_run(tmp_path):
    torch.manual_seed(3)
    data = [torch.randn(32, 64)]
    opts = {"budget": 6.0, "candidates": "int8,int4-g32", "save_rules": str(tmp_path / "r.json")}
    _, rep = Engine().quantize(_model(), scheme="int8", plugin_options={"sensitivity": opts},
                               calibration=data)  # fmt: skip
    numel = sum(la.numel for la in rep.layers)
    assert sum(la.bits_per_weight * la.numel for la in rep.layers) / numel <= 6.0
    assert {la.scheme for la in rep.layers} == {"int8", "int4-group"}  # mixed
    saved = json.loads((tmp_path / "r.json").read_text())
    assert sorted(r["pattern"] for r in saved) == ["0", "2", "4"]


@pytest.mark.slow  # 25 weights x 5 candidates x 2 batches of forward passes, and 4 quantize runs
def test_budget_beats_uniform_schemes_of_the_same_size_and_saves_rules(tmp_path):
    """End to end on the demo model with calibration data: the allocation stays within the
    budget, its output SQNR on other inputs is at least the uniform scheme's of the same
    bits, and the saved rules reproduce the same quantized weights without the pass (with the
    same calibration data)."""
    from monoquant_core.demo import demo_inputs, demo_model

    data = [demo_inputs(seed=s) for s in range(2)]
    test = [demo_inputs(seed=s) for s in range(10, 12)]
    engine = Engine()

    def sqnr(model):
        ref = demo_model().eval()
        with torch.no_grad():
            r = torch.cat([ref(x).reshape(-1) for x in test]).double()
            g = torch.cat([model(x).reshape(-1) for x in test]).double()
        return 10 * math.log10(float((r**2).sum()) / float(((g - r) ** 2).sum()))

    rules = tmp_path / "rules.json"
    opts = {"sensitivity": {"budget": 5.0, "save_rules": str(rules)}}
    q, rep = engine.quantize(demo_model().eval(), scheme="int4-group", plugin_options=opts,
                             calibration=data)  # fmt: skip
    bits = sum(la.bits_per_weight * la.numel for la in rep.layers) / sum(
        la.numel for la in rep.layers
    )
    assert bits <= 5.0 + 1e-9
    uniform, _ = engine.quantize(
        demo_model().eval(), scheme="int4-group", scheme_options={"group_size": 32}
    )
    assert sqnr(q) >= sqnr(uniform) - 0.05  # 5.0 bits/weight either way
    plan = engine.plan(demo_model(), scheme="int4-group",
                       plugin_options={"sensitivity": {"budget": 5.0}})  # fmt: skip
    notes = [n for e in plan.selected for n in e.notes if n.startswith("sensitivity: ")]
    assert len(notes) == 25 and "size-weighted weight-noise SQNR" in notes[0]  # no data: weights
    saved = json.loads(rules.read_text())
    assert {r["scheme"] for r in saved} <= {"int8", "int4-group"} and len(saved) == 25
    # the same calibration data: a layer given a +outlier candidate picks its float columns
    # from it (without data the outlier plugin falls back to its weight criterion)
    again, _ = engine.quantize(demo_model().eval(), scheme="int4-group", rules=saved,
                               calibration=data)  # fmt: skip
    for (n1, m1), (n2, m2) in zip(q.named_modules(), again.named_modules(), strict=True):
        if hasattr(m1, "qtensors"):
            assert n1 == n2
            for p, qt in m1.qtensors().items():
                other = m2.qtensor(p).tensors()
                assert qt.tensors().keys() == other.keys(), n1
                assert all(torch.equal(t, other[k]) for k, t in qt.tensors().items()), n1


@pytest.mark.slow  # numeric, seconds: run by .ci/run's slow set
def test_allocation_then_gptq_at_each_allocated_scheme():
    """Allocate first, then GPTQ each layer at its scheme: the same bits per layer as the
    allocation alone, every layer solved by GPTQ, and a better output on other inputs."""
    from monoquant_core.demo import demo_inputs, demo_model

    data = [demo_inputs(seed=s) for s in range(2)]
    test = [demo_inputs(seed=s) for s in range(10, 12)]
    ref = demo_model().eval()
    engine = Engine()

    def run(plugins):
        q, rep = engine.quantize(demo_model().eval(), scheme="int4-group", progress=False,
                                 plugin_options=plugins, calibration=data)  # fmt: skip
        with torch.no_grad():
            r = torch.cat([ref(x).reshape(-1) for x in test]).double()
            g = torch.cat([q(x).reshape(-1) for x in test]).double()
        return rep, 10 * math.log10(float((r**2).sum()) / float(((g - r) ** 2).sum()))

    budget = {"sensitivity": {"budget": 4.5}}
    alone, db_alone = run(budget)
    both, db_both = run({**budget, "gptq": {}})
    per_layer = [(la.name, la.scheme, la.bits_per_weight) for la in alone.layers]
    assert per_layer == [(la.name, la.scheme, la.bits_per_weight) for la in both.layers]
    assert len({b for _, _, b in per_layer}) > 1  # mixed: several group sizes
    numel = sum(la.numel for la in both.layers)
    assert sum(la.bits_per_weight * la.numel for la in both.layers) / numel <= 4.5 + 1e-9
    solved = both.extra["gptq"]["layers"]
    assert len(solved) == 25 and all(v["method"] == "gptq" for v in solved.values())
    assert db_both >= db_alone + 1.0  # measured: 17.7 dB against 15.5 dB


def test_a_one_shot_iterator_is_refused_before_it_is_used_up():
    gen = (torch.randn(4, 64) for _ in range(2))
    with pytest.raises(UsageError, match="one-shot iterator"):
        Engine().quantize(_model(), plugin_options={"sensitivity": {"budget": 6.0}},
                          calibration=gen)  # fmt: skip


def test_options_need_exactly_one_goal():
    with pytest.raises(UsageError, match="exactly one of budget"):
        Engine().configure(plugin_options={"sensitivity": {}})
    with pytest.raises(UsageError, match="not a positive number"):
        Engine().configure(plugin_options={"sensitivity": {"budget": -1}})


def test_the_exact_allocator_finds_what_greedy_misses():
    from monoquant_plugins.sensitivity import allocate

    db = lambda noise: -10 * math.log10(noise)  # noqa: E731
    table = _table(
        {
            "a.weight": {"int4": (4.0, db(1.0)), "int8": (8.0, 60.0)},
            "b.weight": {"int4": (4.0, db(0.5)), "mid": (5.0, db(0.2))},
        }
    )
    greedy = allocate(table, budget=6.0)
    exact = allocate(table, budget=6.0, method="exact")
    assert greedy["choice"] == {"a.weight": "int4", "b.weight": "mid"}  # best ratio first
    assert exact["choice"] == {"a.weight": "int8", "b.weight": "int4"}
    assert exact["estimated_sqnr_db"] > greedy["estimated_sqnr_db"]
    assert exact["bits_per_weight"] <= 6.0
    # a target: the fewest bits whose optimum reaches it
    res = allocate(table, target_sqnr=db(0.6), method="exact")
    assert res["choice"] == {"a.weight": "int8", "b.weight": "int4"}
    with pytest.raises(UsageError, match="out of reach"):
        allocate(table, target_sqnr=70.0, method="exact")
    with pytest.raises(UsageError, match="below the cheapest"):
        allocate(table, budget=3.0, method="exact")


def test_the_html_report_holds_the_json_numbers(cli, tmp_path):
    from monoquant_plugins.sensitivity import allocate, tradeoff

    from tests.core.test_evaluation import _html_values

    torch.manual_seed(2)
    torch.save([torch.randn(8, 64)], tmp_path / "data.pt")
    page = tmp_path / "s.html"
    spec = "tests.plugins.test_sensitivity:_model"
    res = cli("sensitivity", "--model", spec, "--calibration", tmp_path / "data.pt",
              "--candidates", "int8,int4-g32", "--json", "--html", page)  # fmt: skip
    data = json.loads(res.output)
    found = _html_values(page.read_text())
    bars = {d["data-label"]: float(d["data-value"]) for d in found["rect"]}
    assert bars == {
        r["name"]: r["candidates"]["int4-g32"]["output_sqnr_db"] for r in data["layers"]
    }
    points = [(d["data-series"], float(d["data-x"]), float(d["data-y"])) for d in found["circle"]]
    curve = tradeoff(data)
    assert points == [(name, x, y) for name, pts in curve.items() for x, y in pts]
    low = min(x for name, x, _ in points if name.startswith("allocator"))
    assert curve["allocator (greedy)"][0] == pytest.approx(
        (low, allocate(data, budget=low)["estimated_sqnr_db"])
    )
