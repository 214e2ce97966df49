"""The int8 AVX512-BF16 GEMM of torch-cpu (plugins/backends/bf16_gemm_kernels.c,
``int8-gemm-bf16``): its float32 sums equal to the exact products of the bfloat16 inputs and the
codes up to float32 summation rounding, its bfloat16 output the float32 result rounded once, the
same bits on 1 and 2 threads, and the dispatch (many rows, shapes it takes) as the plan shows it.
Skipped with the reason on CPUs without AVX512-BF16 or without a C compiler."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monoquant_plugins.backends import bf16_gemm, cpu_kernels, cpu_schedule
from torch import nn

from monoquant_core import Engine
from tests.helpers import cpu_gemm_fixture, fast_and_reference, rel_err, with_1_and_2_threads

#: this file tests the bfloat16 GEMM paths (test_f32_gemm.py the float32 ones)
_bf16_gemms = cpu_gemm_fixture("bf16")


LIB, REASON = bf16_gemm.BF16_GEMM.library()
ENGINE = Engine()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"C bf16 GEMM: {REASON}")


def _layer(n: int, k: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.01 + 1e-4
    p = cpu_kernels.Prepared(n, k, ((1, "int8-gemm-bf16"),), {"wq": q, "s": s})
    return q, s, p


@needs_lib
@settings(max_examples=40, deadline=None)
@given(
    panels=st.integers(1, 5),
    chunks=st.integers(1, 7),
    m=st.integers(1, 40),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_sums_are_the_exact_products_up_to_float32_rounding(panels, chunks, m, bias, seed):
    n, k = 64 * panels, 64 * chunks
    q, s, p = _layer(n, k, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(m, k, generator=g).to(torch.bfloat16)
    b = torch.randn(n, generator=g) if bias else None
    y32 = bf16_gemm.int8_gemm_bf16(x.float(), p, b)  # float32 in: rounded to bf16, f32 out
    exact = (x.double() @ q.double().T) * s.double() + (0 if b is None else b.double())
    bound = 64 * k * 2.0**-24 * ((x.double().abs() @ q.double().abs().T) * s.double()).max()
    assert y32.dtype == torch.float32
    assert (y32.double() - exact).abs().max() <= bound + 1e-12
    ybf = bf16_gemm.int8_gemm_bf16(x, p, b)  # bfloat16 in and out: the same sums, rounded once
    assert ybf.dtype == torch.bfloat16 and torch.equal(ybf, y32.to(torch.bfloat16))


@needs_lib
def test_one_and_two_threads_give_the_same_bits():
    *_, p = _layer(320, 448, 3)  # 5 panels of 64
    x = torch.randn(37, 448).to(torch.bfloat16)
    one, two = with_1_and_2_threads(lambda: bf16_gemm.int8_gemm_bf16(x, p, None))
    assert torch.equal(one, two)


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_layer_runs_it_from_the_crossover_on_and_matches_reference(dtype, monkeypatch):
    monkeypatch.setattr(cpu_schedule, "has_bf16_compute", lambda: True)
    fast, ref = fast_and_reference(128, 256, "int8", {})
    p = fast[0].prepared()
    first = p.kernels[1][0]
    assert p.pick(first) == "int8-gemm-bf16" and p.pick(first - 1) == "int8-gemv-c"
    x = torch.randn(2, first + 5, 256).to(dtype)
    with torch.no_grad():
        y, r = fast(x), ref(x)
    assert y.dtype == dtype and y.shape == (2, first + 5, 128)
    assert rel_err(y, r) < 1.5e-2
    plan = Engine().plan(nn.Sequential(nn.Linear(256, 128)), scheme="int8")
    last = bf16_gemm.last_rows(256)  # then the conversion path: the input no longer in cache
    desc = bf16_gemm.DESCRIPTIONS["int8-gemm-bf16"]
    # then why: the measured rates of bfloat16 dot products and float32 FMAs
    assert plan.get("0").kernels[1].startswith(f"M {first}-{last}: {desc} (bf16 dot products: ")
    assert p.pick(last) == "int8-gemm-bf16" and p.pick(last + 1) == "int8-gemm-c"


@pytest.mark.parametrize("shape", [(96, 256), (128, 200), (128, 32)])
def test_shapes_it_does_not_take_run_the_other_gemm(shape, monkeypatch):
    monkeypatch.setattr(cpu_schedule, "has_bf16_compute", lambda: True)
    n, k = shape
    assert not bf16_gemm.fits(n, k)
    fast, ref = fast_and_reference(n, k, "int8", {})
    kinds = {name for _, name in fast[0].prepared().kernels}
    assert "int8-gemm-bf16" not in kinds
    x = torch.randn(70, k)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < 1.5e-2


def test_without_the_library_the_other_gemm_runs(monkeypatch):
    monkeypatch.setattr(cpu_schedule, "bf16_gemm_library", lambda: None)
    monkeypatch.setattr(cpu_schedule, "f32_gemm_library", lambda: None)
    fast, _ = fast_and_reference(128, 256, "int8", {})
    assert "int8-gemm-bf16" not in {name for _, name in fast[0].prepared().kernels}


def _int4_layer(n: int, k: int, gs: int, symmetric: bool, seed: int):
    """An int4-group QTensor of a ``Linear(k, n)`` and its float64 dequantized weight."""
    torch.manual_seed(seed)
    opts = {"group_size": gs, "symmetric": symmetric, "method": "rtn"}
    model, _ = ENGINE.quantize(
        nn.Sequential(nn.Linear(k, n)), scheme="int4-group", scheme_options=opts,
        backend="reference", progress=False,
    )  # fmt: skip
    qt = model[0].qtensor("weight")
    w = model[0].scheme.dequantize(qt).double()
    t = {"gs": gs, **bf16_gemm.int4_tensors(qt)}
    return cpu_kernels.Prepared(n, k, ((1, "int4-gemm-bf16"),), t), w


@needs_lib
@settings(max_examples=15, deadline=None)
@given(
    panels=st.integers(1, 4),
    gs=st.sampled_from([32, 64, 128, 256]),
    groups=st.integers(1, 3),
    m=st.integers(1, 30),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int4_products_are_those_of_the_bf16_rounded_weight(panels, gs, groups, m, symmetric, seed):
    n, k = 64 * panels, max(128, gs * groups)
    k += (-k) % 128
    if k % gs:
        k = gs * (k // gs + 1)
    p, w = _int4_layer(n, k, gs, symmetric, seed)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    y32 = bf16_gemm.int4_gemm_bf16(x.float(), p, None)
    wb = w.float().to(torch.bfloat16).double()  # the dequantized weight, rounded once
    exact = x.double() @ wb.T
    bound = 64 * k * 2.0**-24 * (x.double().abs() @ wb.abs().T).max()
    # the kernel rounds (u - z) * s after one fused multiply-subtract: a weight may land one
    # bfloat16 step away from torch's two-step rounding, hence the second term
    step = (x.double().abs() @ (w.abs() * 2.0**-8).T).max()
    assert (y32.double() - exact).abs().max() <= bound + step + 1e-12
    ybf = bf16_gemm.int4_gemm_bf16(x, p, None)
    assert torch.equal(ybf, y32.to(torch.bfloat16))


@needs_lib
def test_int4_one_and_two_threads_give_the_same_bits():
    p, _ = _int4_layer(320, 384, 128, False, 5)
    x = torch.randn(29, 384).to(torch.bfloat16)
    one, two = with_1_and_2_threads(lambda: bf16_gemm.int4_gemm_bf16(x, p, None))
    assert torch.equal(one, two)


@needs_lib
@pytest.mark.parametrize("opts", [{}, {"group_size": 32, "symmetric": True}])
def test_int4_layers_run_it_from_the_crossover_on(opts, monkeypatch):
    monkeypatch.setattr(cpu_schedule, "has_bf16_compute", lambda: True)
    fast, ref = fast_and_reference(128, 256, "int4-group", opts)
    p = fast[0].prepared()
    first = p.kernels[1][0]
    assert p.pick(first) == "int4-gemm-bf16"
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(first + 3, 256).to(dtype)
        with torch.no_grad():
            assert rel_err(fast(x), ref(x)) < 1.5e-2
    assert not bf16_gemm.fits_int4(128, 320, 64) and not bf16_gemm.fits_int4(96, 256, 128)


@needs_lib
def test_w4a8_on_bf16_inputs_at_many_rows_agrees_with_the_conversion_path(monkeypatch):
    cpu_vnni, model, opts = _w4a8_layer(256, seed=0)
    own, _ = ENGINE.quantize(copy.deepcopy(model), scheme="int4-group", scheme_options=opts)
    assert own[0].backend.name == "cpu-vnni" and own[0].prepared().own is not None
    monkeypatch.setattr(cpu_vnni, "_own", lambda *a: False)
    conv, _ = ENGINE.quantize(copy.deepcopy(model), scheme="int4-group", scheme_options=opts)
    assert conv[0].prepared().own is None
    x = torch.randn(300, 512).to(torch.bfloat16)  # above cpu-vnni's bf16 hand-over
    with torch.no_grad():
        a, b = own(x), conv(x)
    # the same codes and weights; float32 sums in another order, one output rounding, not two
    assert rel_err(a, b) < 8e-3


def _w4a8_layer(n: int, seed: int):
    """``(cpu_vnni module, a bf16 Linear(512, n), W4A8 options)``; skips without cpu-vnni."""
    from monoquant_plugins.backends import cpu_vnni

    if cpu_vnni.library()[0] is None or cpu_vnni.dequant_library() is None:
        pytest.skip(f"cpu-vnni: {cpu_vnni.library()[1] or 'no C dequantization library'}")
    torch.manual_seed(seed)
    return cpu_vnni, nn.Sequential(nn.Linear(512, n)).to(torch.bfloat16), {"activations": "dynamic"}


@needs_lib
def test_w4a8_on_bf16_inputs_hands_over_to_the_own_gemm_at_its_own_crossover():
    cpu_vnni, model, opts = _w4a8_layer(128, seed=1)
    fast, _ = ENGINE.quantize(copy.deepcopy(model), scheme="int4-group", scheme_options=opts)
    ref, _ = ENGINE.quantize(model, scheme="int4-group", scheme_options=opts, backend="reference")
    first = cpu_vnni.bf16_gemm_rows(512, 128, own=True)
    assert first == 16 < cpu_vnni.bf16_gemm_rows(512, 128)  # earlier than the conversion path
    plan = ENGINE.plan(nn.Sequential(nn.Linear(512, 128)).to(torch.bfloat16),
                       scheme="int4-group", scheme_options=opts).get("0")  # fmt: skip
    assert plan.kernels[1].startswith(f"M {first}-") and "AVX512-BF16 GEMM" in plan.kernels[1]
    for m in (first - 1, first):  # the VNNI kernel, then the own GEMM: both the reference's
        x = torch.randn(m, 512).to(torch.bfloat16)
        with torch.no_grad():
            assert rel_err(fast(x), ref(x)) < 1e-2, m


@needs_lib
@settings(max_examples=25, deadline=None)
@given(panels=st.integers(1, 3), chunks=st.integers(1, 8), m=st.integers(1, 40))
def test_w8a8_on_bf16_inputs_is_the_exact_integer_sums_scaled_and_rounded_once(panels, chunks, m):
    """``int8-dynamic-bf16``: the reference's per-token codes (held in bf16, exact) times the
    int8 weight; for K <= 512 the float32 sums are exact integers, so the output must equal the
    int64 products times (weight scale x row scale) in float32, rounded once to bf16; with a
    bias, the float64 result within one bf16 rounding; float32 inputs run fbgemm's kernel."""
    from monoquant_core.activations import quantize_per_token

    n, k = 64 * panels, 64 * chunks
    q, s, p = _layer(n, k, seed=m)
    x = torch.randn(m, k).to(torch.bfloat16)
    y = bf16_gemm.int8_dynamic_gemm_bf16(x, p)
    codes, sx = quantize_per_token(x)
    sums = (codes.to(torch.int64) @ q.to(torch.int64).t()).to(torch.float32)
    assert y.dtype == torch.bfloat16 and torch.equal(y, (sums * (s * sx)).to(torch.bfloat16))
    bias = torch.randn(n)
    yb = bf16_gemm.int8_dynamic_gemm_bf16(x, p, bias).double()
    exact = sums.double() * (s * sx).double() + bias.double()
    assert ((yb - exact).abs() <= exact.abs() * 2.0**-8 + 1e-30).all()
    assert torch.equal(bf16_gemm.int8_dynamic_gemm_bf16(x.float(), _fbgemm_ready(q, s)),
                       cpu_kernels.int8_dynamic(x.float(), _fbgemm_ready(q, s)))  # fmt: skip


def _fbgemm_ready(q: torch.Tensor, s: torch.Tensor):
    """The layer of ``q``/``s`` prepared by torch-cpu for W8A8 (fbgemm's packed weight too)."""
    import warnings

    n, k = q.shape
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(
            q, s.double(), torch.zeros(n, dtype=torch.long), 0
        )
        packed = torch.ops.quantized.linear_prepack(qw, None)
    return cpu_kernels.Prepared(n, k, ((1, "int8-dynamic"),), {"wq": q, "s": s, "packed": packed})


@needs_lib
def test_w8a8_of_a_bf16_model_runs_the_own_gemm_for_narrow_layers_at_many_rows():
    torch.manual_seed(3)
    opts = {"activations": "dynamic"}
    wide = ENGINE.plan(nn.Sequential(nn.Linear(1536, 384)).to(torch.bfloat16), scheme="int8",
                       scheme_options=opts).get("0")  # fmt: skip
    assert list(wide.kernels) == ["any M: fbgemm int8 x int8, per-token inputs"]
    layer = nn.Sequential(nn.Linear(384, 384)).to(torch.bfloat16)
    q, _ = ENGINE.quantize(copy.deepcopy(layer), scheme="int8", scheme_options=opts)
    r, _ = ENGINE.quantize(layer, scheme="int8", scheme_options=opts, backend="reference")
    first = bf16_gemm.W8A8_ROWS
    assert [q[0].prepared().pick(m) for m in (first - 1, first)] == [
        "int8-dynamic", "int8-dynamic-bf16"]  # fmt: skip
    for m in (first - 1, first, 300):
        x = torch.randn(m, 384).to(torch.bfloat16)
        with torch.no_grad():
            assert rel_err(q(x), r(x)) < 2e-2, m
