from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monoquant_core.layout import from_groups, pack_int4, to_groups, unpack_int4
from monoquant_core.metrics import sqnr_db
from monoquant_core.qtensor import QTensor


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 7),
    length=st.integers(1, 65),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4_pack_unpack_is_exact(rows, length, signed, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (rows, length), generator=g)
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (rows, (length + 1) // 2)
    back = unpack_int4(packed, length, signed=signed)
    assert back.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(back.to(torch.int64), codes)


def test_pack_layout_is_low_nibble_first():
    packed = pack_int4(torch.tensor([[1, 2, 15, 0]]))
    assert packed.tolist() == [[0x21, 0x0F]]


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
    axis_pick=st.integers(0, 3),
    per_tensor=st.booleans(),
    group=st.sampled_from([None, 1, 2, 3, 8]),
)
def test_groups_round_trip_with_padding(shape, axis_pick, per_tensor, group):
    w = torch.randn(*shape)
    axis = None if per_tensor else axis_pick % len(shape)
    g = to_groups(w, axis, group)
    c = 1 if axis is None else shape[axis]
    assert g.shape[0] == c
    k = w.numel() // c
    if group is not None:
        assert g.shape[1] == math.ceil(k / group) and g.shape[2] == group
    assert torch.equal(from_groups(g, tuple(shape), axis), w)


def test_padding_repeats_last_value_so_ranges_do_not_change():
    w = torch.tensor([[5.0, 6.0, 7.0]])
    g = to_groups(w, 0, 2)
    assert g.tolist() == [[[5.0, 6.0], [7.0, 7.0]]]


def test_sqnr_db_values():
    x = torch.ones(100)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x * 0.9) == pytest.approx(20.0, abs=1e-5)


def _qt(**kw):
    base = dict(
        qdata=torch.zeros(4, 8, dtype=torch.int8),
        scale=torch.ones(4, 1),
        zero_point=None,
        bits=8,
        group_size=None,
        axis=0,
        shape=(4, 8),
        dtype=torch.float32,
        scheme="int8",
    )
    base.update(kw)
    return QTensor(**base)


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
