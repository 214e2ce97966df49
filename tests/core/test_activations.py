"""activations.py: the run-time activation quantizers every backend follows."""

from __future__ import annotations

import pytest
import torch

from monoquant_core.activations import (
    fake_quantize_static,
    quantize_per_tensor_asym,
    quantize_per_token,
    static_act_params,
)
from tests.helpers import int8_qtensor


def _static(scale, zero):
    extra = {"act_scale": torch.tensor(scale), "act_zero_point": torch.tensor(zero)}
    return int8_qtensor((1, 1), extra=extra)


def test_per_token_is_one_symmetric_scale_per_row():
    x = torch.tensor([[1.0, -2.54, 0.5], [0.0, 0.0, 0.0]])
    codes, scale = quantize_per_token(x)
    torch.testing.assert_close(scale, torch.tensor([[2.54 / 127], [1.0]]))
    assert codes.dtype == torch.int8
    assert codes.tolist() == [[50, -127, 25], [0, 0, 0]]


def test_per_tensor_asym_widens_to_zero_and_uses_uint8():
    codes, scale, zero = quantize_per_tensor_asym(torch.tensor([1.0, 2.55]))
    assert scale == pytest.approx(2.55 / 255) and zero == 0  # [0, 2.55]
    assert codes.dtype == torch.uint8 and codes.tolist() == [100, 255]
    codes, scale, zero = quantize_per_tensor_asym(torch.tensor([-1.0, 0.5]))
    assert scale == pytest.approx(1.5 / 255) and zero == 170
    _, scale, zero = quantize_per_tensor_asym(torch.zeros(3))
    assert (scale, zero) == (1.0, 0)


def test_fake_quantize_static_rounds_clamps_and_shifts():
    qt = _static(0.5, 10)
    x = torch.tensor([0.0, 0.26, -5.0, -6.0, 200.0])
    # codes: 10, 11, 0, 0 (clamped), 255 (clamped) -> back as (code - 10) * 0.5
    assert fake_quantize_static(x, qt).tolist() == [0.0, 0.5, -5.0, -5.0, 122.5]


def test_static_params_are_read_and_checked():
    assert static_act_params(_static(0.25, 3)) == (0.25, 3)
    bare = _static(0.25, 3)
    bare.extra = {}
    with pytest.raises(ValueError, match="lacks its act_scale"):
        static_act_params(bare)
    with pytest.raises(ValueError, match="invalid static activation parameters"):
        static_act_params(_static(0.0, 3))
    with pytest.raises(ValueError, match="invalid static activation parameters"):
        static_act_params(_static(1.0, 300))
