"""linear replacer: ``nn.Linear`` -> QuantizedLinear (attributes kept, output dtype follows the
input, the backend computes with the quantized weight)."""

from __future__ import annotations

import torch
from torch import nn

from monoquant_core.testing import mlp


def test_output_dtype_follows_input_dtype(engine):
    q, _ = engine.quantize(mlp())
    x = torch.randn(2, 32)
    assert q(x.to(torch.bfloat16)).dtype == torch.bfloat16
    assert q(x.double()).dtype == torch.float64


def test_keeps_features_and_bias_and_computes_with_the_dequantized_weight(engine):
    lin = nn.Linear(16, 8, bias=False)
    w = lin.weight.detach().clone()
    q, _ = engine.quantize(nn.Sequential(lin), backend="reference")
    layer = q[0]
    assert (layer.in_features, layer.out_features, layer.bias) == (16, 8, None)
    x = torch.randn(3, 16)
    deq = layer.qtensor().dequantize()
    assert torch.equal(layer(x), nn.functional.linear(x, deq))
    assert (deq - w).abs().max() <= layer.qtensor().scale.max() / 2 + 1e-7
    text = repr(layer)
    assert "in_features=16, out_features=8, bias=False, scheme=int8, bits=8" in text
    assert "backend=reference" in text
