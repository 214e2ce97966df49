"""cpu-vnni backend: int4-group W4A8 (int8 activations per token) equal to the reference backend
up to float rounding, selected only where it applies, guarded against odd inputs, and a clean
"unavailable, because ..." where the CPU or the C compiler is missing."""

from __future__ import annotations

import os
import stat
import tempfile

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monoquant_plugins.backends import cpu_vnni
from torch import nn

from monoquant_core import CapabilityError, Engine, load, save
from monoquant_core.testing import odd_inputs
from tests.helpers import fast_and_reference, rel_err

AVAILABLE = Engine().backends.get("cpu-vnni").available()
needs_kernel = pytest.mark.skipif(AVAILABLE is not True, reason=f"cpu-vnni: {AVAILABLE}")

W4A8 = {"activations": "dynamic"}


@needs_kernel
@pytest.mark.parametrize("gs", [32, 64, 128, 256])
@pytest.mark.parametrize(
    "extra", [{}, {"symmetric": True}, {"zero": "int", "method": "rtn"}], ids=str
)
@pytest.mark.parametrize("m", [1, 4, 5, 19])
def test_matches_reference_on_the_same_qtensor(gs, extra, m):
    fast, ref = fast_and_reference(80, 512, "int4-group", {"group_size": gs, **W4A8, **extra})
    assert fast[0].backend.name == "cpu-vnni" and ref[0].backend.name == "reference"
    assert torch.equal(fast[0].weight_qdata, ref[0].weight_qdata)  # same QTensor
    x = torch.randn(m, 512)
    with torch.no_grad():
        y, r = fast(x), ref(x)
    # Same int8 codes, exact integer dot products: only float rounding differs.
    assert rel_err(y, r) < 1e-5, f"g{gs} {extra} M={m}: {rel_err(y, r):.2e}"


@pytest.mark.slow  # a stress test; test_matches_reference_on_the_same_qtensor covers each path
@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 70),
    chunks=st.integers(1, 6),
    m=st.integers(0, 9),
    gs=st.sampled_from([32, 64, 128]),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_any_shape_matches_reference(n, chunks, m, gs, scale):
    k = 128 * chunks
    fast, ref = fast_and_reference(
        n, k, "int4-group", {"group_size": gs, **W4A8}, seed=n * 7 + chunks
    )
    x = torch.randn(m, k) * scale
    with torch.no_grad():
        y, r = fast(x), ref(x)
    assert y.shape == r.shape == (m, n)
    if m:
        assert rel_err(y, r) < 1e-5


@needs_kernel
def test_threads_give_identical_results():
    fast, _ = fast_and_reference(256, 1024, "int4-group", {"group_size": 128, **W4A8})
    x = torch.randn(6, 1024)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fast(x)
        torch.set_num_threads(max(2, threads))
        many = fast(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)  # rows are split between threads, each computed the same way


@needs_kernel
def test_odd_inputs_are_guarded():
    fast, ref = fast_and_reference(96, 256, "int4-group", {"group_size": 64, **W4A8})
    for label, x in odd_inputs(256).items():
        with torch.no_grad():
            y, r = fast(x), ref(x)
        assert y.shape == r.shape == (*x.shape[:-1], 96), label
        assert y.dtype == x.dtype, label
        if x.numel():
            bound = 1e-5 if x.dtype == torch.float32 else 2e-2
            assert rel_err(y, r) < bound or not r.any(), f"{label}: {rel_err(y, r):.2e}"


def test_selection_says_why_it_is_not_used():
    model = nn.Sequential(nn.Linear(96, 32))
    opts = {"group_size": 32, **W4A8}
    entry = Engine().plan(model, scheme="int4-group", scheme_options=opts).get("0")
    assert entry.backend == "reference"
    reason = "K % 128 != 0" if AVAILABLE is True else str(AVAILABLE)
    assert any(n.startswith("cpu-vnni: ") and reason in n for n in entry.notes), entry.notes
    q, _ = Engine().quantize(model, scheme="int4-group", scheme_options=opts)
    assert q(torch.randn(2, 96)).shape == (2, 32)


@pytest.mark.parametrize("scheme, opts", [("int4-group", {}), ("int8", W4A8), ("int8", {})])
def test_other_weights_never_mention_it(scheme, opts):
    entry = Engine().plan(nn.Sequential(nn.Linear(256, 64)), scheme=scheme, scheme_options=opts)
    assert entry.get("0").backend == "torch-cpu"
    assert not any("cpu-vnni" in n for n in entry.get("0").notes)


def test_other_backends_decline_w4a8_so_numerics_stay_the_contract():
    model = nn.Sequential(nn.Linear(256, 64))
    engine = Engine(disable=["cpu-vnni"])
    entry = engine.plan(model, scheme="int4-group", scheme_options=W4A8).get("0")
    assert entry.backend == "reference"
    assert any("torch-cpu" in note and "activations='dynamic'" in note for note in entry.notes)


@needs_kernel
def test_save_load_keeps_w4a8(tmp_path):
    fast, _ = fast_and_reference(64, 256, "int4-group", {"group_size": 128, **W4A8})
    x = torch.randn(3, 256)
    with torch.no_grad():
        y = fast(x)
    path = tmp_path / "w4a8.safetensors"
    save(fast, path)
    torch.manual_seed(0)
    loaded = load(path, nn.Sequential(nn.Linear(256, 64)))
    assert loaded[0].backend.name == "cpu-vnni"
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def _script(tmp_path, body):
    path = tmp_path / "cc"
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


@pytest.mark.skipif(cpu_vnni.cpu_reason() is not None, reason="needs an AVX512-VNNI CPU")
def test_failed_build_is_a_reason_not_a_crash(tmp_path, monkeypatch):
    cc = _script(tmp_path, 'echo "--version" >/dev/null; echo "cc: error: no such ISA" >&2; exit 1')
    monkeypatch.setenv("MONOQUANT_CC", cc)
    monkeypatch.setenv("MONOQUANT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    lib, reason = cpu_vnni._build()
    assert lib is None
    assert reason.startswith(f"building the kernel with {cc} failed: ") and "no such ISA" in reason
    assert not list((tmp_path / "cache").glob("*.so"))  # no half-written library left behind


def test_missing_compiler_is_a_reason(monkeypatch):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("MONOQUANT_CC", raising=False)
    monkeypatch.delenv("CC", raising=False)
    lib, reason = cpu_vnni._build()
    assert lib is None
    assert reason == "no C compiler found (install gcc or clang, or set MONOQUANT_CC)" or (
        "CPU" in reason or "x86-64" in reason or "cpuinfo" in reason
    )


@needs_kernel
def test_the_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("MONOQUANT_CACHE_DIR", str(tmp_path))
    lib, reason = cpu_vnni._build()
    assert lib is not None, reason
    (built,) = tmp_path.glob("vnni-*.so")
    mtime = built.stat().st_mtime_ns
    lib2, _ = cpu_vnni._build()
    assert lib2 is not None and built.stat().st_mtime_ns == mtime  # loaded, not rebuilt


def test_pack_chunks_layout():
    codes = torch.randint(0, 16, (3, 256), dtype=torch.uint8)
    packed = cpu_vnni.pack_chunks(codes)
    assert packed.shape == (3, 128)
    c = packed.reshape(3, 2, 64)
    lo, hi = c & 15, c >> 4
    assert torch.equal(torch.cat([lo[:, 0], hi[:, 0], lo[:, 1], hi[:, 1]], 1), codes)


@pytest.mark.skipif(cpu_vnni.cpu_reason() is not None, reason="needs an AVX512-VNNI CPU")
def test_unwritable_cache_is_a_reason_not_an_exception(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("MONOQUANT_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(tempfile, "tempdir", str(blocker / "tmp"))
    lib, reason = cpu_vnni._build()
    assert lib is None and reason.startswith("building the kernel with ")


@needs_kernel
@pytest.mark.parametrize("scheme, opts", [("int4-group", {}), ("int8", W4A8)])
def test_forcing_it_on_other_weights_is_a_clear_error(scheme, opts):
    with pytest.raises(CapabilityError, match="runs int4-group with activations=dynamic"):
        model = nn.Sequential(nn.Linear(256, 64))
        Engine().plan(model, scheme=scheme, scheme_options=opts, backend="cpu-vnni")
