"""inspection.py: ``inspect`` (what a file holds, from headers) and ``verify`` (each tensor
re-read against its original, and when CI should fail)."""

from __future__ import annotations

import math

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors

from monoquant_core import UsageError
from monoquant_core.inspection import render_inspect, render_verify, verify_error, verify_failed
from tests.helpers import SMALL_SELECTED, one_line, stored, write_file


def test_verify_accepts_bit_identical_copies_holding_nan(engine, tmp_path):
    """--allow-nonfinite keeps a NaN tensor bit for bit; verify must not call that copy
    "altered" (torch.equal treats NaN != NaN) and fail the quality gate."""
    w = torch.randn(8, 8)
    w[1, 1] = float("nan")
    src = tmp_path / "in.safetensors"
    write_safetensors(str(src), {"bad.weight": w, "good.weight": torch.randn(8, 8)}, {})
    out = tmp_path / "q.safetensors"
    engine.quantize_checkpoint(str(src), str(out), allow_nonfinite=True, progress=False)
    assert stored(out)["bad.weight"].view(torch.int32).equal(w.view(torch.int32))
    res = engine.verify(str(src), str(out), progress=False)
    print(res["mismatched_copies"], [(r["name"], r["exact"]) for r in res["tensors"]])
    assert res["mismatched_copies"] == []
    assert not verify_failed(res, 10.0)


def test_inspect_reads_the_facts_of_a_quantized_file(engine, small_file, tmp_path):
    src, sd = small_file
    out = tmp_path / "q.safetensors"
    engine.quantize_checkpoint(str(src), str(out), progress=False)
    info = engine.inspect(str(out))
    assert info["format"] == "monoquant" and info["format_version"] == 1
    assert info["shards"] == ["q.safetensors"] and set(info["producers"]) == {"core", "int8"}
    by = {t["name"]: t for t in info["tensors"]}
    assert set(by) == set(sd)
    q = by["model.layers.0.mlp.down_proj.weight"]  # 32x64 int8: 8 bits + a float32 per row
    assert (q["quantized"], q["scheme"], q["bits"], q["shape"]) == (True, "int8", 8, [32, 64])
    assert q["nbytes"] == 32 * 64 + 32 * 4 and q["bits_per_weight"] == 8.5
    norm = by["model.norm.weight"]
    assert (norm["quantized"], norm["dtype"], norm["bits_per_weight"]) == (False, "float32", 32.0)
    tot = info["totals"]
    assert tot["tensors"] == len(sd) and tot["quantized"] == len(SMALL_SELECTED)
    assert tot["bytes"] == sum(t["nbytes"] for t in info["tensors"])
    text = render_inspect(info)
    assert text.splitlines()[0].endswith("q.safetensors: monoquant, format version 1")
    assert f"{len(sd)} tensors, {len(SMALL_SELECTED)} quantized" in text
    plain = engine.inspect(str(src))
    assert plain["format"] == "safetensors (plain)" and plain["format_version"] is None
    assert plain["totals"]["quantized_bits_per_weight"] is None


def test_verify_reports_missing_and_altered_tensors(engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    orig = {"a.weight": torch.randn(16, 32, generator=g), "b.bias": torch.randn(16, generator=g)}
    src = write_file(tmp_path / "o.safetensors", {**orig, "c.weight": torch.ones(4, 4)})
    out = tmp_path / "q.safetensors"
    engine.quantize_checkpoint(str(src), str(out), skip=["c"], progress=False)
    ok = engine.verify(str(src), str(out), progress=False)
    assert [r["name"] for r in ok["tensors"]] == ["a.weight", "b.bias", "c.weight"]
    rows = {r["name"]: r for r in ok["tensors"]}
    assert rows["a.weight"]["scheme"] == "int8" and 35 < rows["a.weight"]["sqnr_db"] < 60
    assert rows["b.bias"]["exact"] and rows["b.bias"]["scheme"] is None
    assert ok["missing"] == [] and ok["min_sqnr_db"] == rows["a.weight"]["sqnr_db"]
    assert not verify_failed(ok, 30.0) and verify_failed(ok, 70.0)
    assert "FAIL" in render_verify(ok, 70.0) and "FAIL" not in render_verify(ok, 30.0)
    # a copy that changed, and a tensor the "quantized" file lacks
    edited = write_file(tmp_path / "e.safetensors", {**orig, "b.bias": orig["b.bias"] + 1})
    bad = engine.verify(str(src), str(edited), progress=False)
    assert bad["missing"] == ["c.weight"] and bad["mismatched_copies"] == ["b.bias"]
    assert bad["min_sqnr_db"] is None and verify_failed(bad, None)
    text = render_verify(bad, None)
    assert "missing from the quantized file: c.weight" in text
    assert "copied tensor differs from the original: b.bias" in text


def _original_and_quantized(engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    orig = {f"l{i}.weight": torch.randn(16, 32, generator=g) for i in range(3)}
    src = write_file(tmp_path / "o.safetensors", orig)
    out = tmp_path / "q.safetensors"
    engine.quantize_checkpoint(str(src), str(out), progress=False)
    return orig, src, out


def test_a_nan_sqnr_fails_the_gate_whatever_the_order(engine, tmp_path):
    """``nan < 20`` is False: a NaN SQNR passed ``--min-sqnr 20``, and ``min()`` over rows
    returned NaN or a number depending on the order."""
    orig, _, out = _original_and_quantized(engine, tmp_path)
    for bad in ("l0.weight", "l2.weight"):  # first and last row
        broken = {k: v.clone() for k, v in orig.items()}
        broken[bad][3, 3] = float("nan")
        broken_src = write_file(tmp_path / f"nan-{bad}.safetensors", broken)
        res = engine.verify(str(broken_src), str(out), progress=False)
        rows = {r["name"]: r for r in res["tensors"]}
        assert (
            math.isnan(rows[bad]["sqnr_db"]) and "the original holds 1 NaN/Inf" in rows[bad]["note"]
        )
        assert math.isnan(res["min_sqnr_db"])
        assert verify_failed(res, 20.0) and verify_failed(res, None)
        assert "FAIL" in render_verify(res, 20.0) and "min SQNR nan dB" in render_verify(res, 20.0)
        err = one_line(verify_error(res, 20.0))
        assert "NaN/Inf in 1 tensor(s)" in err and "finer scheme" not in err


def test_a_copy_holding_inf_is_a_failed_row_not_a_math_domain_error(engine, tmp_path):
    orig = {"a.weight": torch.randn(8, 8), "b.bias": torch.randn(8)}
    src = write_file(tmp_path / "o.safetensors", orig)
    inf = {**orig, "b.bias": orig["b.bias"].clone()}
    inf["b.bias"][0] = float("inf")
    bad = write_file(tmp_path / "b.safetensors", inf)
    res = engine.verify(str(src), str(bad), progress=False)  # raised ValueError before
    row = {r["name"]: r for r in res["tensors"]}["b.bias"]
    assert row["note"] == "the quantized tensor holds 1 NaN/Inf value(s)"
    assert res["mismatched_copies"] == ["b.bias"] and verify_failed(res, None)


def test_extra_tensors_in_the_quantized_file_fail_the_gate(engine, tmp_path):
    orig, src, out = _original_and_quantized(engine, tmp_path)
    more = write_file(tmp_path / "more.safetensors", {**orig, "l9.weight": torch.ones(4, 4)})
    plus = tmp_path / "plus.safetensors"
    engine.quantize_checkpoint(str(more), str(plus), progress=False)
    res = engine.verify(str(src), str(plus), progress=False)
    assert res["extra"] == ["l9.weight"] and res["missing"] == []
    assert verify_failed(res, 20.0)
    assert "not in the original: l9.weight" in render_verify(res, 20.0)
    err = one_line(verify_error(res, 20.0))
    assert "1 tensor(s) not in the original" in err and "do not correspond" in err
    assert verify_error(engine.verify(str(src), str(out), progress=False), 20.0) is None


def test_unrelated_files_are_said_not_to_correspond(engine, tmp_path):
    _, _, out = _original_and_quantized(engine, tmp_path)
    other = write_file(tmp_path / "other.safetensors", {"x.weight": torch.ones(4, 4)})
    with pytest.raises(UsageError) as info:
        engine.verify(str(other), str(out), progress=False)
    msg = one_line(info.value)
    assert "does not correspond to" in msg and "finer scheme" not in msg


def test_render_inspect_survives_provenance_it_does_not_understand():
    info = {
        "path": "/x",
        "format": "monoquant",
        "format_version": 1,
        "producers": {"core": {"distribution": "monoquant", "version": "1"}, "odd": "text"},
        "shards": ["x"],
        "tensors": [],
        "totals": {"tensors": 0, "quantized": 0, "bytes": 0, "quantized_bits_per_weight": None},
    }
    assert "producers: core (monoquant 1), odd ('text')" in render_inspect(info)
