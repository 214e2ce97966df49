"""The one-pass C dequantization kernels (plugins/backends/dequant_kernels.c): each equal to its
torch definition (bit for bit where the definition is a rounding of the same float32 value),
the paths that use them picked above their crossover and within the reference's error bound,
and a clean fallback to the torch-op paths when they cannot be built."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monoquant_plugins.backends import cpu_kernels, cpu_vnni, dequant, torch_cpu
from torch import nn

from monoquant_core import Engine
from monoquant_core.activations import quantize_per_token
from tests.helpers import fast_and_reference, rel_err

LIB, REASON = dequant.DEQUANT.library()
needs_lib = pytest.mark.skipif(LIB is None, reason=f"C dequant kernels: {REASON}")
VNNI = Engine().backends.get("cpu-vnni").available()
needs_vnni = pytest.mark.skipif(VNNI is not True, reason=f"cpu-vnni: {VNNI}")
W4A8 = {"activations": "dynamic"}


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
    monkeypatch.setattr(torch_cpu, "_compute", lambda: torch.bfloat16)
    fast, ref = fast_and_reference(80, 256, "int4-group", opts)
    p = fast[0].prepared()
    first = cpu_kernels.crossover("int4-c", 80, 256)
    assert p.pick(first - 1) == "int4" and p.pick(first) == "int4-gemm-c"
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
    monkeypatch.setattr(torch_cpu, "dequant_library", lambda: None)
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
    monkeypatch.setattr(torch_cpu, "_compute", lambda: torch.bfloat16)
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
    if VNNI is True and LIB is not None:
        model = nn.Sequential(nn.Linear(4096, 64)).to(torch.bfloat16)
        opts = {**W4A8, "group_size": 32}
        entry = Engine().plan(model, scheme="int4-group", scheme_options=opts).get("0")
        assert entry.kernels[1].startswith("M >= 96: ")
