"""torch-cpu backend: every kernel path within a declared error bound of the reference
backend on the same QTensor, and every unsupported shape or odd input falls back or is
guarded instead of crashing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monoquant_core import Engine
from monoquant_core.testing import odd_inputs
from tests.helpers import fast_and_reference, rel_err

# (scheme, options, relative error bound against the reference backend)
PATHS = [
    ("int8", {"activations": "dynamic"}, 2e-2),
    ("int8", {"activations": "dynamic-tensor"}, 2e-2),
    ("int8", {}, 1.5e-2),
    ("int8", {"granularity": "per-tensor"}, 1.5e-2),
    ("int4-group", {"group_size": 32}, 1.5e-2),
    ("int4-group", {"group_size": 64}, 1.5e-2),
    ("int4-group", {"group_size": 128}, 1.5e-2),
    ("int4-group", {"group_size": 256}, 1.5e-2),
    ("int4-group", {"group_size": 128, "symmetric": True}, 1.5e-2),
    ("int4-group", {"group_size": 128, "zero": "int", "method": "rtn"}, 1.5e-2),
    ("fp16", {}, 1e-3),
    ("bf16", {}, 1.5e-2),
]


@pytest.mark.parametrize("scheme, opts, bound", PATHS)
# M = 1 (decode) and 17 (several row blocks and a remainder) run by default; M = 3 is slow
@pytest.mark.parametrize("m", [1, pytest.param(3, marks=pytest.mark.slow), 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_paths_match_reference(scheme, opts, bound, m, dtype):
    fast, ref = fast_and_reference(96, 256, scheme, opts)
    assert fast[0].backend.name == "torch-cpu", fast[0].backend.name
    assert torch.equal(fast[0].weight_qdata, ref[0].weight_qdata)  # same QTensor
    x = torch.randn(m, 256).to(dtype)
    with torch.no_grad():
        y, r = fast(x), ref(x)
    assert y.dtype == dtype and y.shape == r.shape
    err = rel_err(y, r)
    limit = bound if dtype == torch.float32 else max(bound, 2e-2)
    assert err < limit, f"{scheme} {opts} M={m} {dtype}: relative error {err:.2e} >= {limit}"


def test_numerics_are_declared():
    be = Engine().backends.get("torch-cpu")
    assert "bfloat16" in be.capabilities.numerics and "per token" in be.capabilities.numerics


@pytest.mark.parametrize(
    "scheme, opts, shape, reason",
    [
        ("int8", {}, (32, 40), "K % 16 != 0 (K=40)"),
        ("int4-group", {"group_size": 32}, (40, 64), "N % 16 != 0 (N=40)"),
        ("int4-group", {"group_size": 32}, (32, 72), "K % group_size != 0 (K=72, group_size=32)"),
        ("int8", {"symmetric": False}, (32, 64), "need symmetric weights"),
    ],
)
def test_unsupported_shapes_fall_back_to_reference_with_a_reason(scheme, opts, shape, reason):
    n, k = shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n))
    engine = Engine()
    plan = engine.plan(model, scheme=scheme, scheme_options=opts)
    entry = plan.get("0")
    assert entry.backend == "reference"
    assert any(reason in note and "using reference" in note for note in entry.notes), entry.notes
    q, _ = engine.quantize(model, scheme=scheme, scheme_options=opts)
    assert q(torch.randn(2, k)).shape == (2, n)


@pytest.mark.parametrize("scheme, opts, bound", [p for p in PATHS if p[0] != "fp16"])
def test_odd_inputs_are_guarded(scheme, opts, bound):
    fast, ref = fast_and_reference(96, 256, scheme, opts)
    for label, x in odd_inputs(256).items():
        with torch.no_grad():
            y, r = fast(x), ref(x)
        assert y.shape == r.shape == (*x.shape[:-1], 96), label
        if x.numel():
            err = rel_err(y, r)
            assert err < max(bound, 2e-2), f"{label}: relative error {err:.2e}"


def test_bias_and_output_dtype():
    fast, ref = fast_and_reference(96, 256, "int4-group", {})
    x = torch.randn(4, 256, dtype=torch.float16)
    assert fast(x).dtype == torch.float16
    assert rel_err(fast(x), ref(x)) < 2e-2
