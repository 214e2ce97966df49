"""histogram observer: never worse than minmax, better where outliers exist."""

from __future__ import annotations

import pytest
import torch

from monoquant_core import QuantSpec
from tests.helpers import quantize_tensor


def _tensors():
    g = torch.Generator().manual_seed(7)
    gauss = torch.randn(256, 512, generator=g)
    student = torch.distributions.StudentT(3.0).sample((256, 512))
    outlier_cols = torch.randn(256, 512, generator=g)
    outlier_cols[:, ::97] *= 25
    spikes = torch.randn(256, 512, generator=g)
    spikes.view(-1)[torch.randperm(spikes.numel(), generator=g)[:50]] = 40.0
    uniform = torch.rand(256, 512, generator=g) * 2 - 1
    skewed = torch.rand(256, 512, generator=g).pow(4)
    return {
        "gauss": gauss,
        "student3": student,
        "outlier_cols": outlier_cols,
        "spikes": spikes,
        "uniform": uniform,
        "skewed": skewed,
    }


TENSORS = _tensors()
CASES = [
    ("int4-group", {"method": "rtn"}),
    ("int4-group", {"method": "rtn", "group_size": 32}),
    ("int4-group", {"method": "rtn", "symmetric": True}),
    ("int4-group", {"method": "rtn", "zero": "int"}),
    ("int8", {}),
    ("int8", {"granularity": "per-tensor"}),
    ("int8", {"symmetric": False}),
]


@pytest.mark.parametrize("name", sorted(TENSORS))
@pytest.mark.parametrize("scheme, opts", CASES)
def test_histogram_never_below_minmax(engine, name, scheme, opts):
    w = TENSORS[name]
    mm = quantize_tensor(engine, w, scheme, "minmax", **opts)[1]
    hist = quantize_tensor(engine, w, scheme, "histogram", **opts)[1]
    assert hist >= mm, f"{name} {scheme} {opts}: histogram {hist:.4f} dB < minmax {mm:.4f} dB"


@pytest.mark.parametrize("name, gain", [("student3", 0.3), ("outlier_cols", 1.0)])
def test_histogram_gains_on_heavy_tails_per_tensor_int8(engine, name, gain):
    w = TENSORS[name]
    opts = {"granularity": "per-tensor"}
    mm = quantize_tensor(engine, w, "int8", "minmax", **opts)[1]
    hist = quantize_tensor(engine, w, "int8", "histogram", **opts)[1]
    assert hist - mm >= gain, f"{name}: histogram {hist:.2f} dB vs minmax {mm:.2f} dB"


def test_histogram_gains_on_heavy_tailed_int4_groups(engine):
    w = TENSORS["student3"]
    opts = {"method": "rtn"}
    hist = quantize_tensor(engine, w, "int4-group", "histogram", **opts)[1]
    gain = hist - quantize_tensor(engine, w, "int4-group", "minmax", **opts)[1]
    assert gain >= 0.3, f"int4 g128 histogram gain over minmax: {gain:.2f} dB"


def test_per_tensor_histogram_accumulates_across_batches(engine):
    obs_cls = engine.observers.get("histogram")
    obs = obs_cls(QuantSpec(8, False, None), obs_cls.config_class())
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(1000, generator=g) * (i + 1) for i in range(4)]
    for b in batches:
        obs.update(b)
    assert obs.hist.sum().item() == 4000
    assert obs.lo == pytest.approx(min(b.min().item() for b in batches))
    qp = obs.qparams()
    assert qp.scale.shape == (1, 1) and qp.zero_point.shape == (1, 1)


def test_histogram_config_validation(engine):
    from monoquant_core import UsageError

    with pytest.raises(UsageError, match="max_shrink"):
        engine.configure(scheme="int8", observer="histogram", observer_options={"max_shrink": 1})
