"""fp16 / bf16 schemes: exact casts in the canonical 16-bit layout, overflow refused."""

from __future__ import annotations

import pytest
import torch

import monoquant_core as mq
from monoquant_core import UsageError
from monoquant_core.testing import mlp
from tests.helpers import quantize_tensor

TARGETS = {"fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.mark.parametrize("scheme", sorted(TARGETS))
@pytest.mark.parametrize("observer", ["minmax", "histogram"])
def test_round_trip_is_the_exact_cast(engine, scheme, observer):
    w = torch.randn(48, 80) * 3.0
    qt = quantize_tensor(engine, w, scheme, observer)[0]
    want = w.to(TARGETS[scheme]).to(torch.float32)
    deq = qt.dequantize()
    assert deq.dtype == torch.float32
    assert torch.equal(deq, want), f"max diff {(deq - want).abs().max().item()}"


@pytest.mark.parametrize("scheme", sorted(TARGETS))
def test_canonical_layout_and_bits_per_weight(engine, scheme):
    w = torch.randn(32, 3, 5)
    qt = quantize_tensor(engine, w, scheme)[0]
    assert qt.bits == 16 and qt.axis is None and qt.group_size is None
    assert qt.qdata.dtype == TARGETS[scheme] and qt.qdata.shape == (1, w.numel())
    assert torch.equal(qt.scale, torch.ones(1, 1)) and qt.scale.dtype == torch.float32
    assert qt.zero_point is None and qt.shape == (32, 3, 5)
    bpw = qt.bits_per_weight
    assert bpw == pytest.approx(16 + 32 / w.numel()), f"bits per weight {bpw}"
    assert 16.0 <= bpw < 16.1, f"bits per weight {bpw}"


def test_half_precision_weight_round_trips_bit_exactly(engine):
    w = torch.randn(16, 16).to(torch.float16)
    deq = quantize_tensor(engine, w, "fp16")[0].dequantize()
    assert deq.dtype == torch.float16 and torch.equal(deq, w)


@pytest.mark.parametrize("scheme", sorted(TARGETS))
def test_mlp_save_load_bit_identical(tmp_path, engine, scheme):
    x = torch.randn(5, 32)
    model = mlp(seed=4)
    with torch.no_grad():
        ref = model(x)
        qmodel, report = engine.quantize(model, scheme=scheme)
        y = qmodel(x)
    assert [layer.name for layer in report.layers] == ["0.weight", "2.weight", "4.weight"]
    db = mq.sqnr_db(ref, y)
    floor = 60.0 if scheme == "fp16" else 40.0
    assert db > floor, f"{scheme} MLP output SQNR {db:.2f} dB"
    path = tmp_path / f"mlp-{scheme}.safetensors"
    mq.save(qmodel, str(path))
    restored = mq.load(str(path), mlp(seed=4))
    with torch.no_grad():
        y2 = restored(x)
    assert torch.equal(y, y2), f"max diff {(y - y2).abs().max().item()}"
    state = mq.load(str(path), dequantize=True)
    plain = mlp(seed=99)
    plain.load_state_dict(state, strict=True)
    for name, qt in restored[0].qtensors().items():
        assert qt.qdata.dtype == TARGETS[scheme], name
    want = mlp(seed=4)[0].weight.to(TARGETS[scheme]).float()
    assert torch.equal(plain[0].weight, want)


def test_fp16_overflow_is_refused_with_bf16_as_the_fix(engine):
    w = torch.randn(4, 4)
    w[2, 3] = 70000.0
    with pytest.raises(UsageError) as e:
        quantize_tensor(engine, w, "fp16")[0]
    msg = str(e.value)
    assert "values exceed float16 range" in msg and "use --scheme bf16" in msg, msg
    qt = quantize_tensor(engine, w, "bf16")[0]
    assert torch.isfinite(qt.dequantize()).all()
    assert qt.dequantize()[2, 3].item() == 70144.0  # nearest bfloat16


def test_fp16_largest_finite_value_is_kept(engine):
    w = torch.tensor([[65504.0, -65504.0, 1.0]])
    deq = quantize_tensor(engine, w, "fp16")[0].dequantize()
    assert torch.equal(deq, w), deq


def test_fp16_overflow_leaves_the_model_untouched(engine):
    model = mlp(seed=1)
    with torch.no_grad():
        model[2].weight[0, 0] = -1e6
    with pytest.raises(UsageError, match="float16 range"):
        engine.quantize(model, scheme="fp16")
    assert all(type(m).__name__ != "QuantizedLinear" for m in model.modules())


def test_no_options_and_quantize_bits_16(engine):
    with pytest.raises(UsageError, match=r"valid keys: \(none\)"):
        engine.configure(scheme="fp16", scheme_options={"granularity": "per-channel"})
    q = mq.quantize(mlp(), bits=16, engine=engine)
    assert q[0].qtensor().scheme == "fp16"
