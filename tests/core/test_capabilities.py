"""capabilities.py: declared support, checked with one-line errors naming the choices."""

from __future__ import annotations

import pytest
import torch

from monoquant_core import Capabilities, CapabilityError


def test_require_names_the_owner_the_value_and_the_choices():
    caps = Capabilities(group_sizes=(32, None), symmetric=(True,))
    caps.require("scheme 'x'", "group_sizes", 32)
    caps.require("scheme 'x'", "granularities", "anything")  # not declared: no restriction
    with pytest.raises(CapabilityError) as e:
        caps.require("scheme 'x'", "group_sizes", 48)
    assert str(e.value) == (
        "problem: scheme 'x' does not support group size 48 (supported: 32, none) "
        "fix: choose one of 32, none"
    )
    with pytest.raises(CapabilityError, match=r"symmetric false \(supported: true\)"):
        caps.require("scheme 'x'", "symmetric", False)


def test_meant_for_and_to_dict():
    caps = Capabilities(schemes=("int4-group",), activations=("dynamic",), dtypes=(torch.float16,))
    assert caps.meant_for("int4-group", "dynamic")
    assert not caps.meant_for("int8", "dynamic") and not caps.meant_for("int4-group", "none")
    assert Capabilities().meant_for("int8", "static")
    data = caps.to_dict()
    assert data["schemes"] == ["int4-group"] and data["dtypes"] == ["float16"]
