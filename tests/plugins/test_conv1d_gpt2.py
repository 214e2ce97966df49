"""gpt2-conv1d replacer: HF ``Conv1D`` found by qualified name, quantized per output channel.

``transformers`` is not needed: ``tests.helpers.Conv1D``, whose ``__module__`` is the real one,
stands in for it (same weight layout ``[in, out]`` and the same ``addmm`` forward).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monoquant_core as mq
from tests.helpers import Conv1D


class OldConv1D(Conv1D):
    """The class as older transformers named it (``transformers.modeling_utils``)."""

    __module__ = "transformers.modeling_utils"
    __qualname__ = "Conv1D"


class GPT2MLP(nn.Module):
    def __init__(self, seed: int = 0, dim: int = 64, conv: type = Conv1D):
        super().__init__()
        torch.manual_seed(seed)
        self.c_fc = conv(4 * dim, dim)
        self.c_proj = conv(dim, 4 * dim)
        with torch.no_grad():
            self.c_fc.bias.normal_(std=0.02)
            # output channels of very different magnitude: only per-output scales cope
            self.c_fc.weight.mul_(torch.logspace(-1.5, 0.5, 4 * dim))
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(torch.nn.functional.gelu(self.c_fc(x)))


def test_found_by_qualified_name_without_transformers(engine):
    reg = engine.replacers.for_type(Conv1D)
    assert reg is not None and reg.name == "gpt2-conv1d"
    assert engine.replacers.for_type(OldConv1D).name == "gpt2-conv1d"

    class Derived(Conv1D):
        __module__ = __name__

    assert engine.replacers.for_type(Derived).name == "gpt2-conv1d"
    plan = engine.plan(GPT2MLP())
    assert {e.name for e in plan.selected} == {"c_fc", "c_proj"}
    assert plan.get("c_fc").replacer == "gpt2-conv1d"


@pytest.mark.parametrize("conv", [Conv1D, OldConv1D])
def test_int8_per_output_channel(engine, conv):
    model = GPT2MLP(conv=conv)
    w = model.c_fc.weight.detach().clone()
    qmodel, report = engine.quantize(model, scheme="int8")
    q = qmodel.c_fc
    assert type(q).__name__ == "QuantizedGPT2Conv1D" and (q.nf, q.nx) == (256, 64)
    qt = q.qtensor("weight")
    assert qt.shape == (64, 256) and qt.axis == 1
    assert qt.scale.shape == (256, 1) and qt.qdata.shape == (256, 64)
    expected = w.abs().amax(dim=0) / 127
    assert torch.allclose(qt.scale.squeeze(1), expected), "scales are not per output column"
    deq = q.scheme.dequantize(qt)
    assert deq.shape == w.shape
    db = mq.sqnr_db(w, deq)
    assert db > 40.0, f"Conv1D int8 weight SQNR {db:.2f} dB"
    assert report.layer("c_fc.weight").sqnr_db == pytest.approx(db)


def test_forward_matches_addmm_with_dequantized_weight(engine):
    model = GPT2MLP()
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = model(x)
    ref_fc = GPT2MLP().c_fc
    qmodel, _ = engine.quantize(model, scheme="int8")
    q = qmodel.c_fc
    with torch.no_grad():
        deq = q.scheme.dequantize(q.qtensor("weight"))
        ref_fc.weight.copy_(deq)
        assert torch.equal(q(x), ref_fc(x))
        y = qmodel(x)
    assert y.shape == (2, 5, 64) and y.dtype == torch.float32
    db = mq.sqnr_db(ref, y)
    assert db > 35.0, f"GPT-2 MLP int8 output SQNR {db:.2f} dB"
    assert qmodel(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert "nf=256, nx=64" in repr(q) and "scheme=int8" in repr(q)


def test_int4_groups_run_along_the_inputs(engine):
    model = GPT2MLP()
    qmodel, report = engine.quantize(model, scheme="int4-group", scheme_options={"group_size": 32})
    qt = qmodel.c_proj.qtensor("weight")
    assert qt.shape == (256, 64) and qt.scale.shape == (64, 8) and qt.qdata.shape == (64, 128)
    db = report.layer("c_proj.weight").sqnr_db
    assert db > 18.0, f"Conv1D int4-g32 weight SQNR {db:.2f} dB"


def test_save_load_bit_identical(tmp_path, engine):
    x = torch.randn(3, 7, 64)
    qmodel, _ = engine.quantize(GPT2MLP(seed=3), scheme="int8")
    with torch.no_grad():
        y = qmodel(x)
    path = tmp_path / "gpt2.safetensors"
    mq.save(qmodel, str(path))
    restored = mq.load(str(path), GPT2MLP(seed=11))
    assert type(restored.c_proj).__name__ == "QuantizedGPT2Conv1D"
    with torch.no_grad():
        y2 = restored(x)
    assert torch.equal(y, y2), f"max diff {(y - y2).abs().max().item()}"
    plain = GPT2MLP(seed=11)
    plain.load_state_dict(mq.load(str(path), dequantize=True), strict=True)
    with torch.no_grad():
        y3 = plain(x)
    assert torch.allclose(y3, y, atol=1e-5), f"max diff {(y3 - y).abs().max().item()}"


def test_the_short_row_rule_reads_the_inputs_of_the_stored_in_out_weight(engine):
    """c_fc stores [64 inputs, 256 outputs]: at group_size 128 its 64-input rows cost 8.5
    bits per weight, so it stays in float like a Linear(64, 256); c_proj [256, 64] has rows of
    256 inputs and is quantized (the rule used to read the stored shape the wrong way round)."""
    model = GPT2MLP()
    linear = nn.Sequential(nn.Linear(64, 256))
    plan = engine.plan(model, scheme="int4-group")
    reason = plan.get("c_fc").skip_reason
    assert reason and "only 64 inputs per row" in reason, reason
    assert reason == engine.plan(linear, scheme="int4-group").get("0").skip_reason
    assert plan.get("c_proj").selected, plan.get("c_proj").skip_reason
    _, report = engine.quantize(model, scheme="int4-group")
    assert [layer.name for layer in report.layers] == ["c_proj.weight"]
    assert report.layers[0].bits_per_weight == pytest.approx(4.25)
