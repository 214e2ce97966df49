"""components.py: what a backend is told about a weight, and quantized modules behaving like
torch modules (state_dict round trip)."""

from __future__ import annotations

import torch

from monoquant_core.components import WeightInfo
from monoquant_core.testing import mlp


def test_quantized_model_state_dict_round_trips_through_torch(engine, tmp_path):
    qmodel, _ = engine.quantize(mlp())
    x = torch.randn(3, 32)
    fresh, _ = engine.quantize(mlp(seed=9))
    fresh.load_state_dict(qmodel.state_dict())
    assert torch.equal(fresh(x), qmodel(x))


def test_weight_info_of_a_qtensor(engine):
    cfg = engine.scheme_config("int8", {"activations": "dynamic"})
    qt = engine.quantize_weight(torch.randn(16, 8), "int8", "minmax", scheme_config=cfg)
    info = WeightInfo.of(qt, "cuda")
    assert (info.scheme, info.shape, info.dtype, info.device, info.activations) == (
        "int8",
        (16, 8),
        torch.float32,
        "cuda",
        "dynamic",
    )
    assert info.spec == qt.spec and info.spec.granularity == "per-channel"
