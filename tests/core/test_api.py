"""api.py: ``quantize`` (also as a decorator of a model factory), ``save`` and ``load``."""

from __future__ import annotations

import pytest
import torch

import monoquant_core as mq
from monoquant_core.testing import mlp
from tests.helpers import quantized_names


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


@pytest.mark.parametrize("bits, scheme", [(None, "int8"), (8, "int8"), (4, "int4-group")])
def test_bits_choose_the_scheme(engine, bits, scheme):
    q = mq.quantize(mlp(dims=(256, 128, 64)), bits=bits, engine=engine)
    assert quantized_names(q) == {"0", "2"}
    assert {q[0].qtensor().scheme, q[2].qtensor().scheme} == {scheme}


def test_bits_and_scheme_may_both_be_given_when_they_agree(engine):
    q = mq.quantize(mlp(dims=(256, 64)), bits=4, scheme="int4-group", engine=engine)
    assert q[0].qtensor().bits == 4
    with pytest.raises(mq.UsageError) as e:
        mq.quantize(mlp(), bits=8, scheme="fp16", engine=engine)
    assert "scheme 'fp16' produces 16-bit codes, not bits=8" in str(e.value)
    assert "pass either bits or scheme, not both" in str(e.value)


def test_bare_decorator_and_a_factory_with_arguments(engine):
    @mq.quantize
    def build(seed):
        return mlp(seed=seed)

    a, b = build(1), build(1)
    assert quantized_names(a) == {"0", "2", "4"}
    assert torch.equal(a[0].qtensor().qdata, b[0].qtensor().qdata)
    assert not torch.equal(a[0].qtensor().qdata, build(2)[0].qtensor().qdata)


def test_a_factory_that_returns_no_model_and_a_non_model_are_usage_errors():
    @mq.quantize(bits=8)
    def broken():
        return {"not": "a model"}

    with pytest.raises(mq.UsageError, match="broken returned a dict, not an nn.Module"):
        broken()
    with pytest.raises(mq.UsageError, match="quantize\\(\\) got a str, not an nn.Module"):
        mq.quantize("model.pt")


def test_save_and_load_with_an_engine_and_dequantize(engine, tmp_path):
    q = mq.quantize(mlp(), engine=engine, skip=["4"])
    path = tmp_path / "m.safetensors"
    mq.save(q, str(path), engine=engine)
    x = torch.randn(3, 32)
    back = mq.load(str(path), mlp(seed=9), engine=engine)
    assert quantized_names(back) == {"0", "2"} and torch.equal(back(x), q(x))
    state = mq.load(str(path), dequantize=True)
    assert set(state) == set(mlp().state_dict())
    torch.testing.assert_close(state["4.weight"], mlp()[4].weight.detach())  # kept float
    with pytest.raises(mq.UsageError, match="already exists"):
        mq.save(q, str(path), overwrite=False)
