"""affine.py: scale / zero-point math, half-up rounding, rounding error and parameter storage,
checked against the formulas in the module documentation."""

from __future__ import annotations

import pytest
import torch

from monoquant_core.affine import (
    MIN_SCALE,
    Scratch,
    dequantize_groups,
    minmax_qparams,
    params_bounded,
    params_fit,
    quantize_groups,
    round_params,
    rounding_error,
)
from monoquant_core.qtensor import QParams, QuantSpec

SYM8 = QuantSpec(8, True)
ASYM4_INT = QuantSpec(4, False, 0, 4)
ASYM4_FLOAT = QuantSpec(4, False, 0, 4, float_zero=True)


def test_symmetric_scale_is_amax_over_qmax_without_zero_point():
    qp = minmax_qparams(torch.tensor([[-2.0], [0.5]]), torch.tensor([[1.0], [1.27]]), SYM8)
    assert qp.zero_point is None
    torch.testing.assert_close(qp.scale, torch.tensor([[2.0 / 127], [1.27 / 127]]))


def test_integer_zero_widens_the_range_to_include_zero():
    # [1, 4] is widened to [0, 4]: zero is exact, scale = 4 / 15, zero point 0
    qp = minmax_qparams(torch.tensor([[1.0]]), torch.tensor([[4.0]]), ASYM4_INT)
    torch.testing.assert_close(qp.scale, torch.tensor([[4.0 / 15]]))
    assert qp.zero_point.tolist() == [[0.0]]
    qp = minmax_qparams(torch.tensor([[-3.0]]), torch.tensor([[-1.0]]), ASYM4_INT)
    assert qp.zero_point.tolist() == [[15.0]]  # [-3, 0]: the zero sits at the top code


def test_float_zero_keeps_the_range_and_maps_lo_to_qmin():
    lo, hi = torch.tensor([[1.0]]), torch.tensor([[4.0]])
    qp = minmax_qparams(lo, hi, ASYM4_FLOAT)
    torch.testing.assert_close(qp.scale, torch.tensor([[3.0 / 15]]))
    torch.testing.assert_close(qp.zero_point, torch.tensor([[-5.0]]))  # 0 - 1 / 0.2
    g = torch.tensor([[[1.0, 4.0, 2.5, 1.2]]])
    back = dequantize_groups(quantize_groups(g, qp, ASYM4_FLOAT), qp)
    torch.testing.assert_close(back[0, 0, :2], torch.tensor([1.0, 4.0]))


@pytest.mark.parametrize("spec", [SYM8, ASYM4_INT, ASYM4_FLOAT], ids=["sym", "int", "float"])
def test_degenerate_groups_never_divide_by_zero(spec):
    lo = torch.tensor([[0.0], [0.7], [-0.7]])
    qp = minmax_qparams(lo, lo.clone(), spec)
    assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all()
    g = lo.unsqueeze(-1).expand(3, 1, 4).contiguous()
    back = dequantize_groups(quantize_groups(g, qp, spec), qp)
    assert back[0].eq(0).all()  # an all-zero group comes back exactly
    if spec.float_zero or spec.symmetric:
        torch.testing.assert_close(back, g)  # a constant group is reproduced


def test_quantize_groups_rounds_half_up_and_clamps():
    qp = QParams(torch.tensor([[1.0]]), None)
    g = torch.tensor([[[0.5, 1.5, -0.5, -1.5, 200.0, -200.0]]])
    assert quantize_groups(g, qp, SYM8).tolist() == [[[1.0, 2.0, 0.0, -1.0, 127.0, -128.0]]]


def test_rounding_error_equals_the_squared_error_of_the_codes():
    g = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(0))
    qp = minmax_qparams(g.amin(-1), g.amax(-1), QuantSpec(4, False, 0, 8))
    spec = QuantSpec(4, False, 0, 8)
    want = (dequantize_groups(quantize_groups(g, qp, spec), qp) - g).square().sum(-1)
    scratch = Scratch()
    got = rounding_error(g, qp, spec, scratch)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rounding_error(g, qp, spec, scratch), want, rtol=1e-4, atol=1e-6)


def test_scratch_reuses_a_buffer_large_enough():
    s = Scratch()
    a = s.get("x", (4, 4))
    b = s.get("x", (2, 3))
    assert a.data_ptr() == b.data_ptr() and b.shape == (2, 3)
    c = s.get("x", (8, 8))
    assert c.shape == (8, 8) and c.numel() == 64
    assert s.get("x", (2,), torch.float16).dtype == torch.float16


def test_params_fit_and_round_params():
    assert params_fit(torch.tensor([1e-30, 1e30]), torch.float32)
    assert not params_fit(torch.tensor([1e5]), torch.float16)  # overflows to inf
    assert not params_fit(torch.tensor([1e-9]), torch.float16)  # flushes to 0
    assert params_fit(torch.tensor([0.0, 0.5]), torch.float16)
    qp = round_params(QParams(torch.tensor([[0.1]]), torch.tensor([[2.3]])), torch.float16)
    assert qp.scale.dtype == torch.float32
    assert qp.scale.item() == torch.tensor(0.1).half().item()
    assert qp.zero_point.item() == torch.tensor(2.3).half().item()
    assert round_params(QParams(torch.tensor([[0.1]])), torch.float16).zero_point is None


F32 = torch.finfo(torch.float32).max
SYM4 = QuantSpec(4, True, 0, 4)
ASYM8_INT = QuantSpec(8, False)


@pytest.mark.parametrize(
    "spec, rel",
    [(SYM8, 0.02), (ASYM8_INT, 0.02), (SYM4, 0.15), (ASYM4_INT, 0.15), (ASYM4_FLOAT, 0.02)],
    ids=["sym8", "int8-zero", "sym4", "int4-zero", "float-zero"],
)
def test_ranges_at_float32_limits_give_finite_parameters_and_values(spec, rel):
    """``hi - lo`` of two values near float32's limit overflowed to inf (NaN scales)."""
    lo = torch.tensor([[-F32], [-F32], [0.0], [F32], [-1e-44], [1e-40], [-3.0]])
    hi = torch.tensor([[F32], [-F32], [F32], [F32], [1e-44], [1e-40], [2.0]])
    qp = minmax_qparams(lo, hi, spec)
    assert torch.isfinite(qp.scale).all() and (qp.scale >= MIN_SCALE).all(), qp.scale
    assert qp.zero_point is None or torch.isfinite(qp.zero_point).all(), qp.zero_point
    assert params_bounded(qp, spec).all()
    g = torch.cat([lo, hi], -1).unsqueeze(1)  # [C, 1, 2]: each group's two ends
    back = dequantize_groups(quantize_groups(g, qp, spec), qp)
    assert torch.isfinite(back).all(), back
    big = g.abs() > 1e38
    err = ((back - g).abs() / g.abs())[big].max().item()
    assert err <= rel, f"ends at float32's limit come back {err:.3f} off"
    assert back[4:6].abs().max() < 1e-37  # tiny groups: 0 or their own tiny values
    want = 3.0 / spec.qmax if spec.symmetric else 5.0 / (spec.qmax - spec.qmin)
    assert qp.scale[6].item() == torch.tensor(want).item()  # an ordinary group: as before


def test_params_bounded_finds_what_cannot_be_stored():
    ok = QParams(torch.tensor([[1.0, 1e30]]), None)
    assert params_bounded(ok, SYM8).tolist() == [[True, True]]
    assert params_bounded(QParams(torch.tensor([[float("inf")]])), SYM8).tolist() == [[False]]
    assert params_bounded(QParams(torch.tensor([[0.0]])), SYM8).tolist() == [[False]]
    assert params_bounded(QParams(torch.tensor([[3e37]])), SYM8).tolist() == [[False]]  # 128 s
    nan_zero = QParams(torch.tensor([[1.0]]), torch.tensor([[float("nan")]]))
    assert params_bounded(nan_zero, ASYM4_FLOAT).tolist() == [[False]]
    far_zero = QParams(torch.tensor([[1e37]]), torch.tensor([[-100.0]]))  # (15 + 100) * s
    assert params_bounded(far_zero, ASYM4_FLOAT).tolist() == [[False]]
