"""torch-cpu backend: every kernel path within a declared error bound of the reference
backend on the same QTensor, and every unsupported shape or odd input falls back or is
guarded instead of crashing."""

from __future__ import annotations

import pytest
import torch
from monoquant_plugins.backends import bf16_gemm, cpu_schedule
from monoquant_plugins.backends.cpu_schedule import native, own_gemm
from monoquant_plugins.backends.fbgemm_probe import fbgemm_reduce_range
from monoquant_plugins.backends.gemv import gemv_library
from monoquant_plugins.backends.int4_gemv import int4_gemv_library
from monoquant_plugins.backends.torch_cpu import DESCRIPTIONS
from torch import nn

from monoquant_core import Engine
from monoquant_core.testing import odd_inputs
from tests.helpers import fast_and_reference, rel_err

# (scheme, options, relative error bound against the reference backend)
#: fbgemm's W8A8 bound against the 8-bit reference: 2e-2; on CPUs without VNNI (AVX2) it runs
#: 7-bit activation codes (its u8 x s8 pairs saturate otherwise: ``fbgemm_reduce_range``),
#: twice the activation step, so 3e-2
W8A8_BOUND = 3e-2 if fbgemm_reduce_range() else 2e-2
PATHS = [
    ("int8", {"activations": "dynamic"}, W8A8_BOUND),
    ("int8", {"activations": "dynamic-tensor"}, W8A8_BOUND),
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


#: the kernel torch-cpu picks for few rows and for many rows (crossover forced to M = 8)
PICKS = {
    ("int8", "dynamic"): ("int8-dynamic", "int8-dynamic"),
    ("int8", "dynamic-tensor"): ("int8-dynamic-tensor", "int8-dynamic-tensor"),
    ("int8", "none"): (
        "int8-gemv-c" if gemv_library() else "int8-weight",
        "int8-gemm-bf16"
        if own_gemm() == "bf16" and bf16_gemm.fits(96, 256)
        else "int8-gemm-c"
        if native()
        else "int8-gemm",
    ),
    ("int4-group", "none"): (
        "int4-gemv-c" if int4_gemv_library() else "int4",
        "int4-gemm-bf16"
        if own_gemm() == "bf16" and bf16_gemm.fits_int4(96, 256, 128)
        else "int4-gemm-c"
        if native()
        else "int4-gemm",
    ),
    ("fp16", "none"): ("fp16", "fp16"),
    ("bf16", "none"): ("bf16", "bf16"),
}


#: the int8 weight-only kernel of few rows, with and without the C GEMV, as the plan names them
GEMV, PACK = DESCRIPTIONS["int8-gemv-c"], DESCRIPTIONS["int8-weight"]


@pytest.fixture
def crossover_8(monkeypatch):
    """Every GEMM path from M = 8 on, so small test layers exercise both kernels."""
    monkeypatch.setenv("MONOQUANT_TORCH_CPU_CROSSOVER", "int8=8,int4=8")


@pytest.mark.parametrize("scheme, opts, bound", PATHS)
# M = 1 (decode) and 17 (the GEMM path, several row blocks and a remainder); M = 3 is slow
@pytest.mark.parametrize("m", [1, pytest.param(3, marks=pytest.mark.slow), 17])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_paths_match_reference(scheme, opts, bound, m, dtype, crossover_8):
    fast, ref = fast_and_reference(96, 256, scheme, opts)
    assert fast[0].backend.name == "torch-cpu", fast[0].backend.name
    assert torch.equal(fast[0].weight_qdata, ref[0].weight_qdata)  # same QTensor
    small, large = PICKS[(scheme, opts.get("activations", "none"))]
    assert fast[0].prepared().pick(m) == (small if m < 8 else large)
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


@pytest.mark.parametrize("compute", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("scheme, opts", [("int8", {}), ("int4-group", {"group_size": 32})])
def test_gemm_paths_in_float32_on_cpus_without_native_bf16(scheme, opts, compute, monkeypatch):
    monkeypatch.setenv("MONOQUANT_TORCH_CPU_CROSSOVER", "int8=1,int4=1")
    monkeypatch.setattr(
        "monoquant_plugins.backends.cpu_schedule.has_bf16_compute",
        lambda: compute == torch.bfloat16,
    )
    monkeypatch.setenv("MONOQUANT_CPU_GEMM", "bf16" if compute == torch.bfloat16 else "f32")
    monkeypatch.setattr("monoquant_plugins.backends.cpu_schedule.own_gemm", lambda: None)
    fast, ref = fast_and_reference(96, 256, scheme, opts)
    p = fast[0].prepared()
    assert "-gemm" in p.pick(1) and p.tensors["compute"] == compute
    x = torch.randn(5, 256)
    assert rel_err(fast(x), ref(x)) < (1.5e-2 if compute == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize(
    "scheme, opts, shape, kernel",
    [
        ("int8", {}, (32, 40), "any M: int8 rows -> "),
        ("int4-group", {"group_size": 32}, (40, 64), "any M: int4 rows -> "),
    ],
)
def test_shapes_the_gemv_kernels_refuse_run_the_gemm_path_at_every_m(
    scheme, opts, shape, kernel, monkeypatch
):
    # torch's GEMV kernels refuse these shapes; the C GEMVs take any K (int8) and any N (int4),
    # so they are switched off here (test_dequant_kernels.py and test_int4_gemv.py run them)
    monkeypatch.setattr("monoquant_plugins.backends.cpu_schedule.gemv_library", lambda: None)
    monkeypatch.setattr("monoquant_plugins.backends.cpu_schedule.int4_gemv_library", lambda: None)
    n, k = shape
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(k, n))
    entry = Engine().plan(model, scheme=scheme, scheme_options=opts).get("0")
    assert entry.backend == "torch-cpu"
    assert len(entry.kernels) == 1 and entry.kernels[0].startswith(kernel), entry.kernels
    fast, ref = fast_and_reference(n, k, scheme, opts)
    for m in (1, 9):
        x = torch.randn(m, k)
        assert rel_err(fast(x), ref(x)) < 1.5e-2


def test_crossover_table_and_override(monkeypatch):
    from monoquant_plugins.backends.cpu_kernels import crossover

    assert crossover("int8", 384, 384) == 48 and crossover("int8", 4096, 4096) == 16
    assert crossover("int8-c", 384, 384) == 48 and crossover("int8-c", 1536, 384) == 32
    assert crossover("int8-c", 4096, 4096) == 24 and crossover("int8-c", 11008, 4096) == 24
    assert crossover("int4-c", 384, 384) == 48 and crossover("int4-c", 4096, 4096) == 32
    assert crossover("int8", 11008, 4096) == 16 and crossover("int4", 4096, 4096) == 96
    sizes = ((384, 384), (1536, 384), (4096, 4096))
    assert [crossover("int4-gemv-c", n, k) for n, k in sizes] == [48, 32, 32]
    assert crossover("int8-f32", 1536, 384) == 16 and crossover("int8-f32", 4096, 4096) == 24
    assert crossover("int4-f32", 1536, 384) == 16 and crossover("int4-f32", 4096, 4096) == 24
    first, small = (24, GEMV) if gemv_library() else (16, PACK)
    plan = Engine().plan(nn.Sequential(nn.Linear(4096, 4096)), scheme="int8")
    kernels = plan.get("0").kernels
    assert kernels[0] == f"M 1-{first - 1}: {small}"
    own = cpu_schedule.own_gemm()
    if len(kernels) == 3:  # our GEMM, then the conversion path (input out of cache)
        last, dtype = (768, "bf16") if own == "bf16" else (256, "float32")
        panels = "bf16 panels" if own == "bf16" else "fp32 blocks (C, per call) + fp32 FMA"
        assert kernels[1].startswith(f"M {first}-{last}: int8 rows -> {panels}")
        assert kernels[2].startswith(f"M >= {last + 1}: int8 rows -> {dtype} blocks")
    else:
        assert len(kernels) == 2 and kernels[1].startswith(f"M >= {first}: int8 rows -> ")
    monkeypatch.setenv("MONOQUANT_TORCH_CPU_CROSSOVER", "int8=5")  # both int8 paths
    plan = Engine().plan(nn.Sequential(nn.Linear(4096, 4096)), scheme="int8")
    assert plan.get("0").kernels[0] == f"M 1-4: {small}"
    monkeypatch.setattr("monoquant_plugins.backends.cpu_schedule.gemv_library", lambda: None)
    plan = Engine().plan(nn.Sequential(nn.Linear(4096, 4096)), scheme="int8")
    assert plan.get("0").kernels[0] == f"M 1-4: {PACK}"
    monkeypatch.setenv("MONOQUANT_TORCH_CPU_CROSSOVER", "int9=5")
    from monoquant_core import UsageError

    with pytest.raises(UsageError, match="MONOQUANT_TORCH_CPU_CROSSOVER='int9=5'"):
        Engine().plan(nn.Sequential(nn.Linear(4096, 4096)), scheme="int8")


@pytest.mark.parametrize(
    "scheme, opts, shape, reason",
    [
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
def test_odd_inputs_are_guarded(scheme, opts, bound, crossover_8):
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


def test_without_fbgemm_int8_dynamic_runs_int_mm_with_the_same_codes(monkeypatch):
    """torch deprecates the fbgemm quantized ops: without them W8A8 runs on torch._int_mm."""
    monkeypatch.setattr("monoquant_plugins.backends.torch_cpu.fbgemm", lambda: False)
    monkeypatch.setattr("monoquant_plugins.backends.cpu_schedule.fbgemm", lambda: False)
    opts = {"activations": "dynamic"}
    fast, ref = fast_and_reference(96, 256, "int8", opts)
    assert fast[0].backend.name == "torch-cpu"
    assert fast[0].prepared().kind == "int8-dynamic-intmm"
    entry = Engine().plan(nn.Sequential(nn.Linear(256, 96)), scheme="int8", scheme_options=opts)
    assert entry.get("0").kernels == ["any M: torch._int_mm int8 x int8, per-token inputs"]
    for m in (1, 17):
        x = torch.randn(m, 256)
        # same int8 codes, int32 accumulation: only float rounding differs from the reference
        assert rel_err(fast(x), ref(x)) < 1e-5


@pytest.mark.parametrize("n", [16, 80, 1024 + 48])
@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_layout_built_in_row_blocks_equals_torchs_whole_weight_layout(n, symmetric):
    from monoquant_plugins.backends.torch_cpu import _int4pack

    from monoquant_core.layout import pack_int4, unpack_int4

    k = 256
    codes = torch.randint(-8, 8, (n, k)) if symmetric else torch.randint(0, 16, (n, k))
    stored = pack_int4(codes.to(torch.int8 if symmetric else torch.uint8))
    nibbles = unpack_int4(stored, k, signed=False).to(torch.int32)
    want = torch._convert_weight_to_int4pack_for_cpu(nibbles ^ 8 if symmetric else nibbles, 1)
    assert torch.equal(_int4pack(stored, n, k, symmetric), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_dynamic_in_row_chunks_matches_the_reference_and_one_call(dtype, monkeypatch):
    """Many rows go through fbgemm in chunks (temporaries stay in cache); each row keeps its
    own scale, so the result is the reference's within the W8A8 bound, written in the input's
    dtype, for a remainder chunk too."""
    fast, ref = fast_and_reference(96, 256, "int8", {"activations": "dynamic"})
    x = torch.randn(23, 256).to(dtype)
    with torch.no_grad():
        whole = fast(x)
        monkeypatch.setattr("monoquant_plugins.backends.cpu_kernels.CHUNK_ROWS", 5)
        chunked, r = fast(x), ref(x)
    assert chunked.dtype == dtype and chunked.shape == (23, 96)
    assert rel_err(chunked, r) < 2e-2
    # rows are scaled to max |x| = 1 first, so a chunk's per-tensor range barely differs
    assert rel_err(chunked, whole) < 1e-2


def test_fp16_weights_of_a_bf16_model_run_as_its_own_bf16_linear():
    """fbgemm's fp16 kernel takes float32 inputs (0.5x a bf16 nn.Linear from M = 16); fp16
    holds every normal bf16 value exactly, so the bf16 model's layer is reproduced bit for bit."""
    lin = nn.Linear(256, 96, bias=False).to(torch.bfloat16)
    x = torch.randn(17, 256, dtype=torch.bfloat16)
    want = lin(x)
    q, _ = Engine().quantize(nn.Sequential(lin), scheme="fp16")
    p = q[0].prepared()
    assert q[0].backend.name == "torch-cpu" and (p.pick(8), p.pick(16)) == ("fp16", "bf16")
    assert q[0].weight_qdata.dtype == torch.float16  # the file still holds fp16
    with torch.no_grad():
        assert torch.equal(q(x), want)
        assert rel_err(q(x[:8]), want[:8]) < 1e-2  # fbgemm's fp16 kernel for few rows
    plan = Engine().plan(nn.Sequential(nn.Linear(256, 96).to(torch.bfloat16)), scheme="fp16")
    assert plan.get("0").kernels == [
        "M 1-15: fbgemm fp16 weights, fp32 inputs",
        "M >= 16: bf16 F.linear",
    ]
    biased = nn.Linear(256, 96).to(torch.bfloat16)
    x3 = torch.randn(2, 9, 256, dtype=torch.bfloat16)  # 18 rows: the bf16 path
    want = biased(x3)
    q, _ = Engine().quantize(nn.Sequential(biased), scheme="fp16")
    with torch.no_grad():
        assert torch.equal(q(x3), want)  # bias fused as in nn.Linear, leading dims kept


def test_the_plan_says_where_fbgemm_runs_7_bit_input_codes():
    """On a CPU where fbgemm's 8-bit input codes saturate (AVX2 without VNNI) the W8A8 kernel
    note says it runs 7-bit codes; elsewhere the note is the kernel's own."""
    opts = {"activations": "dynamic"}
    plan = Engine().plan(nn.Sequential(nn.Linear(256, 96)), scheme="int8", scheme_options=opts)
    notes = plan.get("0").kernels
    assert any("7-bit input codes" in k for k in notes) == fbgemm_reduce_range(), notes
