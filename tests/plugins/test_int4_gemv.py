"""The C int4-group GEMV of torch-cpu (plugins/backends/int4_gemv_kernels.c, ``int4-gemv-c``):
its in-register dequantization equal bit for bit to the reference's float32 weight, its products
within float32 summation rounding of the exact ones, the dispatch by M as the plan shows it, and
the fallback to torch's kernel when the library cannot be built."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from monoquant_plugins.backends import (
    bf16_gemm,
    cpu_kernels,
    cpu_schedule,
    int4_gemv,
    native,
)
from torch import nn

from monoquant_core import Engine
from tests.helpers import (
    assert_gemv_rows_match_reference,
    cpu_gemm_fixture,
    fast_and_reference,
    rel_err,
    with_1_and_2_threads,
)

#: this file tests the bfloat16 GEMM paths (test_f32_gemm.py the float32 ones)
_bf16_gemms = cpu_gemm_fixture("bf16")


LIB, REASON = int4_gemv.INT4_GEMV.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"C int4 GEMV: {REASON}")
U = 2.0**-24  # float32 unit roundoff


def _qtensor(n, k, gs, symmetric, zero, scale_dtype, seed):
    """An int4-group QTensor of a ``Linear(k, n)`` (the last group padded when gs does not
    divide k); ``zero="uint8"``: integer zero points stored as an integer tensor."""
    torch.manual_seed(seed)
    opts = {"group_size": gs, "symmetric": symmetric, "method": "rtn", "scale_dtype": scale_dtype}
    if not symmetric:
        opts["zero"] = "float" if zero == "float" else "int"
    model, _ = Engine().quantize(
        nn.Sequential(nn.Linear(k, n)), scheme="int4-group", scheme_options=opts,
        backend="reference",
    )  # fmt: skip
    qt = model[0].qtensor("weight")
    if zero == "uint8" and not symmetric:
        assert torch.equal(qt.zero_point.float(), qt.zero_point.float().round())
        qt = dataclasses.replace(qt, zero_point=qt.zero_point.to(torch.uint8))
    return qt, model[0].bias.detach()


def _prepared(qt) -> cpu_kernels.Prepared:
    n, k = qt.shape
    return cpu_kernels.Prepared(n, k, ((1, "int4-gemv-c"),), int4_gemv.prepare(qt))


@needs_lib
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    groups=st.integers(1, 3),
    gs=st.sampled_from([32, 64, 128, 256]),
    pad=st.sampled_from([0, 0, 1, 5, 11]),
    m=st.integers(1, 9),
    symmetric=st.booleans(),
    zero=st.sampled_from(["float", "int", "uint8"]),
    scale_dtype=st.sampled_from(["float16", "bfloat16", "float32"]),
    bias=st.booleans(),
    bf16=st.booleans(),
)
def test_int4_gemv_is_the_exact_product_within_float32_rounding(
    n, groups, gs, pad, m, symmetric, zero, scale_dtype, bias, bf16
):
    """Every output against the float64 product of the reference's dequantized float32 weight
    (which the kernel's per-group tables hold exactly) and the same inputs. The kernel sums each
    of 16 lanes with one FMA per 16 inputs (ceil(K / 16) roundings), adds the lanes in a tree
    (4) and the bias (1): at most (ceil(K / 16) + 5) u of the sum of magnitudes (u = 2^-24,
    first order, 1% margin for the second), plus one bfloat16 rounding of the output (u = 2^-8
    for its 8 significant bits) for bfloat16 inputs; the reference (F.linear in float32) within
    its own float32 rounding (K u) on top."""
    # pad > 0: the last group padded (one group of a row that short would cost > 8 bits a
    # weight, which the scheme refuses)
    k = groups * gs - (pad if groups > 1 else 0)
    qt, b = _qtensor(n, k, gs, symmetric, zero, scale_dtype, seed=n * 100 + k + m)
    w = qt.dequantize(torch.float32)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m + k))
    x = x.to(torch.bfloat16) if bf16 else x
    b = b if bias else None
    y = int4_gemv.int4_gemv_c(x, _prepared(qt), b)
    assert y.dtype == x.dtype and y.shape == (m, n)
    xd, wd, bd = x.double(), w.double(), 0 if b is None else b.double()
    exact = xd @ wd.T + bd
    mag = xd.abs() @ wd.abs().T + (0 if b is None else bd.abs())
    bound = (-(-k // 16) + 5) * U * 1.01 * mag
    if bf16:
        bound = bound * (1 + 2**-8) + 2**-8 * exact.abs()
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), float((err - bound).max())
    reference = F.linear(x.float(), w, b)
    assert ((y.double() - reference.double()).abs() <= bound + k * U * 1.01 * mag).all()


@needs_lib
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("gs, k", [(32, 96), (64, 100), (128, 256), (256, 300)])
def test_in_register_weights_are_the_references_bit_for_bit(symmetric, gs, k):
    """The identity as input picks out single weights: every one equals the reference's float32
    dequantized weight exactly (the table holds (u - z) * s rounded once, as the reference)."""
    qt, _ = _qtensor(21, k, gs, symmetric, "float", "float16", seed=gs)
    y = int4_gemv.int4_gemv_c(torch.eye(k), _prepared(qt))
    assert torch.equal(y.T, qt.dequantize(torch.float32))


@needs_lib
def test_int4_gemv_threads_split_tiles_with_the_same_result():
    qt, b = _qtensor(203, 512, 128, False, "float", "float16", seed=1)
    p, x = _prepared(qt), torch.randn(6, 512)
    one, two = with_1_and_2_threads(lambda: int4_gemv.int4_gemv_c(x, p, b))
    assert torch.equal(one, two)  # each output is summed by one thread in one order


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape, opts",
    [((40, 256), {"group_size": 32}), ((96, 512), {"symmetric": True}),
     ((17, 256), {"zero": "int", "method": "rtn"})],
)  # fmt: skip
def test_torch_cpu_int4_runs_the_c_gemv_below_its_crossover(dtype, shape, opts):
    """Few rows: the C GEMV for any N (N % 16 != 0 ran the GEMM path at every M before), in
    float32 arithmetic: a float32 input matches the reference backend to float32 rounding, a
    bfloat16 one the reference of its float32 value to one output rounding."""
    n, k = shape
    fast, ref = fast_and_reference(n, k, "int4-group", opts)
    p = fast[0].prepared()
    first = cpu_kernels.crossover("int4-gemv-c", n, k)
    own = bf16_gemm.fits_int4(n, k, p.tensors["gs"]) and bf16_gemm.bf16_gemm_library()
    own = own and cpu_schedule.compute() == torch.bfloat16
    gemm = "int4-gemm-bf16" if own else "int4-gemm-c" if cpu_schedule.native() else "int4-gemm"
    assert p.pick(1) == p.pick(first - 1) == "int4-gemv-c" and p.pick(first) == gemm
    entry = Engine().plan(nn.Sequential(nn.Linear(k, n)), scheme="int4-group", scheme_options=opts)
    kernels = entry.get("0").kernels
    assert kernels[0] == f"M 1-{first - 1}: {int4_gemv.DESCRIPTIONS['int4-gemv-c']}"
    assert kernels[1].startswith((f"M >= {first}: int4 rows -> ", f"M {first}-"))
    assert "int4 rows -> " in kernels[1]
    assert_gemv_rows_match_reference(fast, ref, n, k, dtype, range(1, 10))


@needs_lib
def test_without_the_c_gemm_the_gemv_hands_over_at_the_torch_op_crossover(monkeypatch):
    monkeypatch.setattr(cpu_schedule, "dequant_library", lambda: None)
    monkeypatch.setattr(cpu_schedule, "bf16_gemm_library", lambda: None)
    monkeypatch.setattr(cpu_schedule, "f32_gemm_library", lambda: None)
    fast, ref = fast_and_reference(64, 256, "int4-group", {})
    first = cpu_kernels.crossover("int4", 64, 256)
    p = fast[0].prepared()
    assert (p.pick(first - 1), p.pick(first)) == ("int4-gemv-c", "int4-gemm")
    x = torch.randn(first, 256)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < 2e-2


def test_without_the_int4_gemv_library_int4_runs_torchs_kernel(monkeypatch):
    monkeypatch.setattr(cpu_schedule, "int4_gemv_library", lambda: None)
    fast, ref = fast_and_reference(96, 256, "int4-group", {})
    p = fast[0].prepared()
    assert p.pick(1) == "int4" and "w4" not in p.tensors and "packed" in p.tensors
    entry = Engine().plan(nn.Sequential(nn.Linear(256, 96)), scheme="int4-group").get("0")
    assert entry.kernels[0].startswith("M 1-") and "_weight_int4pack_mm_for_cpu" in entry.kernels[0]
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < 1.5e-2  # bfloat16 inputs on torch's kernel
    entry = Engine().plan(nn.Sequential(nn.Linear(256, 40)), scheme="int4-group").get("0")
    assert len(entry.kernels) == 1 and entry.kernels[0].startswith("any M: int4 rows")


def test_the_library_says_why_it_cannot_run_on_a_cpu_without_avx512(monkeypatch):
    monkeypatch.setattr(native, "cpu_flags", lambda: {"sse2", "avx2"})
    assert int4_gemv.INT4_GEMV.build() == (None, "CPU lacks avx512f, avx512bw")


def test_the_gemvs_prefetch_distance_follows_the_cpu_vendor(monkeypatch):
    """Each GEMV is built with the prefetch distance tuned for this CPU's vendor, and a build
    for another vendor is another library (the flag is part of the cache key)."""
    from monoquant_plugins.backends import gemv

    intel = native.cpu_vendor() == "GenuineIntel"
    assert gemv.GEMV.isa[-1] == f"-DPF_AHEAD={8192 if intel else 32768}"
    assert int4_gemv.INT4_GEMV.isa[-1] == f"-DPF_AHEAD={4096 if intel else 16384}"
    monkeypatch.setattr(native, "cpu_vendor", lambda: "GenuineIntel")
    assert native.prefetch_flag(amd=32768, intel=8192) == "-DPF_AHEAD=8192"
    monkeypatch.setattr(native, "cpu_vendor", lambda: "AuthenticAMD")
    assert native.prefetch_flag(amd=32768, intel=8192) == "-DPF_AHEAD=32768"
