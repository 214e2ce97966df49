"""qtensor.py: QuantSpec code ranges, QTensor validation (naming the broken field), sizes and
dequantization of the canonical layout."""

from __future__ import annotations

import pytest
import torch

from monoquant_core.layout import pack_int4
from monoquant_core.qtensor import QTensor, QuantSpec
from tests.helpers import int8_qtensor


def _qt(**kw):
    return int8_qtensor((4, 8), **kw)


@pytest.mark.parametrize(
    "spec, qmin, qmax, granularity",
    [
        (QuantSpec(8, True), -128, 127, "per-channel"),
        (QuantSpec(8, False, None), 0, 255, "per-tensor"),
        (QuantSpec(4, True, 0, 32), -8, 7, "group-32"),
        (QuantSpec(4, False, 1, 128), 0, 15, "group-128"),
    ],
)
def test_quant_spec_code_range_and_granularity(spec, qmin, qmax, granularity):
    assert (spec.qmin, spec.qmax, spec.granularity) == (qmin, qmax, granularity)


def test_validate_accepts_consistent_and_names_the_broken_field():
    _qt().validate()
    with pytest.raises(ValueError, match="scale shape"):
        _qt(scale=torch.ones(3, 1)).validate()
    with pytest.raises(ValueError, match="qdata shape"):
        _qt(qdata=torch.zeros(4, 7, dtype=torch.int8)).validate()
    with pytest.raises(ValueError, match="qdata dtype"):
        _qt(qdata=torch.zeros(4, 8, dtype=torch.uint8)).validate()
    with pytest.raises(ValueError, match="zero_point shape"):
        _qt(zero_point=torch.zeros(4, 2), qdata=torch.zeros(4, 8, dtype=torch.uint8)).validate()


def test_validate_names_axis_groups_and_float_columns():
    with pytest.raises(ValueError, match="axis 2 out of range"):
        _qt(axis=2).validate()
    with pytest.raises(ValueError, match="2 groups of 2 do not cover a row of 8"):
        _qt(group_size=2, scale=torch.ones(4, 2)).validate()
    with pytest.raises(ValueError, match="scale has 2 groups but group_size is None"):
        _qt(scale=torch.ones(4, 2)).validate()
    with pytest.raises(ValueError, match="float_cols and float_values must come together"):
        _qt(extra={"float_cols": torch.tensor([1])}).validate()
    with pytest.raises(ValueError, match="float_cols must be sorted and unique"):
        _qt(
            extra={"float_cols": torch.tensor([3, 1]), "float_values": torch.zeros(4, 2)}
        ).validate()
    ok = _qt(extra={"float_cols": torch.tensor([1, 3]), "float_values": torch.ones(4, 2)})
    ok.validate()
    assert ok.has_float_columns and not ok.without_float_columns().has_float_columns


def test_dequantize_affine_and_4bit():
    codes = torch.tensor([[0, 15, 7, 8]])
    qt = QTensor(
        qdata=pack_int4(codes),
        scale=torch.tensor([[0.5]]),
        zero_point=torch.tensor([[8.0]]),
        bits=4,
        group_size=4,
        axis=0,
        shape=(1, 4),
        dtype=torch.float32,
        scheme="test",
    )
    qt.validate()
    assert qt.dequantize().tolist() == [[-4.0, 3.5, -0.5, 0.0]]
    assert qt.bits_per_weight == pytest.approx((2 + 4 + 4) * 8 / 4)


def test_float_columns_are_put_back_when_dequantizing():
    qt = _qt(
        qdata=torch.full((4, 8), 2, dtype=torch.int8),
        extra={"float_cols": torch.tensor([0, 5]), "float_values": torch.full((4, 2), -1.5)},
    )
    w = qt.dequantize()
    assert w[:, [0, 5]].eq(-1.5).all() and w[:, [1, 2, 3, 4, 6, 7]].eq(2.0).all()
    assert qt.without_float_columns().dequantize().eq(2.0).all()


def test_sizes_and_stored_tensors_by_role():
    qt = _qt(
        qdata=torch.zeros(4, 8, dtype=torch.uint8),
        zero_point=torch.zeros(4, 1, dtype=torch.uint8),
        dtype=torch.bfloat16,
    )
    assert list(qt.tensors()) == ["qdata", "scale", "zero_point"]
    assert qt.nbytes == 32 + 16 + 4  # 32 codes, 4 float32 scales, 4 uint8 zero points
    assert qt.bits_per_weight == pytest.approx(8 * 52 / 32)
    assert (qt.numel, qt.channels, qt.row_length, qt.symmetric) == (32, 4, 8, False)
    assert qt.dequantize().dtype == torch.bfloat16
    assert qt.dequantize(torch.float64).dtype == torch.float64


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"scale": torch.tensor([[1.0], [float("nan")], [1.0], [1.0]])}, "scale holds 1 NaN/Inf"),
        ({"scale": torch.tensor([[1.0], [float("inf")], [1.0], [1.0]])}, "scale holds 1 NaN/Inf"),
        ({"scale": torch.tensor([[1.0], [-0.5], [1.0], [1.0]])}, "scale holds 1 value(s) <= 0"),
        ({"scale": torch.zeros(4, 1)}, "scale holds 4 value(s) <= 0"),
        ({"scale": torch.ones(4, 1, dtype=torch.int16)}, "scale must be a float tensor"),
        (
            {
                "qdata": torch.zeros(4, 8, dtype=torch.uint8),
                "zero_point": torch.tensor([[0.0], [float("-inf")], [0.0], [0.0]]),
            },
            "zero_point holds 1 NaN/Inf",
        ),
        (
            {"extra": {"act_scale": torch.tensor([0.0]), "act_zero_point": torch.tensor([3])}},
            "act_scale must be a positive float",
        ),
        (
            {"extra": {"act_scale": torch.tensor([0.1]), "act_zero_point": torch.tensor([300])}},
            "act_zero_point must be an integer code in [0, 255]",
        ),
        ({"extra": {"act_scale": torch.tensor([0.1])}}, "must be one value each, together"),
    ],
    ids=["nan", "inf", "negative", "zero", "int16", "zero-point-inf", "act-0", "act-zp", "act-1"],
)
def test_validate_values_names_the_bad_piece(overrides, needle):
    qt = _qt(**overrides)
    qt.validate()  # the structure is fine: only the values are wrong
    with pytest.raises(ValueError) as info:
        qt.validate_values()
    assert needle in str(info.value), str(info.value)


def test_validate_values_accepts_what_quantizers_produce():
    _qt().validate_values()
    _qt(scale=torch.full((4, 1), 1e-30)).validate_values()  # tiny but positive
    asym = _qt(qdata=torch.zeros(4, 8, dtype=torch.uint8), zero_point=torch.full((4, 1), 3.0))
    asym.validate_values()
    fp16 = QTensor(torch.ones(1, 6, dtype=torch.float16), torch.ones(1, 1), None, 16, None, None,
                   (2, 3), torch.float32, "fp16")  # fmt: skip
    fp16.validate_values()
    fp16.qdata[0, 1] = float("inf")
    with pytest.raises(ValueError, match="qdata holds 1 NaN/Inf"):
        fp16.validate_values()
    # a custom layout defines its own scales: finiteness only
    custom = _qt(scale=torch.full((4, 1), -2.0), meta={"layout": "custom"})
    custom.validate_values()
    custom.scale[0, 0] = float("nan")
    with pytest.raises(ValueError, match="scale holds 1 NaN/Inf"):
        custom.validate_values()
