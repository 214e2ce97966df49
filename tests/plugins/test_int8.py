"""int8 scheme + minmax observer: accuracy in dB, exactness on edge cases. (A NaN weight is
refused by the per-tensor path: tests/core/test_pipeline.py.)"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import assert_extremes_survive, extreme_weight, quantize_tensor


def test_per_channel_gaussian_sqnr_at_least_40_db(engine):
    w = torch.randn(512, 1024)
    _, db = quantize_tensor(engine, w, "int8")
    assert db >= 40.0, f"int8 per-channel SQNR on Gaussian weights is {db:.2f} dB"


def test_per_channel_beats_per_tensor_by_6_db_with_row_scale_spread(engine):
    g = torch.Generator().manual_seed(3)
    rows = 10 ** (torch.rand(256, 1, generator=g) * -2.0)  # row scales over two decades
    w = torch.randn(256, 512, generator=g) * rows
    _, per_channel = quantize_tensor(engine, w, "int8")
    _, per_tensor = quantize_tensor(engine, w, "int8", granularity="per-tensor")
    gain = per_channel - per_tensor
    assert gain >= 6.0, f"per-channel {per_channel:.2f} dB vs per-tensor {per_tensor:.2f} dB"


def test_asymmetric_gains_on_skewed_rows(engine):
    w = torch.rand(128, 256) + 0.5  # all positive: symmetric wastes the negative half
    _, sym = quantize_tensor(engine, w, "int8")
    _, asym = quantize_tensor(engine, w, "int8", symmetric=False)
    assert asym >= sym + 3.0, f"asymmetric {asym:.2f} dB vs symmetric {sym:.2f} dB"


def test_codes_layout_and_bits_per_weight(engine):
    w = torch.randn(64, 256)
    qt, _ = quantize_tensor(engine, w, "int8")
    assert qt.qdata.dtype == torch.int8 and qt.qdata.shape == (64, 256)
    assert qt.scale.shape == (64, 1) and qt.zero_point is None
    assert qt.qdata.abs().max().item() == 127  # the row maximum maps to the extreme code
    assert qt.bits_per_weight == pytest.approx(8 + 32 / 256)
    qa, _ = quantize_tensor(engine, w, "int8", symmetric=False)
    assert qa.qdata.dtype == torch.uint8 and qa.zero_point.dtype == torch.uint8


@pytest.mark.parametrize("symmetric", [True, False])
def test_all_zero_rows_round_trip_exactly(engine, symmetric):
    w = torch.randn(8, 32)
    w[2] = 0.0
    w[5] = 0.0
    qt, _ = quantize_tensor(engine, w, "int8", symmetric=symmetric)
    deq = qt.dequantize()
    assert torch.isfinite(qt.scale).all()
    assert torch.equal(deq[2], torch.zeros(32)) and torch.equal(deq[5], torch.zeros(32))
    assert torch.equal(
        quantize_tensor(engine, torch.zeros(4, 4), "int8", symmetric=symmetric)[0].dequantize(),
        torch.zeros(4, 4),
    )


def test_half_precision_weights_keep_their_dtype(engine):
    w = torch.randn(32, 64).to(torch.bfloat16)
    qt, db = quantize_tensor(engine, w, "int8")
    assert qt.dtype == torch.bfloat16 and qt.dequantize().dtype == torch.bfloat16
    assert db > 35.0


def test_minmax_moving_average_mode(engine):
    from monoquant_core import QuantSpec

    obs_cls = engine.observers.get("minmax")
    cfg = obs_cls.config_class(averaging_constant=0.5)
    obs = obs_cls(QuantSpec(8, True, None), cfg)
    obs.update(torch.tensor([-1.0, 1.0]))
    obs.update(torch.tensor([-3.0, 3.0]))
    assert obs.max.item() == pytest.approx(2.0) and obs.min.item() == pytest.approx(-2.0)
    with pytest.raises(ValueError):
        obs_cls.config_class(averaging_constant=1.5)


@pytest.mark.parametrize("observer", ["minmax", "histogram"])
@pytest.mark.parametrize(
    "options",
    [
        {},
        {"symmetric": False},
        {"granularity": "per-tensor"},
        {"granularity": "per-tensor", "symmetric": False},
    ],
    ids=["sym", "asym", "tensor-sym", "tensor-asym"],
)
def test_weights_at_float32_limits_get_finite_scales(engine, observer, options):
    """Asymmetric ranges of +-3.4e38 gave NaN/Inf scales (the report showed nan, the file was
    written); tiny rows gave garbage through a subnormal scale."""
    w = extreme_weight()
    qt, _ = quantize_tensor(engine, w, "int8", observer=observer, **options)
    assert_extremes_survive(w, qt, rel=0.02, normal_db=38.0)
