"""Replay in the ``sensitivity`` output-error pass: the same numbers as full forward passes,
the module calls before the measured layer really skipped, and every case it must not replay
(stateful modules, outputs modified in place, tied weights) falling back to computing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from monoquant_plugins.sensitivity import measure, parse_candidates
from monoquant_plugins.sensitivity_replay import Replay
from torch import nn

from monoquant_core import Engine
from monoquant_core.demo import demo_inputs, demo_model


class CountingLinear(nn.Linear):
    """A Linear that counts the times its forward really runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs = 0

    def forward(self, x):
        self.runs += 1
        return super().forward(x)


def _batches(n=2, rows=4, width=8):
    torch.manual_seed(5)
    return [((torch.randn(rows, width),), {}) for _ in range(n)]


def _targets(model, names):
    return {n: [model.get_submodule(n).weight] for n in names}


@pytest.mark.slow  # numeric, 7 s of full passes: run by .ci/run's slow set
def test_the_numbers_equal_full_forward_passes_on_a_transformer():
    cands = parse_candidates(["int4-g32"])
    data = [demo_inputs(seed=s)[:, :16] for s in range(2)]
    fast = measure(Engine(), demo_model().eval(), data, cands)
    full = measure(Engine(), demo_model().eval(), data, cands, replay=False)
    assert fast["replay"] == "on" and full["replay"].startswith("off")
    assert len(fast["layers"]) == 25
    assert [r["candidates"] for r in fast["layers"]] == [r["candidates"] for r in full["layers"]]
    assert all(
        math.isfinite(v["output_sqnr_db"]) for r in fast["layers"] for v in r["candidates"].values()
    )


def test_calls_before_the_layer_are_replayed_not_run():
    torch.manual_seed(0)
    model = nn.Sequential(CountingLinear(8, 8), nn.ReLU(), CountingLinear(8, 8), nn.ReLU(),
                          CountingLinear(8, 4)).eval()  # fmt: skip
    batches = _batches()
    runs = Replay(model, batches, _targets(model, ["0", "2", "4"]))
    assert runs.note == "on"
    assert runs.plans[0] == {"0": [], "2": ["0", "1"], "4": ["0", "1", "2", "3"]}
    for target, runs_each in (("0", [2, 2, 2]), ("2", [0, 2, 2]), ("4", [0, 0, 2])):
        weight = model.get_submodule(target).weight
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.mul_(1.5)
            direct = [model(*args).reshape(-1).double() for args, _ in batches]
            for i in (0, 2, 4):
                model[i].runs = 0
            got = runs.outputs(target)
            weight.copy_(saved)
        assert [model[i].runs for i in (0, 2, 4)] == runs_each  # 2 batches each
        for g, d, r in zip(got, direct, runs.reference, strict=True):
            assert torch.equal(g, d) and not torch.equal(g, r)


class Remember(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.seen = None

    def forward(self, x):
        y = self.lin(x)
        self.seen = y.mean()  # state a later module reads: replaying this module is wrong
        return y


class Stateful(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = Remember()
        self.b = nn.Linear(8, 8)
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(self.b(self.a(x)) + self.a.seen)


class InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0, self.lin1, self.lin2 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = self.lin0(x)
        h.relu_()  # lin0's output changes after it returned: it cannot be replayed
        return self.lin2(self.lin1(h))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.mid, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        self.head.weight = self.first.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mid(self.first(x))))


class Unused(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.spare = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return self.lin(x)


@pytest.mark.parametrize("build", [Stateful, InPlace, Tied, Unused])
def test_models_it_must_not_replay_get_full_forward_numbers(build):
    torch.manual_seed(0)
    model = build().eval()
    twin = copy.deepcopy(model)  # tied weights stay tied
    cands = parse_candidates(["int8", "fp16"])
    data = [x for (x,), _ in _batches()]
    fast = measure(Engine(), model, data, cands, only=["*"])
    full = measure(Engine(), twin, data, cands, replay=False, only=["*"])
    assert [r["candidates"] for r in fast["layers"]] == [r["candidates"] for r in full["layers"]]
    if build is Stateful:
        assert fast["replay"].startswith("off (replaying before c changed the float output")
    else:
        assert fast["replay"] == "on"
    if build is Unused:  # a layer the forward never calls costs nothing and changes nothing
        spare = next(r for r in fast["layers"] if r["name"] == "spare.weight")
        assert all(v["output_sqnr_db"] == math.inf for v in spare["candidates"].values())


def test_what_is_replayed_for_in_place_outputs_and_tied_weights():
    torch.manual_seed(0)
    model = InPlace().eval()
    runs = Replay(model, _batches(), _targets(model, ["lin0", "lin1", "lin2"]))
    assert runs.plans[0]["lin2"] == ["lin1"]  # lin0 is modified in place, so it runs again
    model = Tied().eval()
    runs = Replay(model, _batches(), _targets(model, ["first", "mid", "head"]))
    # head's weight is first's: measuring head changes first's output, so nothing is replayed
    assert runs.plans[0] == {"first": [], "mid": ["first"], "head": []}


def test_the_byte_limit_keeps_the_calls_worth_most():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), nn.Linear(8, 4)).eval()
    batches = _batches(1)
    everything = Replay(model, batches, _targets(model, ["0.0", "0.1", "1"]))
    assert everything.plans[0] == {"0.0": [], "0.1": ["0.0"], "1": ["0"]}
    # room for one output of 4x8 float32: the block (2 calls skipped) beats its first layer
    one = Replay(model, batches, _targets(model, ["0.0", "0.1", "1"]), limit_bytes=4 * 8 * 4)
    assert one.plans[0] == {"0.0": [], "0.1": [], "1": ["0"]}
    none = Replay(model, batches, _targets(model, ["0.0", "0.1", "1"]), limit_bytes=0)
    assert none.plans[0] == {"0.0": [], "0.1": [], "1": []} and none.note == "on"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_a_scripted_model_is_measured_with_full_forward_passes():
    """A TorchScript module takes no Python hooks: replay is off, with the reason."""
    torch.manual_seed(0)
    model = torch.jit.script(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval())
    batches = _batches()
    runs = Replay(model, batches, {"2": [dict(model.named_modules())["2"].weight]})
    assert runs.note.startswith("off (0 takes no forward hooks")
    with torch.no_grad():
        want = [model(*args).reshape(-1).double() for args, _ in batches]
        got = runs.outputs("2")
    assert all(torch.equal(r, w) for r, w in zip(runs.reference, want, strict=True))
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
