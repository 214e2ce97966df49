"""The float32 weight-only GEMMs of torch-cpu (plugins/backends/f32_gemm_kernels.c:
``int8-gemm-f32``, ``int4-gemm-f32``, ``fp16-gemm-f32``): results equal to a float64 product of
the weight the reference dequantizes up to float32 summation rounding, over shapes, row counts
(several row chunks included) and thread counts; the dispatch (which GEMM a CPU gets, from
which M, which shapes) as the plan shows it. Skipped with the reason on CPUs without AVX-512
or without a C compiler."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monoquant_plugins.backends import cpu_kernels, cpu_schedule, f32_gemm
from torch import nn

from monoquant_core import Engine
from tests.helpers import cpu_gemm_fixture, fast_and_reference, rel_err, with_1_and_2_threads

LIB, REASON = f32_gemm.F32_GEMM.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"C float32 GEMM: {REASON}")

_f32_gemms = cpu_gemm_fixture("f32")


def _int8(n: int, k: int, g: torch.Generator):
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.01 + 1e-4
    p = cpu_kernels.Prepared(n, k, ((1, "int8-gemm-f32"),), {"wq": q, "s": s})
    return p, q.double() * s.double()[:, None], f32_gemm.int8_gemm_f32


def _int4(n: int, k: int, g: torch.Generator, gs: int, symmetric: bool):
    model = nn.Sequential(nn.Linear(k, n))
    torch.nn.init.normal_(model[0].weight, generator=g)
    opts = {"group_size": gs, "symmetric": symmetric, "method": "rtn"}
    q, _ = Engine().quantize(model, scheme="int4-group", scheme_options=opts, backend="reference")
    qt = q[0].qtensor("weight")
    p = cpu_kernels.Prepared(n, k, ((1, "int4-gemm-f32"),), {"gs": gs, **f32_gemm.int4_tensors(qt)})
    return p, qt.dequantize(torch.float32).double(), f32_gemm.int4_gemm_f32


def _fp16(n: int, k: int, g: torch.Generator):
    w = torch.randn(n, k, generator=g).to(torch.float16)
    p = cpu_kernels.Prepared(n, k, ((1, "fp16-gemm-f32"),), {"w16": w})
    return p, w.double(), f32_gemm.f16_gemm_f32


def _case(kind: str, n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if kind == "int8":
        return _int8(n, k, g)
    if kind == "fp16":
        return _fp16(n, k, g)
    return _int4(n, k, g, gs=(32, 64, 128)[seed % 3], symmetric=kind == "int4-sym")


@needs_lib
@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["int8", "int4", "int4-sym", "fp16"]),
    panels=st.integers(1, 4),
    blocks=st.integers(1, 5),
    m=st.integers(1, 40),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_results_are_the_exact_products_up_to_float32_rounding(kind, panels, blocks, m, bias, seed):
    n, k = 64 * panels, 128 * blocks - (64 if kind in ("int8", "fp16") and seed % 2 else 0)
    p, w, fn = _case(kind, n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    y = fn(x, p, b)
    exact = x.double() @ w.t() + (0 if b is None else b.double())
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # float32 summation over K terms: well under 1e-5 of the result's scale
    err = float((y.double() - exact).abs().max() / exact.abs().max())
    assert err < 1e-5, f"{kind} n={n} k={k} m={m}: {err:.2e}"


@needs_lib
@pytest.mark.parametrize("kind", ["int8", "int4", "fp16"])
def test_many_rows_run_in_chunks_with_the_same_results_as_row_by_row(kind):
    # K = 8192: chunks of 96 rows (the 16-tile minimum), so 300 rows are four, the last partial
    p, w, fn = _case(kind, 64, 8192, seed=3)
    x = torch.randn(300, 8192)
    whole = fn(x, p, None)
    parts = torch.cat([fn(x[i : i + 50], p, None) for i in range(0, 300, 50)])
    assert torch.equal(whole, parts)  # every row's sums in the same order, whatever the chunk
    assert rel_err(whole, (x.double() @ w.t()).float()) < 1e-5  # 8192 float32 terms


@needs_lib
@pytest.mark.parametrize("kind", ["int8", "int4", "fp16"])
def test_one_and_two_threads_give_the_same_bits(kind):
    p, _, fn = _case(kind, 320, 384, seed=4)
    x = torch.randn(37, 384)
    one, two = with_1_and_2_threads(lambda: fn(x, p, None))
    assert torch.equal(one, two)


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "scheme, opts, kernel",
    [
        ("int8", {}, "int8-gemm-f32"),
        ("int4-group", {}, "int4-gemm-f32"),
        ("int4-group", {"group_size": 32, "symmetric": True}, "int4-gemm-f32"),
    ],
)
def test_layers_run_it_from_the_crossover_on_and_match_the_reference(scheme, opts, kernel, dtype):
    fast, ref = fast_and_reference(128, 256, scheme, opts)
    p = fast[0].prepared()
    first = p.kernels[1][0]
    assert p.pick(first) == kernel and p.pick(first - 1).endswith("gemv-c")
    last = f32_gemm.last_rows(256)  # int8: then the conversion path, float32 blocks + GEMM
    assert p.pick(last) == kernel
    assert p.pick(last + 1) == ("int8-gemm" if scheme == "int8" else kernel)  # int4: every M
    x = torch.randn(2, first + 5, 256).to(dtype)
    with torch.no_grad():
        y, r = fast(x), ref(x)
    assert y.dtype == dtype and y.shape == (2, first + 5, 128)
    # float32 inputs: float32 rounding only; other dtypes: one output rounding
    assert rel_err(y, r) < (1e-6 if dtype == torch.float32 else 8e-3)
    plan = Engine().plan(nn.Sequential(nn.Linear(256, 128)), scheme=scheme, scheme_options=opts)
    desc = f32_gemm.DESCRIPTIONS[kernel]
    rows = f"M {first}-{last}" if scheme == "int8" else f"M >= {first}"
    assert plan.get("0").kernels[1].startswith(f"{rows}: {desc}")


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp16_weights_run_it_from_32_rows(dtype):
    fast, ref = fast_and_reference(128, 320, "fp16", {})
    p = fast[0].prepared()
    assert p.kernels == ((1, "fp16"), (32, "fp16-gemm-f32"))  # fbgemm's kernel for few rows
    for m in (1, 9, 70):
        x = torch.randn(m, 320).to(dtype)
        with torch.no_grad():
            assert rel_err(fast(x), ref(x)) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("shape", [(96, 256), (128, 200)])
def test_shapes_it_does_not_take_run_another_kernel(shape):
    n, k = shape
    assert not f32_gemm.fits(n, k)
    fast, ref = fast_and_reference(n, k, "int8", {})
    assert "int8-gemm-f32" not in {name for _, name in fast[0].prepared().kernels}
    x = torch.randn(70, k)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < 1.5e-2


def test_the_choice_between_the_gemms_follows_the_measured_rates(monkeypatch):
    monkeypatch.setenv("MONOQUANT_CPU_GEMM", "")
    rate = f32_gemm.bf16_rate()
    if rate is None:
        assert not f32_gemm.bf16_faster()  # no AVX512-BF16 library: nothing to prefer
    else:
        assert 0.05 < rate < 20  # a real measurement, not a sentinel
        assert f32_gemm.bf16_faster() == (rate >= f32_gemm.BF16_MARGIN)
    monkeypatch.setenv("MONOQUANT_CPU_GEMM", "bf16")
    assert f32_gemm.bf16_faster()
    monkeypatch.setenv("MONOQUANT_CPU_GEMM", "f32")
    assert not f32_gemm.bf16_faster()
    monkeypatch.setattr(cpu_schedule, "_amx", lambda: True)  # AMX: oneDNN's bf16 tiles
    assert cpu_schedule.own_gemm() is None


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_w4a8_hands_over_to_it_for_narrow_inputs_only(dtype):
    from monoquant_plugins.backends import cpu_vnni

    if cpu_vnni.library()[0] is None:
        pytest.skip(f"cpu-vnni: {cpu_vnni.library()[1]}")
    opts = {"activations": "dynamic"}
    fast, ref = fast_and_reference(128, 384, "int4-group", opts)
    p = fast[0].prepared()
    assert fast[0].backend.name == "cpu-vnni" and p.own32 is not None
    first = cpu_vnni.f32_gemm_rows(384)
    for m in (first - 1, first, 3 * first):  # the VNNI kernel, then the float32 GEMM
        x = torch.randn(m, 384).to(dtype)
        with torch.no_grad():
            y, r = fast(x), ref(x)
        assert y.dtype == dtype
        # the reference's own inputs (codes x scale) and weights: float32 summation order only
        assert rel_err(y, r) < (1e-6 if dtype == torch.float32 else 8e-3)
    plan = Engine().plan(
        nn.Sequential(nn.Linear(384, 128)), scheme="int4-group", scheme_options=opts
    )
    assert plan.get("0").kernels[1].startswith(f"M >= {first}: per-token int8 codes x scale")
    wide, _ = fast_and_reference(128, 1536, "int4-group", opts)  # K = 1536: VNNI at every M
    assert wide[0].prepared().own32 is None
