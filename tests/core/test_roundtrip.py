"""quantize -> save -> load gives bit-identical outputs; dequantize loads with strict=True."""

from __future__ import annotations

import pytest
import torch

import monoquant_core as mq
from monoquant_core.testing import CustomWrapperModel, mlp, transformer_block

MODELS = {
    "mlp": (lambda: mlp(seed=1), lambda: torch.randn(5, 32)),
    "transformer_block": (lambda: transformer_block(seed=2), lambda: torch.randn(2, 7, 64)),
    "custom_wrapper": (lambda: CustomWrapperModel(seed=3), lambda: torch.randn(6, 16)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("opts", [{}, {"granularity": "per-tensor"}, {"symmetric": False}])
def test_save_load_is_bit_identical(tmp_path, engine, name, opts):
    build, inputs = MODELS[name]
    x = inputs()
    model = build()
    with torch.no_grad():
        ref = model(x)
        qmodel, report = engine.quantize(
            model, scheme="int8", scheme_options=opts, backend="reference"
        )
        y = qmodel(x)
    assert report.layers, "nothing was quantized"
    assert mq.sqnr_db(ref, y) > 25.0
    path = tmp_path / f"{name}.safetensors"
    engine.save(qmodel, str(path))
    restored = mq.load(str(path), build(), backend="reference")
    with torch.no_grad():
        y2 = restored(x)
    assert torch.equal(y, y2), f"max diff {(y - y2).abs().max().item()}"

    state = mq.load(str(path), dequantize=True)
    plain = build()
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        y3 = plain(x)
    assert mq.sqnr_db(ref, y3) > 25.0
    assert torch.allclose(y3, y, atol=1e-5)


def test_custom_wrapper_layers_found_by_type_and_own_param_reported(engine):
    model = CustomWrapperModel()
    plan = engine.plan(model)
    selected = {e.name for e in plan.selected}
    assert selected == {"inp", "body.0.value", "body.0.gate", "body.1.value", "body.1.gate", "out"}
    wrapper = plan.get("body.0")
    assert not wrapper.selected and "no replacer for GatedLinear" in wrapper.skip_reason
    assert "normalisation" in plan.get("norm").skip_reason


def test_quantized_model_state_dict_round_trips_through_torch(engine, tmp_path):
    qmodel, _ = engine.quantize(mlp())
    x = torch.randn(3, 32)
    fresh, _ = engine.quantize(mlp(seed=9))
    fresh.load_state_dict(qmodel.state_dict())
    assert torch.equal(fresh(x), qmodel(x))


def test_bare_linear_as_model_is_replaced(engine, tmp_path):
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(2, 8)
    q, _ = engine.quantize(lin)
    assert type(q).__name__ == "QuantizedLinear"
    p = tmp_path / "lin.safetensors"
    mq.save(q, str(p))
    assert torch.equal(mq.load(str(p), torch.nn.Linear(8, 4))(x), q(x))


def test_module_level_quantize_and_decorator():
    x = torch.randn(2, 32)
    ref = mlp()(x)
    q = mq.quantize(mlp(), bits=8)
    assert mq.sqnr_db(ref, q(x)) > 30

    @mq.quantize(bits=8, skip=["0"])
    def build():
        return mlp()

    built = build()
    assert type(built[0]).__name__ == "Linear" and type(built[2]).__name__ == "QuantizedLinear"
    assert build.__name__ == "build"
    with pytest.raises(mq.UsageError, match="bits=3"):
        mq.quantize(mlp(), bits=3)
    with pytest.raises(mq.UsageError, match="not bits=4"):
        mq.quantize(mlp(), bits=4, scheme="int8")


def test_output_dtype_follows_input_dtype(engine):
    q, _ = engine.quantize(mlp())
    x = torch.randn(2, 32)
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert q(x.double()).dtype == torch.float64


def test_report_sizes_and_json(engine):
    model = mlp(dims=(256, 256, 256))
    _, report = engine.quantize(model)
    assert report.compression_ratio > 3.5, report.compression_ratio
    layer = report.layer("0.weight")
    assert layer.bits_per_weight == pytest.approx(8 + 32 / 256)
    assert layer.sqnr_db > 40
    data = report.to_dict()
    assert data["layers"][0]["name"] == "0.weight"
    text = report.render()
    assert "0.weight" in text and "smaller" in text
