"""atomic.py: a file or folder output appears complete or not at all (also through ``save`` and
checkpoint mode), and output paths are checked before any work."""

from __future__ import annotations

import os
import stat

import pytest
from monoquant_plugins.safetensors_format import write_safetensors

import monoquant_core as mq
from monoquant_core import Run, UsageError
from monoquant_core.atomic import atomic_folder, atomic_write, check_output_path
from tests.helpers import (
    small_state,
    tree,
    write_folder,
)


@pytest.mark.parametrize("kind", ["file", "folder", "folder-overwrite"])
def test_crash_midway_leaves_nothing(engine, tmp_path, monkeypatch, kind):
    sd = small_state()
    if kind == "file":
        src = tmp_path / "model.safetensors"
        write_safetensors(str(src), sd, {})
        dst = tmp_path / "out.safetensors"
    else:
        src = tmp_path / "src"
        write_folder(src, sd, n_shards=3)
        dst = tmp_path / "out"
    if kind == "folder-overwrite":
        dst.mkdir()
        (dst / "previous.txt").write_text("previous output")
    before = sorted(os.listdir(tmp_path))
    real = Run.quantize_weight
    calls = []

    def crash_on_third(self, *args, **kwargs):
        calls.append(args[-1])
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Run, "quantize_weight", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.quantize_checkpoint(str(src), str(dst), overwrite=True, progress=False)
    assert len(calls) == 3
    assert sorted(os.listdir(tmp_path)) == before
    if kind == "folder-overwrite":
        assert tree(dst) == {"previous.txt"}
    else:
        assert not dst.exists()


def test_output_in_missing_directory_writes_nothing(tmp_path, saved):
    _, qmodel = saved
    target = tmp_path / "missing" / "x.safetensors"
    with pytest.raises(UsageError, match="does not exist.*mkdir -p"):
        mq.save(qmodel, str(target))
    assert not target.parent.exists()


def test_failed_write_leaves_nothing_behind(tmp_path, saved, monkeypatch):
    _, qmodel = saved
    from monoquant_plugins.safetensors_format import SafetensorsSerializer

    def half_write(self, artifact, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("killed midway")

    monkeypatch.setattr(SafetensorsSerializer, "write", half_write)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="killed midway"):
        mq.save(qmodel, str(out / "m.safetensors"))
    assert os.listdir(out) == []


def test_existing_output_is_kept_without_overwrite(tmp_path, saved):
    path, qmodel = saved
    before = path.read_bytes()
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        mq.save(qmodel, str(path), overwrite=False)
    assert path.read_bytes() == before


def test_check_output_path(tmp_path):
    assert check_output_path(str(tmp_path / "a.bin")) == str(tmp_path / "a.bin")
    with pytest.raises(UsageError, match="is a directory"):
        check_output_path(str(tmp_path))
    with pytest.raises(UsageError, match="does not exist"):
        check_output_path(str(tmp_path / "no" / "a.bin"))
    (tmp_path / "a.bin").write_bytes(b"x")
    check_output_path(str(tmp_path / "a.bin"), overwrite=True)
    with pytest.raises(UsageError, match="already exists"):
        check_output_path(str(tmp_path / "a.bin"), overwrite=False)


def test_atomic_write_renames_a_complete_file_with_normal_permissions(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    seen = []

    def write(tmp):
        seen.append(tmp)
        assert os.path.dirname(tmp) == str(tmp_path) and target.read_bytes() == b"old"
        with open(tmp, "wb") as f:
            f.write(b"new")

    atomic_write(str(target), write)
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    assert not os.path.exists(seen[0])
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_turns_an_os_error_into_a_usage_error_and_cleans_up(tmp_path):
    def full(tmp):
        raise OSError(28, "No space left on device")

    with pytest.raises(UsageError, match="cannot write .*out.bin.*: No space left on device"):
        atomic_write(str(tmp_path / "out.bin"), full)
    assert os.listdir(tmp_path) == []


def test_atomic_folder_replaces_a_folder_as_a_whole(tmp_path):
    dst = tmp_path / "out"

    def build(files):
        def fill(tmp):
            for name in files:
                (tmp_path / tmp / name).write_text(name)

        return fill

    atomic_folder(str(dst), build(["a", "b"]), overwrite=False)
    assert tree(dst) == {"a", "b"}
    with pytest.raises(UsageError, match="already exists"):
        atomic_folder(str(dst), build(["c"]), overwrite=False)
    assert tree(dst) == {"a", "b"} and os.listdir(tmp_path) == ["out"]
    atomic_folder(str(dst), build(["c"]), overwrite=True)
    assert tree(dst) == {"c"} and os.listdir(tmp_path) == ["out"]

    def crash(tmp):
        (tmp_path / tmp / "half").write_text("x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_folder(str(dst), crash, overwrite=True)
    assert tree(dst) == {"c"} and os.listdir(tmp_path) == ["out"]
