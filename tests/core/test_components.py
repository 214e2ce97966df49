"""components.py: what a backend is told about a weight, and quantized modules behaving like
torch modules (state_dict round trip)."""

from __future__ import annotations

import torch

from monoquant_core.components import WeightInfo
from monoquant_core.testing import mlp


def test_quantized_model_state_dict_round_trips_through_torch(engine, tmp_path):
    qmodel, _ = engine.quantize(mlp())
    x = torch.randn(3, 32)
    fresh, _ = engine.quantize(mlp(seed=9))
    fresh.load_state_dict(qmodel.state_dict())
    assert torch.equal(fresh(x), qmodel(x))


def test_weight_info_of_a_qtensor(engine):
    cfg = engine.scheme_config("int8", {"activations": "dynamic"})
    qt = engine.quantize_weight(torch.randn(16, 8), "int8", "minmax", scheme_config=cfg)
    info = WeightInfo.of(qt, "cuda")
    assert (info.scheme, info.shape, info.dtype, info.device, info.activations) == (
        "int8",
        (16, 8),
        torch.float32,
        "cuda",
        "dynamic",
    )
    assert info.spec == qt.spec and info.spec.granularity == "per-channel"


# --------------------------------------------------------------------------- prepared layouts


def _int8_mlp():
    from monoquant_core import Engine
    from monoquant_core.testing import mlp

    model, _ = Engine().quantize(mlp(), scheme="int8")
    return model


def test_kernel_layouts_are_prepared_when_built_not_at_the_first_forward():
    model = _int8_mlp()
    assert all("weight" in m._prepared for m in model if hasattr(m, "_prepared"))


def test_dtype_casts_move_but_never_cast_quantization_buffers():
    model = _int8_mlp()
    scale = model[0].weight_scale.clone()
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = model(x)
        model.to(torch.bfloat16)
        assert model[0].weight_scale.dtype == torch.float32  # part of the format
        assert torch.equal(model[0].weight_scale, scale)
        assert model[0].bias.dtype == torch.bfloat16  # an ordinary float parameter is cast
        got = model(x.to(torch.bfloat16))
        assert got.dtype == torch.bfloat16 and "weight" in model[0]._prepared
        model.half().float()
        assert torch.equal(model[0].weight_scale, scale)
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


def test_kernel_layouts_are_never_pickled_and_rebuilt_after_unpickling():
    import copy
    import io

    model = _int8_mlp()
    clone = copy.deepcopy(model)
    assert clone[0]._prepared == {}
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded[0]._prepared == {}
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(clone(x), model(x))


def test_loading_new_codes_prepares_again_and_loading_only_floats_does_not():
    model = _int8_mlp()
    before = model[0]._prepared["weight"]
    model.load_state_dict({"0.bias": torch.zeros(64)}, strict=False)
    assert model[0]._prepared["weight"] is before  # only the bias changed
    other = _int8_mlp()
    other[0].weight_qdata.mul_(-1)
    model.load_state_dict(other.state_dict())
    assert model[0]._prepared["weight"] is not before
    x = torch.randn(2, 32)
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
