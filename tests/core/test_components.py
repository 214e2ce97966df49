"""components.py: what a backend is told about a weight, and quantized modules behaving like
torch modules (state_dict round trip)."""

from __future__ import annotations

import pytest
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


@pytest.mark.parametrize("scheme, options", [("int8", {}), ("int4-group", {"group_size": 32})])
def test_in_place_writes_into_the_buffers_prepare_the_kernel_form_again(scheme, options):
    from monoquant_core import Engine

    def build(seed):
        model, _ = Engine().quantize(
            mlp(dims=(64, 64, 16), seed=seed), scheme=scheme, scheme_options=options
        )
        return model

    model, other = build(0), build(5)
    assert model[0].backend.name == "torch-cpu"  # the backend that packs the weight
    x = torch.randn(3, 64)
    with torch.no_grad():
        before = model(x)
        state = model.state_dict()
        for k, v in other.state_dict().items():
            state[k].copy_(v)  # new codes, scales and biases, written in place
        got = model(x)
        fresh = build(0)
        fresh.load_state_dict(other.state_dict())
        assert not torch.equal(got, before)
        assert torch.equal(got, fresh(x)), "the forward still used the old packed weights"
        model[0].weight_scale.mul_(2)  # one buffer alone
        fresh[0].load_state_dict({"weight_scale": model[0].weight_scale}, strict=False)
        assert torch.equal(model(x), fresh(x))


def test_kernel_form_is_derived_once_while_the_buffers_are_unchanged():
    model = _int8_mlp()
    before = model[0].prepared("weight")
    x = torch.randn(2, 32)
    with torch.no_grad():
        model(x)
        model(x)
    assert model[0].prepared("weight") is before


def test_assigning_a_new_buffer_prepares_the_kernel_form_again():
    model = _int8_mlp()
    x = torch.randn(2, 32)
    with torch.no_grad():
        before = model(x)
        model[0].weight_scale = model[0].weight_scale * 2  # a new tensor, not an in-place write
        after = model(x)
    assert not torch.equal(before, after)
    fresh = _int8_mlp()
    fresh[0].load_state_dict({"weight_scale": model[0].weight_scale}, strict=False)
    with torch.no_grad():
        assert torch.equal(after, fresh(x))
