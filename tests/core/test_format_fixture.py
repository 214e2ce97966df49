"""Files saved before the core redesign load bit-identically (tests/data/format_v1.*)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file

from monoquant_core import Engine, QuantizedModule, load
from monoquant_core.testing import assert_qtensor_equal

_SPEC = importlib.util.spec_from_file_location(
    "format_v1_fixture",
    os.path.join(os.path.dirname(__file__), os.pardir, "data", "format_v1_fixture.py"),
)
fixture = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(fixture)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine()


def _file_qtensors(engine: Engine, path: str = fixture.FILE):
    """``(qtensors, float tensors)`` of a saved file, read as stored."""
    ser = engine.serializers.get("safetensors")
    with ser.open_reader(path) as r:
        return {n: r.qtensor(n) for n in r.qtensor_names()}, {
            n: r.source(n).load() for n in r.tensor_names()
        }


def test_dequantize_gives_the_stored_float_weights_exactly(engine):
    got = load(fixture.FILE, dequantize=True, engine=engine)
    want = load_file(fixture.EXPECTED)
    assert set(got) == set(want) == set(fixture.FixtureNet().state_dict())
    for k, v in want.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


def test_load_into_the_model_keeps_every_stored_bit(engine, tmp_path):
    qfile, plain = _file_qtensors(engine)
    assert {n for n, qt in qfile.items() if qt.extra} == {"e.weight", "f.weight"}
    model = load(fixture.FILE, fixture.FixtureNet(), engine=engine)
    loaded = {
        f"{name}.{p}": qt
        for name, m in model.named_modules()
        if isinstance(m, QuantizedModule)
        for p, qt in m.qtensors().items()
    }
    assert set(loaded) == set(qfile)
    for k, qt in qfile.items():
        assert_qtensor_equal(qt, loaded[k], k)
    state = model.state_dict()
    for k, v in plain.items():
        assert torch.equal(state[k], v), k
    for batch in fixture.inputs():
        with torch.no_grad():
            assert torch.isfinite(model(batch)).all()
    # saved again by this version: the same tensors and quantization records
    again = tmp_path / "again.safetensors"
    engine.save(model, str(again))
    qagain, plain_again = _file_qtensors(engine, str(again))
    assert set(qagain) == set(qfile) and set(plain_again) == set(plain)
    for k, qt in qfile.items():
        assert_qtensor_equal(qt, qagain[k], f"re-saved {k}")


def test_quantizing_again_reproduces_the_weight_only_layers(engine):
    """This version quantizes the same model into the same codes (elementwise schemes exactly;
    int4-group's search up to reduction order on another CPU)."""
    qfile, _ = _file_qtensors(engine)
    model, _ = engine.quantize(
        fixture.FixtureNet(),
        scheme="int8",
        rules=fixture.RULES,
        calibration=fixture.inputs(),
        min_rows=1,
        plugin_options={"outlier": dict(fixture.OUTLIER)},
        progress=False,
    )
    fresh = {
        f"{name}.{p}": qt
        for name, m in model.named_modules()
        if isinstance(m, QuantizedModule)
        for p, qt in m.qtensors().items()
    }
    assert set(fresh) == set(qfile)
    for k in ("a.weight", "b.weight", "conv.weight", "d.weight", "g.weight"):
        assert_qtensor_equal(qfile[k], fresh[k], k)
    for k in ("c.weight", "embed.weight"):
        same = (qfile[k].codes() == fresh[k].codes()).float().mean().item()
        assert same > 0.99, (k, same)
    cols = fresh["e.weight"].extra["float_cols"]
    assert torch.equal(cols, qfile["e.weight"].extra["float_cols"]) and cols.numel() > 0
