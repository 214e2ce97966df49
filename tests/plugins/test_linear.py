"""linear replacer: ``nn.Linear`` -> QuantizedLinear (attributes kept, output dtype follows the
input, the backend computes with the quantized weight)."""

from __future__ import annotations

import pytest
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


# (backend, scheme, options): torch-cpu's int8pack / int4pack / fbgemm kernels have no
# derivative; reference's dynamic-tensor path cut the graph; cpu-vnni is a C kernel
_GRAD_CASES = [
    ("reference", "int8", {}),
    ("reference", "int8", {"activations": "dynamic-tensor"}),
    ("torch-cpu", "int8", {}),
    ("torch-cpu", "int8", {"activations": "dynamic"}),
    ("torch-cpu", "int8", {"activations": "dynamic-tensor"}),
    ("torch-cpu", "int4-group", {}),
    ("torch-cpu", "fp16", {}),
    ("cpu-vnni", "int4-group", {"activations": "dynamic"}),
]


@pytest.mark.parametrize("backend, scheme, options", _GRAD_CASES)
def test_gradients_reach_the_input_as_through_the_dequantized_weight(
    engine, backend, scheme, options
):
    be = engine.backends.get(backend)
    if be.available() is not True:
        pytest.skip(f"{backend}: {be.available()}")
    base = nn.Sequential(nn.Linear(256, 32))
    q, _ = engine.quantize(base, scheme=scheme, scheme_options=options, backend=backend)
    layer = q[0]
    layer.bias.requires_grad_(True)  # a bias made trainable gets its gradient too
    x = torch.randn(2, 3, 256, requires_grad=True)
    y = q(x)
    g = torch.randn_like(y)
    y.backward(g)
    deq = layer.qtensor().dequantize()
    torch.testing.assert_close(x.grad, g @ deq, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g.sum((0, 1)))
    assert layer.weight_qdata.grad is None  # the quantized weight is frozen


def test_no_graph_is_recorded_without_inputs_that_need_gradients(engine):
    q, _ = engine.quantize(mlp())
    assert q(torch.randn(2, 32)).grad_fn is None
