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
