"""The C kernels of torch-cpu and cpu-vnni next to the VNNI one: the one-pass dequantizations
(plugins/backends/dequant_kernels.c), each equal to its torch definition (bit for bit where the
definition is a rounding of the same float32 value), and the int8 GEMV
(plugins/backends/gemv_kernels.c), within float32 rounding of the exact product; the paths that
use them picked on their side of the crossover and within the reference's error bound, and a
clean fallback to the torch paths when they cannot be built."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from monoquant_plugins.backends import cpu_kernels, cpu_schedule, cpu_vnni, dequant, gemv, torch_cpu
from torch import nn

from monoquant_core import Engine
from monoquant_core.activations import quantize_per_token
from tests.helpers import (
    assert_gemv_rows_match_reference,
    cpu_gemm_fixture,
    fast_and_reference,
    rel_err,
    with_1_and_2_threads,
)

#: this file tests the bfloat16 GEMM paths (test_f32_gemm.py the float32 ones)
_bf16_gemms = cpu_gemm_fixture("bf16")


LIB, REASON = dequant.DEQUANT.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"C dequant kernels: {REASON}")
VNNI = Engine().backends.get("cpu-vnni").available()
needs_vnni = pytest.mark.skipif(VNNI is not True, reason=f"cpu-vnni: {VNNI}")
W4A8 = {"activations": "dynamic"}
GEMV_LIB, GEMV_REASON = gemv.GEMV.library()
needs_gemv = pytest.mark.skipif(GEMV_LIB is None, reason=f"C int8 GEMV: {GEMV_REASON}")


def _bf16_of(w: torch.Tensor) -> torch.Tensor:
    return w.to(torch.float32).to(torch.bfloat16)


def _int4_layer(n: int, k: int, gs: int, symmetric: bool, seed: int):
    torch.manual_seed(seed)
    model, _ = Engine().quantize(
        nn.Sequential(nn.Linear(k, n)),
        scheme="int4-group",
        scheme_options={"group_size": gs, "symmetric": symmetric, "method": "rtn"},
        backend="reference",
    )
    return model[0]


@needs_lib
@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 40),
    groups=st.integers(1, 4),
    gs=st.sampled_from([32, 64, 128, 256]),
    symmetric=st.booleans(),
)
def test_int4_rows_equal_the_dequantized_weight_in_bf16(n, groups, gs, symmetric):
    k = gs * groups
    layer = _int4_layer(n, k, gs, symmetric, seed=n + groups)
    qt = layer.qtensor("weight")
    with pytest.MonkeyPatch.context() as mp:  # the conversion path, not the bf16 GEMM
        mp.setattr(cpu_schedule, "bf16_gemm_library", lambda: None)
        mp.setattr(cpu_schedule, "f32_gemm_library", lambda: None)
        t = torch_cpu.TorchCpuBackend().prepare(qt, None).tensors
    out = torch.empty(n, k, dtype=torch.bfloat16)
    LIB.mq_int4_rows_bf16(
        t["codes"].data_ptr(), n, k, gs, t["scale"].data_ptr(), t["zs"].data_ptr(),
        int(t["flip"]), out.data_ptr(),
    )  # fmt: skip
    codes = qt.codes().reshape(n, k).to(torch.float32)
    u = codes + 8 if symmetric else codes
    s = t["scale"].repeat_interleave(gs, dim=1)
    z = t["zs"].repeat_interleave(gs, dim=1)
    expected = torch.addcmul(-z, u, s).to(torch.bfloat16)  # fma(u, s, -zs), rounded once
    assert torch.equal(out, expected)
    w = Engine().schemes.get("int4-group").dequantize(qt)  # the scheme's own dequantization
    assert (out.float() - w).abs().max() <= w.abs().max() * 2**-8


@needs_lib
@needs_vnni
@pytest.mark.parametrize("gs", [32, 64, 128, 256])
@pytest.mark.parametrize("symmetric", [False, True])
def test_chunked_int4_rows_equal_the_vnni_layouts_weight(gs, symmetric):
    n, k = 24, 512
    layer = _int4_layer(n, k, gs, symmetric, seed=gs)
    qt = layer.qtensor("weight")
    p = cpu_vnni.CpuVnniBackend().prepare(qt, None)
    out = torch.empty(n, k, dtype=torch.bfloat16)
    LIB.mq_int4c_rows_bf16(
        p.packed.data_ptr(), n, k, gs, p.scale.data_ptr(), p.offset.data_ptr(), out.data_ptr()
    )
    codes = qt.codes().reshape(n, k).to(torch.float32)
    u = codes + 8 if symmetric else codes
    s = p.scale.repeat_interleave(gs, dim=1)
    o = p.offset.repeat_interleave(gs, dim=1)
    assert torch.equal(out, torch.addcmul(o, u, s).to(torch.bfloat16))


@needs_lib
@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(1, 9),
    k=st.integers(1, 70),
    scale=st.sampled_from([0.0, 1e-30, 1e-3, 1.0, 1e30]),
)
def test_per_token_codes_of_bf16_inputs_are_the_contracts(m, k, scale):
    x = (torch.randn(m, k) * scale).to(torch.bfloat16)
    x[0, 0] = 0.0
    q = torch.empty(m, k, dtype=torch.bfloat16)
    sx = torch.empty(m, dtype=torch.float32)
    LIB.mq_quantize_rows_bf16(x.data_ptr(), m, k, q.data_ptr(), sx.data_ptr())
    codes, xs = quantize_per_token(x)
    assert torch.equal(q.to(torch.int8), codes) and torch.equal(q, codes.to(torch.bfloat16))
    assert torch.equal(sx, xs.reshape(m))


@needs_lib
@settings(max_examples=15, deadline=None)
@given(m=st.integers(1, 6), n=st.integers(1, 50))
def test_row_scaling_rounds_like_torch(m, n):
    y = torch.randn(m, n).to(torch.bfloat16)
    s = torch.rand(m) * 100
    expected = (y.to(torch.float32) * s[:, None]).to(torch.bfloat16)
    LIB.mq_scale_rows_bf16(y.data_ptr(), m, n, s.data_ptr())
    assert torch.equal(y, expected)


@needs_lib
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("opts", [{"group_size": 32}, {"group_size": 128, "symmetric": True}])
def test_torch_cpu_int4_runs_the_c_path_above_its_crossover(dtype, opts, monkeypatch):
    monkeypatch.setattr(cpu_schedule, "compute", lambda: torch.bfloat16)
    fast, ref = fast_and_reference(80, 256, "int4-group", opts)
    p = fast[0].prepared()
    c_gemv = cpu_schedule.int4_gemv_library() is not None  # the C GEMV for few rows (AVX-512)
    first = cpu_kernels.crossover("int4-gemv-c" if c_gemv else "int4-c", 80, 256)
    small = "int4-gemv-c" if c_gemv else "int4"
    assert p.pick(first - 1) == small and p.pick(first) == "int4-gemm-c"
    for m in (first, 600):  # one block, and more rows than a block has
        x = torch.randn(m, 256).to(dtype)
        with torch.no_grad():
            y, r = fast(x), ref(x)
        assert y.dtype == dtype and rel_err(y, r) < 2e-2
        # the C path and the torch-op path compute the same thing
        with torch.no_grad():
            z = cpu_kernels.int4_gemm(x, p).to(dtype)
        assert rel_err(y - fast[0].bias.to(dtype), z) < 1e-2


def test_without_the_library_int4_runs_the_torch_op_path(monkeypatch):
    monkeypatch.setattr(cpu_schedule, "dequant_library", lambda: None)
    monkeypatch.setattr(cpu_schedule, "int4_gemv_library", lambda: None)  # built from the same ISA
    monkeypatch.setattr(cpu_schedule, "bf16_gemm_library", lambda: None)
    monkeypatch.setattr(cpu_schedule, "f32_gemm_library", lambda: None)
    monkeypatch.setattr(cpu_vnni, "dequant_library", lambda: None)
    plan = Engine().plan(nn.Sequential(nn.Linear(256, 64)), scheme="int4-group")
    assert not any("(C" in k for k in plan.get("0").kernels), plan.get("0").kernels
    fast, ref = fast_and_reference(64, 256, "int4-group", {"group_size": 64})
    assert "int4-gemm-c" not in {name for _, name in fast[0].prepared().kernels}
    x = torch.randn(200, 256)
    assert rel_err(fast(x), ref(x)) < 2e-2
    if VNNI is True:
        model = nn.Sequential(nn.Linear(256, 64)).to(torch.bfloat16)
        entry = Engine().plan(model, scheme="int4-group", scheme_options=W4A8).get("0")
        assert len(entry.kernels) == 1 and "VNNI" in entry.kernels[0]


@needs_lib
@needs_vnni
@pytest.mark.parametrize("k", [256, 1024])
def test_w4a8_bf16_inputs_take_the_gemm_path_from_its_crossover(k):
    torch.manual_seed(k)
    base = nn.Sequential(nn.Linear(k, 72)).to(torch.bfloat16)
    state = base.state_dict()
    fast, _ = Engine().quantize(base, scheme="int4-group", scheme_options=W4A8)
    other = nn.Sequential(nn.Linear(k, 72)).to(torch.bfloat16)
    other.load_state_dict(state)
    ref, _ = Engine().quantize(other, scheme="int4-group", scheme_options=W4A8, backend="reference")
    first = cpu_vnni.bf16_gemm_rows(k)
    entry = Engine().plan(nn.Sequential(nn.Linear(k, 72)).to(torch.bfloat16), scheme="int4-group",
                          scheme_options=W4A8).get("0")  # fmt: skip
    assert entry.kernels[0].startswith(f"M 1-{first - 1}: AVX512-VNNI")
    assert entry.kernels[1].startswith(f"M >= {first}: int8 codes x int4 rows")
    for m in (first - 1, first, 700):
        x = torch.randn(m, k).to(torch.bfloat16)
        with torch.no_grad():
            y, r = fast(x), ref(x)
        assert y.dtype == torch.bfloat16 and rel_err(y, r) < 1e-2, (m, rel_err(y, r))


@needs_lib
@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 9), k=st.integers(1, 80))
def test_int8_rows_are_the_dequantized_weight_rounded_once(n, k):
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    s = torch.rand(n) * 0.1
    out = torch.empty(n, k, dtype=torch.bfloat16)
    LIB.mq_int8_rows_bf16(q.data_ptr(), n, k, s.data_ptr(), out.data_ptr())
    assert torch.equal(out, (q.to(torch.float32) * s[:, None]).to(torch.bfloat16))


@needs_lib
@pytest.mark.parametrize("scheme, opts", [("int8", {}), ("int4-group", {"group_size": 64})])
@pytest.mark.parametrize("one_block", [True, False])
def test_c_gemm_paths_fuse_the_bias_and_keep_gradients(scheme, opts, one_block, monkeypatch):
    """One block (``F.linear`` with the bias) and several blocks (GEMMs into the output, then
    the bias): the same result, within the reference's bound, and the input's gradient is the
    reference's (frozen weights, not opaque to autograd)."""
    monkeypatch.setattr(cpu_schedule, "compute", lambda: torch.bfloat16)
    monkeypatch.setenv("MONOQUANT_TORCH_CPU_CROSSOVER", "int8=1,int4=1")
    if not one_block:  # blocks of 500 rows: 3 GEMMs for 1100 output rows
        monkeypatch.setattr(cpu_kernels, "ONE_BLOCK_BYTES", 0)
        monkeypatch.setattr(cpu_kernels, "MIN_GEMM_ROWS", 16)
        monkeypatch.setattr(cpu_kernels, "_BLOCK_BYTES", 500 * 128 * 2)
    rows = cpu_kernels.rows_per_block(128, torch.bfloat16, cpu_kernels.MIN_GEMM_ROWS, 1100)
    assert rows == (1100 if one_block else 500)
    fast, ref = fast_and_reference(1100, 128, scheme, opts)
    p = fast[0].prepared()
    assert p.pick(1) == ("int8-gemm-c" if scheme == "int8" else "int4-gemm-c")
    x = torch.randn(40, 128, requires_grad=True)
    y = fast(x)
    (g,) = torch.autograd.grad(y.square().sum(), x)
    xr = x.detach().clone().requires_grad_(True)
    r = ref(xr)
    (gr,) = torch.autograd.grad(r.square().sum(), xr)
    assert rel_err(y, r) < 1.5e-2 and rel_err(g, gr) < 2e-2


def test_w4a8_gemm_crossover_by_width_and_group_size():
    assert [cpu_vnni.bf16_gemm_rows(k) for k in (384, 1536, 4096)] == [48, 160, 256]
    assert cpu_vnni.bf16_gemm_rows(4096, 32) == 96 and cpu_vnni.bf16_gemm_rows(384, 32) == 48
    own = [cpu_vnni.bf16_gemm_rows(k, 128, own=True) for k in (384, 1536, 2048, 4096)]
    assert own == [16, 32, 48, 64] and cpu_vnni.bf16_gemm_rows(4096, 32, own=True) == 32
    if VNNI is True and LIB is not None:
        model = nn.Sequential(nn.Linear(4096, 64)).to(torch.bfloat16)
        opts = {**W4A8, "group_size": 32}
        entry = Engine().plan(model, scheme="int4-group", scheme_options=opts).get("0")
        # the conversion path from 96 rows; on an AVX512-BF16 CPU the own GEMM from 32 to 768
        assert entry.kernels[1].startswith(("M >= 96: ", "M 32-768: "))


# --------------------------------------------------------------------------- int8 GEMV


def _int8_gemv_case(n: int, k: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    s = torch.rand(n, generator=g) * 0.02 + 1e-4
    return q, s, torch.randn(m, k, generator=g), torch.randn(n, generator=g)


@needs_gemv
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    k=st.one_of(st.sampled_from([16, 32, 48, 256]), st.integers(1, 100)),
    m=st.integers(1, 9),
    bias=st.booleans(),
    bf16=st.booleans(),
)
def test_int8_gemv_is_the_exact_product_within_float32_rounding(n, k, m, bias, bf16):
    """Every output against the float64 product of the same codes, scales and inputs: at most
    the float32 rounding of K products summed, the scale and the bias ((K + 3) ulps of the sum
    of magnitudes), plus one bfloat16 rounding of the output for bfloat16 inputs; and against
    the reference (dequantize, then F.linear in float32) within twice that."""
    q, s, x, b = _int8_gemv_case(n, k, m, seed=n * 1000 + k * 10 + m)
    x = x.to(torch.bfloat16) if bf16 else x
    b = b if bias else None
    p = cpu_kernels.Prepared(n, k, ((1, "int8-gemv-c"),), {"wq": q, "s": s})
    y = gemv.int8_gemv_c(x, p, b)
    assert y.dtype == x.dtype and y.shape == (m, n)
    w, xd, bd = q.double() * s.double()[:, None], x.double(), 0 if b is None else b.double()
    exact = xd @ w.T + bd
    bound = (k + 3) * 2**-24 * (xd.abs() @ w.abs().T + (0 if b is None else bd.abs()))
    if bf16:  # the output rounded once to bfloat16 (8 significant bits): at most 2^-8 of |y|
        bound = bound * (1 + 2**-8) + 2**-8 * exact.abs()
    assert ((y.double() - exact).abs() <= bound).all()
    reference = F.linear(x.float(), q.float() * s[:, None], b)
    assert ((y.double() - reference.double()).abs() <= 2 * bound + 1e-30).all()


@needs_gemv
def test_int8_gemv_threads_split_rows_with_the_same_result():
    q, s, x, b = _int8_gemv_case(203, 300, 6, seed=1)
    p = cpu_kernels.Prepared(203, 300, ((1, "int8-gemv-c"),), {"wq": q, "s": s})
    one, two = with_1_and_2_threads(lambda: gemv.int8_gemv_c(x, p, b))
    assert torch.equal(one, two)  # each row is summed by one thread in one order


@needs_gemv
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 40), (96, 256), (8, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_torch_cpu_int8_runs_the_c_gemv_below_its_crossover(dtype, shape, bias):
    """Weight-only int8 at few rows: the C GEMV for any K (K % 16 != 0 ran the GEMM path
    before), float32 arithmetic: a float32 input matches the reference backend to float32
    rounding, a bfloat16 one the reference of its float32 value to one output rounding."""
    n, k = shape
    fast, ref = fast_and_reference(n, k, "int8", {}, bias=bias)
    p = fast[0].prepared()
    first = cpu_kernels.crossover("int8-c", n, k)
    assert p.pick(1) == p.pick(first - 1) == "int8-gemv-c" and p.pick(first) != "int8-gemv-c"
    entry = Engine().plan(nn.Sequential(nn.Linear(k, n)), scheme="int8").get("0")
    assert entry.kernels[0] == f"M 1-{first - 1}: {gemv.DESCRIPTIONS['int8-gemv-c']}"
    assert_gemv_rows_match_reference(fast, ref, n, k, dtype, range(1, min(first, 9)))


def test_without_the_gemv_library_int8_runs_the_torch_kernel(monkeypatch):
    monkeypatch.setattr(cpu_schedule, "gemv_library", lambda: None)
    fast, ref = fast_and_reference(96, 256, "int8", {})
    assert fast[0].prepared().pick(1) == "int8-weight"
    entry = Engine().plan(nn.Sequential(nn.Linear(256, 96)), scheme="int8").get("0")
    assert entry.kernels[0].startswith("M 1-47: _weight_int8pack_mm"), entry.kernels
    x = torch.randn(3, 256)
    with torch.no_grad():
        assert rel_err(fast(x), ref(x)) < 1.5e-2  # bfloat16 inputs on torch's kernel
    entry = Engine().plan(nn.Sequential(nn.Linear(40, 32)), scheme="int8").get("0")
    assert len(entry.kernels) == 1 and entry.kernels[0].startswith("any M: int8 rows")


@needs_gemv
@settings(max_examples=40, deadline=None)
@given(
    m=st.integers(1, 70),
    k=st.one_of(st.sampled_from([16, 384, 1536]), st.integers(1, 100)),
    pad=st.integers(0, 5),
    zero_row=st.booleans(),
    scale=st.sampled_from([1e-3, 1.0, 1e4]),
)
def test_w8a8_rows_unit_is_torchs_division_bit_for_bit(m, k, pad, zero_row, scale):
    """The C per-token step gives the divisors and quotients the torch ops give (so fbgemm
    gets the same inputs and makes the same codes), on strided rows, tails and zero rows."""
    g = torch.Generator().manual_seed(m * 1000 + k + pad)
    x = (torch.randn(m, k + pad, generator=g) * scale)[:, :k]
    if zero_row:
        x[m // 2] = 0
    out = torch.empty(m, k)
    amax = gemv.rows_unit(x, out)
    ref = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-30)
    assert torch.equal(amax, ref) and torch.equal(out, x / ref)


@needs_gemv
@pytest.mark.parametrize("m", [7, 600])  # one chunk, and two (512 + 88 rows)
def test_w8a8_layers_give_the_same_bits_with_and_without_the_c_step(m):
    fast, _ = fast_and_reference(128, 384, "int8", {"activations": "dynamic"})
    p = fast[0].prepared()
    assert p.tensors["unit"] is gemv.rows_unit
    x = torch.randn(m, 384)
    with torch.no_grad():
        c_step = fast(x)
        del p.tensors["unit"]  # the torch-op division
        torch_ops = fast(x)
    assert torch.equal(c_step, torch_ops)
