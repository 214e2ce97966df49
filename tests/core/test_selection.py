"""Layer selection: every skip has a reason; --only/--skip globs; backends chosen as data."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from monoquant_core import Backend, Capabilities, CapabilityError, Engine, UsageError, hookimpl
from monoquant_core.demo import demo_model
from monoquant_core.testing import mlp, transformer_block


def test_default_plan_lists_every_parameter_owner_with_a_reason(engine):
    plan = engine.plan(demo_model())
    names = {e.name for e in plan}
    owners = {n.rpartition(".")[0] for n, _ in demo_model().named_parameters()}
    assert owners <= names
    for e in plan.skipped:
        assert e.skip_reason, e.name
    assert "opt-in" in plan.get("embed").skip_reason or "embedding" in plan.get("embed").skip_reason
    assert plan.get("blocks.0.ln1").skip_reason.startswith("normalisation")
    assert plan.get("lm_head").selected
    json.dumps(plan.to_dict())
    assert "keep float" in plan.render() and "lm_head" in plan.render()


def test_only_and_skip_globs_match_across_dots(engine):
    plan = engine.plan(demo_model(), only=["*.mlp.*"], skip=["blocks.3.*"])
    sel = {e.name for e in plan.selected}
    assert sel == {f"blocks.{i}.mlp.{f}" for i in range(3) for f in ("fc1", "fc2")}
    assert plan.get("blocks.3.mlp.fc1").skip_reason == "matched skip pattern 'blocks.3.*'"
    assert plan.get("blocks.0.attn.q_proj").skip_reason == "not matched by any only pattern"


def test_only_with_unsupported_type_is_a_capability_error(engine):
    with pytest.raises(CapabilityError) as e:
        engine.plan(transformer_block(), only=["ln*"])
    msg = str(e.value)
    assert "'ln1' (LayerNorm)" in msg and "no installed replacer supports LayerNorm" in msg
    assert "fix:" in msg


def test_only_matching_nothing_is_a_usage_error(engine):
    with pytest.raises(UsageError, match="--only 'nope' matches no module"):
        engine.plan(mlp(), only=["nope"])


def test_only_star_does_not_error_on_norms(engine):
    plan = engine.plan(transformer_block(), only=["*"])
    assert len(plan.selected) == 6


def test_multihead_attention_out_proj_is_skipped_with_reason(engine):
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
            self.fc = nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(self.mha(x, x, x)[0])

    model = M().eval()
    x = torch.randn(2, 5, 32)
    ref = model(x)
    qmodel, report = engine.quantize(model)
    assert [layer.name for layer in report.layers] == ["fc.weight"]
    reasons = dict(report.skipped)
    assert "reads the weight tensor directly" in reasons["mha.out_proj"]
    assert "no replacer for MultiheadAttention" in reasons["mha"]
    assert torch.allclose(qmodel(x), ref, atol=0.05)


def test_tied_weights_are_not_untied(engine):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(50, 16)
            self.head = nn.Linear(16, 50, bias=False)
            self.head.weight = self.emb.weight

    plan = engine.plan(Tied())
    assert (
        plan.get("head").skip_reason
        == "weight is tied to 'emb.weight'; quantizing would untie them"
    )


def test_meta_device_weights_are_skipped(engine):
    with torch.device("meta"):
        model = mlp()
    plan = engine.plan(model)
    assert all("meta device" in e.skip_reason for e in plan)


class FakeGpuBackend(Backend):
    name = "fake-gpu"
    device_types = ("cpu",)
    priority = 10

    def available(self):
        return "no CUDA device found"

    def linear(self, x, prepared, bias):  # pragma: no cover - never selected
        raise AssertionError("unavailable backend was used")


class PickyBackend(Backend):
    name = "picky"
    priority = 20

    def supports(self, info):
        return None if info.shape[0] % 16 == 0 else "N % 16 != 0"

    def linear(self, x, prepared, bias):
        qt, scheme = prepared
        return nn.functional.linear(x, scheme.dequantize(qt).to(x.dtype), bias)


class RaisingBackend(FakeGpuBackend):
    name = "raising"

    def available(self):
        raise OSError("driver exploded")


class Backends:
    @hookimpl
    def monoquant_register_backends(self, register):
        register(FakeGpuBackend())
        register(PickyBackend())
        register(RaisingBackend())


def test_backend_choice_is_data_with_reasons():
    engine = Engine(plugins=[Backends()], disable=["torch-cpu"])
    plan = engine.plan(mlp(dims=(32, 64, 10)))
    first, last = plan.get("0"), plan.get("2")
    assert first.backend == "picky"
    assert last.backend == "reference"
    assert last.notes[0] == "picky: N % 16 != 0"  # highest priority first
    assert last.notes[-1].endswith(", using reference")
    assert any("fake-gpu: no CUDA device found" in n for n in last.notes)
    assert any("raising: available() raised OSError: driver exploded" in n for n in last.notes)
    model, _ = engine.quantize(mlp(dims=(32, 64, 10)))
    assert model[0].backend.name == "picky" and model[2].backend.name == "reference"


class Int4OnlyBackend(PickyBackend):
    name = "int4-only"
    priority = 30
    capabilities = Capabilities(schemes=("int4-group",), activations=("dynamic",))

    def available(self):
        return "needs a special CPU"


def test_backends_not_meant_for_a_weight_are_passed_over_silently():
    class Plugin:
        @hookimpl
        def monoquant_register_backends(self, register):
            register(Int4OnlyBackend())

    engine = Engine(plugins=[Plugin()])
    int8 = engine.plan(mlp(dims=(256, 64, 10)), scheme="int8").get("0")
    assert not any("int4-only" in n for n in int8.notes), int8.notes  # not meant for int8
    weight_only = engine.plan(mlp(dims=(256, 64, 10)), scheme="int4-group").get("0")
    assert not any("int4-only" in n for n in weight_only.notes)  # nor for weight-only int4
    w4a8 = engine.plan(
        mlp(dims=(256, 64, 10)), scheme="int4-group", scheme_options={"activations": "dynamic"}
    ).get("0")
    assert w4a8.notes[0].startswith("int4-only: needs a special CPU, using "), w4a8.notes
    assert Int4OnlyBackend.capabilities.to_dict()["schemes"] == ["int4-group"]


def test_forced_backend_errors_name_what_is_missing():
    engine = Engine(plugins=[Backends()], disable=["torch-cpu", "cpu-vnni"])
    with pytest.raises(CapabilityError, match="'fake-gpu' is not available here: no CUDA device"):
        engine.configure(backend="fake-gpu")
    with pytest.raises(UsageError, match=r"unknown backend 'tpu' \(available: fake-gpu, picky"):
        engine.configure(backend="tpu")
    with pytest.raises(CapabilityError, match="'picky' cannot run this weight: N % 16 != 0"):
        engine.plan(mlp(dims=(32, 64, 10)), backend="picky")
    plan = engine.plan(mlp(dims=(32, 64, 10)), backend="reference")
    assert {e.backend for e in plan.selected} == {"reference"}


def test_unknown_names_list_the_available_ones(engine):
    with pytest.raises(UsageError) as e:
        engine.quantize(mlp(), scheme="int3")
    assert "unknown scheme 'int3' (available: " in str(e.value)
    assert "int8" in str(e.value)
    with pytest.raises(UsageError, match=r"unknown observer 'hist' \(available: histogram, minmax"):
        engine.quantize(mlp(), observer="hist")
    with pytest.raises(UsageError, match="unknown option 'bits' for scheme 'int8'"):
        engine.quantize(mlp(), scheme_options={"bits": 4})
