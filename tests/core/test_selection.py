"""selection.py: the module-mode plan (every parameter owner listed, every skip with a reason,
--only / --skip globs, custom modules found by type) and its validation."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from monoquant_core import CapabilityError, Engine, UsageError
from monoquant_core.demo import demo_model
from monoquant_core.selection import channel_first
from monoquant_core.testing import CustomWrapperModel, mlp, transformer_block


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
    assert [e.name for e in plan.selected] == [
        *(f"attn.{p}_proj" for p in "qkvo"),
        "mlp.fc1",
        "mlp.fc2",
    ]
    assert {e.name for e in plan.skipped} == {"ln1", "ln2"}
    assert all(e.skip_reason.startswith("normalisation") for e in plan.skipped)


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


def test_custom_wrapper_layers_found_by_type_and_own_param_reported(engine):
    model = CustomWrapperModel()
    plan = engine.plan(model)
    selected = {e.name for e in plan.selected}
    assert selected == {"inp", "body.0.value", "body.0.gate", "body.1.value", "body.1.gate", "out"}
    wrapper = plan.get("body.0")
    assert not wrapper.selected and "no replacer for GatedLinear" in wrapper.skip_reason
    assert "normalisation" in plan.get("norm").skip_reason


# --------------------------------------------------------------------------- expected speed


def _speed_notes(plan):
    return [n for n in plan.get("0").notes if n.startswith("warning:")]


def test_the_plan_warns_where_a_layer_is_expected_slower_than_float():
    torch.manual_seed(0)
    engine = Engine()
    # K = 1088 (17 groups of 64): a shape torch-cpu's own bf16 GEMM does not take, so its
    # many-row path converts the weight first, slower than the bf16 layer on every CPU
    bf16 = nn.Sequential(nn.Linear(1088, 1024)).to(torch.bfloat16)
    opts = {"group_size": 64}
    plan = engine.plan(bf16, scheme="int4-group", scheme_options=opts, expect_batch=[1, 64])
    (note,) = _speed_notes(plan)
    assert "expected slower than a bfloat16 nn.Linear at M=64" in note
    fp32 = nn.Sequential(nn.Linear(1024, 1024))
    assert _speed_notes(engine.plan(fp32, scheme="int4-group", expect_batch=[1, 64])) == []
    slow = engine.plan(fp32, scheme="int8", backend="reference")  # default rows: 1 and 128
    assert [n.split(" at ")[1].split(" ")[0] for n in _speed_notes(slow)] == ["M=1", "M=128"]
    with pytest.raises(UsageError, match="expect_batch 0 is not a positive number"):
        engine.configure(expect_batch=[0])
    cfg = engine.configure(expect_batch=64)
    assert cfg.expect_batch == (64,) and cfg.to_dict()["expect_batch"] == [64]


def test_the_scheme_check_sees_the_channel_axis_first():
    assert channel_first((64, 256), 1) == (256, 64)  # GPT-2 Conv1D [in, out] -> [out, in]
    assert channel_first((8, 4, 3, 3), 0) == (8, 4, 3, 3)
    assert channel_first((2, 8, 5), -2) == (8, 2, 5)
    assert channel_first((), 0) == ()
