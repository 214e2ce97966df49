"""int4-group: accuracy in dB against round-to-nearest, layout, options, errors."""

from __future__ import annotations

import pytest
import torch

from monoquant_core import CapabilityError, Engine, UsageError
from monoquant_core.testing import mlp
from tests.helpers import assert_extremes_survive, extreme_weight, quantize_tensor


@pytest.fixture(scope="module")
def heavy():
    torch.manual_seed(0)
    return torch.distributions.StudentT(4.0).sample((1024, 1024)) * 0.02


@pytest.fixture(scope="module")
def gauss():
    return torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1)) * 0.02


def test_rtn_minmax_on_gaussian_at_least_19_5_db(engine, gauss):
    _, db = quantize_tensor(engine, gauss, "int4-group", method="rtn")
    assert db >= 19.5, f"int4 g128 minmax RTN on Gaussian weights: {db:.2f} dB"


@pytest.mark.parametrize("gs, int_gain, float_gain", [(128, 0.6, 0.6), (32, 1.0, 0.85)])
def test_default_optimiser_gains_over_round_to_nearest(engine, heavy, gs, int_gain, float_gain):
    _, rtn_int = quantize_tensor(
        engine, heavy, "int4-group", group_size=gs, method="rtn", zero="int"
    )
    _, rtn_float = quantize_tensor(engine, heavy, "int4-group", group_size=gs, method="rtn")
    _, lsq = quantize_tensor(engine, heavy, "int4-group", group_size=gs)
    assert lsq - rtn_int >= int_gain, f"g{gs}: lsq {lsq:.2f} dB vs int-zero RTN {rtn_int:.2f} dB"
    assert lsq - rtn_float >= float_gain, (
        f"g{gs}: lsq {lsq:.2f} dB vs float-zero RTN {rtn_float:.2f} dB"
    )


def test_hqq_and_symmetric_lsq_improve_on_their_rtn(engine, heavy):
    _, rtn = quantize_tensor(engine, heavy, "int4-group", method="rtn")
    _, h = quantize_tensor(engine, heavy, "int4-group", method="hqq")
    assert h > rtn + 0.1, f"hqq {h:.2f} dB vs rtn {rtn:.2f} dB"
    _, srtn = quantize_tensor(engine, heavy, "int4-group", symmetric=True, method="rtn")
    _, slsq = quantize_tensor(engine, heavy, "int4-group", symmetric=True)
    assert slsq > srtn + 0.3, f"symmetric lsq {slsq:.2f} dB vs symmetric rtn {srtn:.2f} dB"


def test_smaller_groups_are_monotonically_better(engine, heavy):
    dbs = [
        quantize_tensor(engine, heavy, "int4-group", group_size=g)[1] for g in (32, 64, 128, 256)
    ]
    assert dbs == sorted(dbs, reverse=True), f"SQNR by group size 32/64/128/256: {dbs}"


@pytest.mark.parametrize("gs", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_packed_size_matches_theoretical_bits(engine, gs, symmetric):
    w = torch.randn(256, 1024)
    qt, _ = quantize_tensor(engine, w, "int4-group", group_size=gs, symmetric=symmetric)
    params = 1 if symmetric else 2
    theory = 4 + params * 16 / gs
    assert abs(qt.bits_per_weight - theory) / theory < 0.01, (qt.bits_per_weight, theory)
    assert qt.qdata.dtype == torch.uint8 and qt.qdata.shape == (256, 512)
    assert qt.scale.dtype == torch.float16 and qt.scale.shape == (256, 1024 // gs)


def test_input_size_not_multiple_of_group_pads_last_group(engine):
    w = torch.randn(16, 200)  # 200 = 128 + 72
    qt, db = quantize_tensor(engine, w, "int4-group")
    assert qt.scale.shape == (16, 2) and qt.qdata.shape == (16, 128)
    assert qt.dequantize().shape == (16, 200)
    assert db > 18, db
    model, report = Engine().quantize(
        torch.nn.Sequential(torch.nn.Linear(200, 8)), scheme="int4-group"
    )
    x = torch.randn(3, 200)
    assert model(x).shape == (3, 8) and report.layers[0].sqnr_db > 18


@pytest.mark.parametrize("opts", [{}, {"symmetric": True}, {"zero": "int"}, {"method": "hqq"}])
def test_zero_rows_and_constant_groups_are_exact(engine, opts):
    w = torch.randn(8, 256)
    w[3] = 0.0
    w[5, :128] = 0.7  # one constant group
    qt, _ = quantize_tensor(engine, w, "int4-group", **opts)
    deq = qt.dequantize()
    assert torch.isfinite(deq).all()
    assert torch.equal(deq[3], torch.zeros(256))
    tol = 0.0 if not opts else 1e-3
    assert (deq[5, :128] - 0.7).abs().max().item() <= tol + 1e-3


def test_tiny_weights_fall_back_to_float32_parameters(engine):
    w = torch.randn(8, 128) * 1e-7
    qt, db = quantize_tensor(engine, w, "int4-group")
    assert qt.scale.dtype == torch.float32 and qt.meta["param_dtype_fallback"] == "float32"
    assert db > 18, db


def test_bad_options_fail_at_configure_time(engine):
    with pytest.raises(CapabilityError, match=r"group size 100 \(supported: 32, 64, 128, 256\)"):
        engine.configure(scheme="int4-group", scheme_options={"group_size": 100})
    with pytest.raises(CapabilityError, match="method=hqq"):
        engine.configure(scheme="int4-group", scheme_options={"method": "hqq", "symmetric": True})
    with pytest.raises(UsageError, match="not one of: lsq, hqq, rtn"):
        engine.configure(scheme="int4-group", scheme_options={"method": "gptq"})


def test_model_round_trip_bit_identical(tmp_path, engine):
    import monoquant_core as mq

    x = torch.randn(4, 32)
    q, report = engine.quantize(
        mlp(dims=(32, 256, 10)), scheme="int4-group", scheme_options={"group_size": 32}
    )
    assert report.layers[0].bits_per_weight == pytest.approx(5.0)
    path = tmp_path / "m.safetensors"
    mq.save(q, str(path))
    assert torch.equal(mq.load(str(path), mlp(dims=(32, 256, 10)))(x), q(x))


def test_padding_that_costs_more_than_a_smaller_group_size_is_a_plan_warning(engine):
    """Rows of 384 inputs padded to 512 at g256 store 5.50 bits per weight, more than g128's
    4.25: the layer is still quantized as asked, and the plan says so (the short-row rule,
    over 8 bits per weight, keeps a layer in float instead)."""
    model = torch.nn.Sequential(torch.nn.Linear(384, 16), torch.nn.Linear(512, 16))
    plan = engine.plan(model, scheme="int4-group", scheme_options={"group_size": 256})
    first = plan.get("0")
    want = (
        "warning: group_size 256 pads rows of 384 inputs to 512: 5.50 bits per weight, more "
        "than group_size 128 (4.25, and more accurate)"
    )
    assert first.selected and any(n.startswith(want) for n in first.notes), first.notes
    assert want in plan.render()
    assert not any("pads rows" in n for n in plan.get("1").notes)  # 512 = 2 x 256
    g128 = engine.plan(model, scheme="int4-group", scheme_options={"group_size": 128})
    assert not any("pads rows" in n for e in g128 for n in e.notes)
    # 96 inputs at g128 (5.67): g64 would cost more (6.00), g32 less (5.00)
    small = engine.plan(torch.nn.Sequential(torch.nn.Linear(96, 8)), scheme="int4-group")
    assert any("more than group_size 32 (5.00" in n for n in small.get("0").notes)


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
@pytest.mark.parametrize(
    "options",
    [
        {"method": "rtn"},
        {"method": "lsq"},
        {"method": "hqq"},
        {"symmetric": True},
        {"zero": "int"},
        {"scale_dtype": "bfloat16"},
    ],
    ids=["rtn", "lsq", "hqq", "symmetric", "int-zero", "bf16-scales"],
)
def test_weights_at_float32_limits_get_finite_scales(engine, observer, options):
    """+-3.4e38 gave NaN/Inf scales (lsq's sums of squares overflow float32): the optimisers
    now work on groups rescaled by a power of two, and a group they cannot fit keeps the
    observer's round-to-nearest parameters."""
    w = extreme_weight()
    qt, _ = quantize_tensor(engine, w, "int4-group", observer=observer, **options)
    assert_extremes_survive(w, qt, rel=0.15, normal_db=17.0)
    bf16 = options.get("scale_dtype") == "bfloat16"  # float16 cannot hold such scales
    assert qt.scale.dtype == (torch.bfloat16 if bf16 else torch.float32), qt.scale.dtype
