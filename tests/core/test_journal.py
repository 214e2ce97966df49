"""The journal of a checkpoint run: exact part round trips, checksums, damaged records."""

from __future__ import annotations

import os
import zlib

import pytest
import torch
from safetensors import safe_open

from monoquant_core import UsageError
from monoquant_core.journal import Journal, checksum, work_folder
from monoquant_core.parts import decode_part, encode_part
from monoquant_core.report import LayerReport
from tests.helpers import int8_qtensor, one_line, quantize_tensor


def _layer(name: str) -> LayerReport:
    return LayerReport(name, "tensor", "int8", "minmax", "", (4, 8), 32, 128, 36, 9.0, 40.0,
                       0.01, 0.001, 0.1)  # fmt: skip


def round_trip(qt):
    """``qt`` through a part file's bytes and back."""
    chunks, _tensors = encode_part(qt)
    return decode_part(bytearray(b"".join(chunks)))


def _same(a, b) -> None:
    assert (a.bits, a.group_size, a.axis, a.shape, a.dtype, a.scheme, a.meta) == (
        b.bits, b.group_size, b.axis, b.shape, b.dtype, b.scheme, b.meta
    )  # fmt: skip
    assert a.tensors().keys() == b.tensors().keys()
    for role, t in a.tensors().items():
        u = b.tensors()[role]
        assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u), role


@pytest.mark.parametrize(
    "scheme, options",
    [
        ("int8", {}),
        ("int8", {"symmetric": False}),
        ("int4-group", {"group_size": 32}),
        ("int4-group", {"group_size": 64, "zero": "int"}),
        ("int4-group", {"symmetric": True, "scale_dtype": "bfloat16"}),
        ("fp16", {}),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_part_round_trips_every_scheme_exactly(engine, scheme, options, dtype):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(3)).to(dtype)
    qt, _ = quantize_tensor(engine, w, scheme, **options)
    _same(qt, round_trip(qt))


def test_a_part_keeps_extras_and_float_columns():
    qt = int8_qtensor((6, 16))
    qt.extra["float_cols"] = torch.tensor([1, 7], dtype=torch.int64)
    qt.extra["float_values"] = torch.randn(6, 2, dtype=torch.float16)
    qt.meta["note"] = {"nested": [1, 2.5, "x"]}
    _same(qt, round_trip(qt))


def test_checksum_is_crc32_of_the_bytes_for_any_layout():
    t = torch.arange(24, dtype=torch.int16).reshape(4, 6)
    raw = bytes(t.view(torch.uint8).flatten().tolist())
    assert checksum(t) == f"crc32:{zlib.crc32(raw):08x}:48"
    assert checksum(t.t().contiguous().t()) == checksum(t)  # a non-contiguous view: same values
    assert checksum(torch.empty(0)) == "crc32:00000000:0"
    u = t.clone()
    u[2, 3] += 1
    assert checksum(u) != checksum(t)


def test_records_survive_a_cut_line_and_a_damaged_part_is_refused(tmp_path):
    dst = str(tmp_path / "out.safetensors")
    j, _, notes = Journal.start(dst, resume=False, world=1)
    assert notes == [] and os.path.isdir(work_folder(dst))
    qt = int8_qtensor((4, 8))
    settings = {"scheme": "int8"}
    rec = j.add_quantized(0, "a.weight", "crc32:1:2", settings, qt, _layer("a.weight"))
    j.add_float("b.weight", "crc32:3:4", settings, "kept in float: x", nonfinite=False)
    j.flush()  # the part and its line are written in the background
    with open(os.path.join(j.folder, "journal-0.jsonl"), "a") as f:
        f.write('{"name": "c.weight", "input": "crc3')  # a kill in the middle of a line
    recs = j.records()
    assert sorted(recs) == ["a.weight", "b.weight"]
    assert recs["a.weight"][0].layer_report() == _layer("a.weight")
    assert recs["a.weight"][0].facts == qt.facts()
    assert j.part_ok(rec)
    _same(qt, j.load(rec))
    path = os.path.join(j.parts, rec.part)
    with safe_open(path, "pt") as f:  # a part is a plain safetensors file
        assert torch.equal(f.get_tensor("t.qdata"), qt.qdata)
        assert sorted(f.keys()) == ["t.qdata", "t.scale"]
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-1] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))
    assert not j.part_ok(rec)
    with pytest.raises(Exception, match="does not match its checksum"):
        j.load(rec)
    os.remove(path)
    assert not j.part_ok(rec)


def test_start_reuses_or_replaces_an_earlier_journal(tmp_path):
    dst = str(tmp_path / "out")
    j, _, _ = Journal.start(dst, resume=False, world=1)
    j.add_float("x", "crc32:0:0", {}, "r", False)
    j.close()
    j, _, notes = Journal.start(dst, resume=True, world=2)  # kept: --resume
    assert notes == [] and "x" in j.records()
    j.close()
    j, _, notes = Journal.start(dst, resume=False, world=1)  # replaced, and said so
    assert notes and notes[0].startswith("removed the unfinished run's work in")
    assert j.records() == {}
    j.remove()
    assert not os.path.exists(work_folder(dst))
    j, _, notes = Journal.start(dst, resume=True, world=1)
    assert notes == [f"--resume: no unfinished run of {dst}: starting from the beginning"]
    j.close()


def test_a_rank_that_cannot_see_the_journal_says_the_folder_is_not_shared(tmp_path):
    dst = str(tmp_path / "out")
    _, nonce, _ = Journal.start(dst, resume=False, world=2)
    assert Journal.attach(dst, 1, nonce).folder == work_folder(dst)
    with pytest.raises(UsageError) as e:  # another node: an older or a different folder
        Journal.attach(dst, 1, "0" * 16)
    msg = one_line(e.value)
    assert "rank 1 on host" in msg and "not on a file system shared by every rank" in msg, msg
    with pytest.raises(UsageError, match="not on a file system shared"):
        Journal.attach(str(tmp_path / "elsewhere"), 3, nonce)


def test_a_live_run_writing_the_same_output_is_refused_and_a_killed_one_is_not(tmp_path):
    import subprocess
    import sys

    dst = str(tmp_path / "out")
    j, _, _ = Journal.start(dst, resume=False, world=1)
    with pytest.raises(UsageError) as e:  # the same process, another run (a thread)
        Journal.start(dst, resume=True, world=1)
    assert f"another run (pid {os.getpid()} on " in one_line(e.value)
    j.close()
    j, _, _ = Journal.start(dst, resume=True, world=1)
    j.close()
    code = (
        "import sys, time; from monoquant_core.journal import Journal; "
        f"Journal.start({dst!r}, resume=True, world=1); print('locked', flush=True); "
        "time.sleep(60)"
    )
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "locked"
        with pytest.raises(UsageError, match=f"another run \\(pid {other.pid} on "):
            Journal.start(dst, resume=True, world=1)
    finally:
        other.kill()
        other.wait()
    j, _, _ = Journal.start(dst, resume=True, world=1)  # killed: the OS released its lock
    j.close()
