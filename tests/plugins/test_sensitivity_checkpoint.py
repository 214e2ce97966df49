"""``sensitivity`` in checkpoint mode, data-free: ``monoquant sensitivity CHECKPOINT`` (a
safetensors file or folder) measures the tensors checkpoint mode would select, and the
allocation works from those weight SQNRs when the plan hook can read the tensors
(``run.read_tensor``)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from monoquant_plugins.sensitivity import monoquant_modify_plan
from safetensors import safe_open
from safetensors.torch import save_file

from monoquant_core import Engine, UsageError
from monoquant_core.metrics import sqnr_db
from monoquant_core.rules import load_rules_file
from monoquant_core.tensor_plan import build_tensor_plan
from tests.helpers import write_folder


def _state() -> dict[str, torch.Tensor]:
    """Three projections (one with outlier columns: the one int4 hurts most), biases, a norm."""
    torch.manual_seed(0)
    state = {}
    for i in range(3):
        w = torch.randn(64, 128)
        if i == 1:
            w[:, :4] *= 30
        state[f"layers.{i}.proj.weight"] = w
        state[f"layers.{i}.proj.bias"] = torch.randn(64)
    state["layers.norm.weight"] = torch.ones(128)
    return state


WEIGHTS = ["layers.0.proj.weight", "layers.1.proj.weight", "layers.2.proj.weight"]


def test_the_command_measures_a_checkpoint_without_data(cli, tmp_path):
    state = _state()
    save_file(state, tmp_path / "m.safetensors")
    res = cli("sensitivity", tmp_path / "m.safetensors", "--candidates", "int8,int4-g32",
              "--json")  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["batches"] == 0 and data["candidates"] == ["int8", "int4-g32"]
    assert sorted(r["name"] for r in data["layers"]) == WEIGHTS  # biases and the norm: float
    assert data["layers"][0]["name"] == "layers.1.proj.weight"  # the outliers: most sensitive
    engine = Engine()
    for row in data["layers"]:
        w = state[row["name"]]
        for label, scheme, opts in (("int8", "int8", {}),
                                    ("int4-g32", "int4-group", {"group_size": 32})):  # fmt: skip
            cfg = engine.configure(scheme=scheme, scheme_options=opts)
            qt = engine.quantize_weight(w, scheme, cfg.observer, 0, cfg.scheme_config,
                                        cfg.observer_config, row["name"])  # fmt: skip
            got = row["candidates"][label]
            assert "output_sqnr_db" not in got
            assert got["bits_per_weight"] == pytest.approx(8 * qt.nbytes / w.numel())
            want = sqnr_db(w, engine.schemes.get(scheme).dequantize(qt))
            assert got["weight_sqnr_db"] == pytest.approx(want)
    # a sharded folder gives the same table; --only narrows it; the text table says no data
    write_folder(tmp_path / "src", state, n_shards=2, extra_files=False)
    again = json.loads(cli("sensitivity", tmp_path / "src", "--candidates", "int8,int4-g32",
                           "--json").output)  # fmt: skip
    assert again["layers"] == data["layers"]
    one = cli("sensitivity", tmp_path / "src", "--only", "layers.2.*", "--candidates", "int8")
    assert one.exit_code == 0 and "layers.2.proj.weight" in one.output
    assert "layers.0.proj" not in one.output and "no data: weight SQNR only" in one.output


def test_a_checkpoint_and_a_model_together_are_refused(cli, tmp_path):
    save_file(_state(), tmp_path / "m.safetensors")
    res = cli("sensitivity", tmp_path / "m.safetensors", "--demo")
    assert res.exit_code != 0 and "both a CHECKPOINT" in res.output


def _allocate(state, budget):
    """The plan hook of checkpoint mode with the tensors readable, as the core runs it."""
    engine = Engine()
    opts = {"sensitivity": {"budget": budget, "candidates": "int8,int4-g32,int4-g64,int4-g128"}}
    config = engine.configure(scheme="int4-group", plugin_options=opts)
    with engine.run(config) as run:
        run.read_tensor = state.__getitem__
        plan = build_tensor_plan(run, [(n, tuple(t.shape), t.dtype) for n, t in state.items()])
        monoquant_modify_plan(plan, None, run)
        return plan, run.state["sensitivity"]


def test_data_free_allocation_beats_the_uniform_scheme_of_the_same_size():
    state = _state()
    plan, got = _allocate(state, 4.5)
    engine = Engine()

    def noise(scheme, opts, name):  # the weight's relative noise power, as the allocator adds
        cfg = engine.configure(scheme=scheme, scheme_options=opts)
        qt = engine.quantize_weight(state[name], scheme, cfg.observer, 0, cfg.scheme_config,
                                    cfg.observer_config, name)  # fmt: skip
        db = sqnr_db(state[name], engine.schemes.get(scheme).dequantize(qt))
        return 10 ** (-db / 10), 8 * qt.nbytes

    chosen = [noise(e.scheme, e.options["scheme_options"], e.name) for e in plan.selected]
    uniform = [noise("int4-group", {"group_size": 64}, n) for n in WEIGHTS]
    numel = sum(state[n].numel() for n in WEIGHTS)
    assert sorted(e.name for e in plan.selected) == WEIGHTS
    assert sum(b for _, b in chosen) / numel <= 4.5 + 1e-9
    assert sum(b for _, b in uniform) / numel == pytest.approx(4.5)
    assert sum(n for n, _ in chosen) < 0.9 * sum(n for n, _ in uniform)
    assert got["allocation"]["estimated_sqnr_db"] == pytest.approx(  # each weight's share
        -10 * math.log10(sum(n for n, _ in chosen) / len(WEIGHTS))  # (equal sizes here)
    )
    outlier = next(e for e in plan.selected if e.name == "layers.1.proj.weight")
    bits = {e.name: b for e, (_, b) in zip(plan.selected, chosen, strict=True)}
    assert bits[outlier.name] > max(b for n, b in bits.items() if n != outlier.name)
    assert any("weight SQNR" in n for n in outlier.notes)
    assert {r["pattern"] for r in got["rules"]} == set(WEIGHTS)


def test_without_a_model_or_tensors_the_allocation_is_refused():
    engine = Engine()
    config = engine.configure(plugin_options={"sensitivity": {"budget": 6}})
    with engine.run(config) as run:
        plan = build_tensor_plan(run, [("a.weight", (8, 32), torch.float32)])
        with pytest.raises(UsageError, match="needs the model or the checkpoint's tensors"):
            monoquant_modify_plan(plan, None, run)


def test_quantize_checkpoint_allocates_data_free_under_the_budget(tmp_path):
    """``quantize SOURCE --sensitivity-budget``: the outlier tensor gets the most bits, the
    average stays within the budget, and the saved rules repeat the run to the same codes."""
    state = _state()
    src = tmp_path / "m.safetensors"
    save_file(state, str(src))
    rules = tmp_path / "rules.json"
    opts = {"sensitivity": {"budget": 4.5, "save_rules": str(rules)}}
    report = Engine().quantize_checkpoint(
        str(src), str(tmp_path / "a.safetensors"), plugin_options=opts, progress=False
    )
    layers = {layer.name: layer for layer in report.layers}
    assert sorted(layers) == WEIGHTS
    numel = sum(state[n].numel() for n in WEIGHTS)
    assert sum(layers[n].bytes_after * 8 for n in WEIGHTS) / numel <= 4.5 + 1e-9
    outlier = layers["layers.1.proj.weight"]
    assert outlier.bits_per_weight > max(layers[n].bits_per_weight for n in WEIGHTS[::2])
    Engine().quantize_checkpoint(
        str(src),
        str(tmp_path / "b.safetensors"),
        rules=load_rules_file(str(rules)),
        progress=False,
    )
    with (
        safe_open(str(tmp_path / "a.safetensors"), "pt") as a,
        safe_open(str(tmp_path / "b.safetensors"), "pt") as b,
    ):
        keys = sorted(a.keys())
        assert keys == sorted(b.keys())
        for k in keys:
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
