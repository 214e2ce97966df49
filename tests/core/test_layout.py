"""layout.py: ``[C, G, S]`` group views (padding, every axis) and int4 packing."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from monoquant_core.layout import from_groups, pack_int4, to_groups, unpack_int4


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


def test_signed_codes_pack_as_twos_complement_and_odd_lengths_pad_with_zero():
    packed = pack_int4(torch.tensor([[-8, 7, -1]]))
    assert packed.tolist() == [[0x78, 0x0F]]  # -8 -> 0x8, 7 -> 0x7, -1 -> 0xF, pad 0
    assert unpack_int4(packed, 3, signed=True).tolist() == [[-8, 7, -1]]
    assert unpack_int4(packed, 3, signed=False).tolist() == [[8, 7, 15]]


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


def test_channel_axis_moves_first_and_per_tensor_is_one_row():
    w = torch.arange(6.0).reshape(2, 3)
    assert to_groups(w, 1, None).tolist() == [[[0.0, 3.0]], [[1.0, 4.0]], [[2.0, 5.0]]]
    assert to_groups(w, None, None).tolist() == [[[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]]]
    assert to_groups(w, None, 4).tolist() == [[[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 5.0, 5.0]]]
