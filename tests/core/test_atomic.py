"""atomic.py: a file or folder output appears complete or not at all (also through ``save`` and
checkpoint mode), and output paths are checked before any work."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import threading

import pytest
from monoquant_plugins.safetensors_format import write_safetensors

import monoquant_core as mq
from monoquant_core import Engine, Run, UsageError, atomic, hookimpl
from monoquant_core.atomic import atomic_folder, atomic_write, check_output_path, current_umask
from tests.helpers import (
    cli_one_line_error,
    one_line,
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
    with pytest.raises(RuntimeError, match="simulated crash") as info:
        engine.quantize_checkpoint(str(src), str(dst), overwrite=True, progress=False)
    assert len(calls) == 3
    if sys.version_info >= (3, 11):
        assert info.value.__notes__ == [f"while quantizing tensor {calls[-1]!r}"]
    # no output and no temporary path; the two finished tensors wait in the journal for
    # --resume (tests/core/test_checkpoint_mode.py)
    partial = f"{dst.name}.monoquant-partial"
    assert sorted(os.listdir(tmp_path)) == sorted([*before, partial])
    assert len(os.listdir(tmp_path / partial / "parts")) == 2
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


# --------------------------------------------------------------------------- concurrent writers


def _race(target, kind, overwrite=False, n=2):
    """``n`` threads write ``target`` at once (all past the "exists" check before any renames);
    returns ``{writer: "ok" | error message}``."""
    barrier = threading.Barrier(n)
    out: dict[int, str] = {}

    def writer(i):
        def write(tmp):
            barrier.wait(timeout=10)
            if kind == "file":
                with open(tmp, "w") as f:
                    f.write(f"writer {i}")
            else:
                with open(os.path.join(tmp, "who"), "w") as f:
                    f.write(f"writer {i}")

        try:
            if kind == "file":
                atomic_write(str(target), write, overwrite=overwrite)
            else:
                atomic_folder(str(target), write, overwrite=overwrite)
            out[i] = "ok"
        except UsageError as e:
            out[i] = one_line(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("kind", ["file", "folder"])
def test_concurrent_writers_never_replace_each_other(tmp_path, monkeypatch, kind, renameat2):
    """Two writers of one path both pass the "exists" check; exactly one wins, the other gets
    a one-line 'already exists' error and its result is not renamed over the winner's."""
    if not renameat2:
        monkeypatch.setattr(atomic, "_renameat2", lambda src, dst: False)
    target = tmp_path / "out"
    out = _race(target, kind)
    print(out)
    assert len(out) == 2 and list(out.values()).count("ok") == 1, out
    loser = next(v for v in out.values() if v != "ok")
    assert "already exists" in loser and "--overwrite" in loser
    winner = next(i for i, v in out.items() if v == "ok")
    text = target.read_text() if kind == "file" else (target / "who").read_text()
    assert text == f"writer {winner}"
    assert os.listdir(tmp_path) == ["out"], "a temporary path was left behind"


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "fallback"])
@pytest.mark.parametrize("existing", ["file", "empty-folder", "folder"])
def test_the_final_rename_never_replaces(tmp_path, monkeypatch, existing, renameat2):
    """The no-replace rename itself: an existing file, empty folder or folder stays as it was
    (a plain ``rename`` replaces a file and an empty folder), and so does the source."""
    if not renameat2:
        monkeypatch.setattr(atomic, "_renameat2", lambda src, dst: False)
    src, dst = tmp_path / "src", tmp_path / "dst"
    if existing == "file":
        src.write_text("new")
        dst.write_text("old")
    else:
        src.mkdir()
        (src / "new").write_text("new")
        dst.mkdir()
        if existing == "folder":
            (dst / "old").write_text("old")
    with pytest.raises(FileExistsError):
        atomic._rename_noreplace(str(src), str(dst), is_dir=existing != "file")
    if existing == "file":
        assert (src.read_text(), dst.read_text()) == ("new", "old")
    else:
        assert tree(src) == {"new"} and tree(dst) == ({"old"} if existing == "folder" else set())
    assert sorted(os.listdir(tmp_path)) == ["dst", "src"]
    dst2 = tmp_path / "dst2"
    atomic._rename_noreplace(str(src), str(dst2), is_dir=existing != "file")
    assert not src.exists() and dst2.exists()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_concurrent_writers_with_overwrite_both_succeed(tmp_path, kind):
    out = _race(tmp_path / "out", kind, overwrite=True)
    assert list(out.values()) == ["ok", "ok"] and os.listdir(tmp_path) == ["out"]


def test_two_checkpoint_runs_to_one_output_one_fails(tmp_path, small_file):
    """The same race through ``quantize_checkpoint``: the first run holds the output's journal
    (locked) while it is in ``monoquant_report``, just before its rename; the second is
    refused at once, without touching the first's work."""
    src, _ = small_file
    holding, release = threading.Event(), threading.Event()

    class Hold:
        @hookimpl
        def monoquant_report(self, report):
            holding.set()
            release.wait(timeout=30)

    dst = tmp_path / "out.safetensors"
    results: list[str] = []

    def first():
        Engine(plugins=[Hold()]).quantize_checkpoint(str(src), str(dst), progress=False)
        results.append("ok")

    t = threading.Thread(target=first)
    t.start()
    assert holding.wait(timeout=30)
    try:
        with pytest.raises(UsageError) as e:
            Engine().quantize_checkpoint(str(src), str(dst), progress=False, resume=True)
        assert f"another run (pid {os.getpid()} on " in one_line(e.value)
        assert "is writing" in one_line(e.value)
    finally:
        release.set()
        t.join(timeout=60)
    assert results == ["ok"]
    assert sorted(os.listdir(tmp_path)) == ["in", "out.safetensors"]
    mq.load(str(dst), dequantize=True)  # complete and readable


# --------------------------------------------------------------------------- permissions


def _readonly(monkeypatch, folder):
    """``folder`` behaves as if read-only (the tests may run as root, who may write anywhere):
    ``os.access`` says no, and creating anything in it fails with EACCES."""
    folder = os.path.abspath(folder)
    real_access, real_open, real_mkdir = os.access, os.open, os.mkdir

    def inside(p):
        return os.path.dirname(os.path.abspath(p)) == folder

    def access(p, mode, *a, **k):
        if os.path.abspath(p) == folder and mode & os.W_OK:
            return False
        return real_access(p, mode, *a, **k)

    def deny(real):
        def call(p, *a, **k):
            if inside(p):
                raise PermissionError(errno.EACCES, "Permission denied", p)
            return real(p, *a, **k)

        return call

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(os, "open", deny(real_open))
    monkeypatch.setattr(os, "mkdir", deny(real_mkdir))


@pytest.mark.parametrize("simulated", [True, False], ids=["simulated", "chmod"])
def test_a_read_only_output_folder_is_one_line_and_writes_nothing(
    engine, cli, tmp_path, monkeypatch, small_file, saved, simulated
):
    src, sd = small_file
    folder_src = tmp_path / "shards"
    write_folder(folder_src, sd, n_shards=2)
    qpath, qmodel = saved
    ro = tmp_path / "ro"
    ro.mkdir()
    if simulated:
        _readonly(monkeypatch, ro)
    else:
        ro.chmod(0o555)
        if os.access(ro, os.W_OK):
            ro.chmod(0o755)
            pytest.skip("this user may write into a mode-0555 folder (root)")
    calls = [
        lambda: engine.quantize_checkpoint(str(src), str(ro / "o.safetensors"), progress=False),
        lambda: engine.quantize_checkpoint(str(folder_src), str(ro / "out"), progress=False),
        lambda: engine.dequantize_checkpoint(str(qpath), str(ro / "d.safetensors"), progress=False),
        lambda: mq.save(qmodel, str(ro / "s.safetensors")),
    ]
    try:
        for call in calls:
            with pytest.raises(UsageError, match=r"cannot write to the output directory .*ro"):
                call()
        # --report in the read-only folder: refused before the model file is written
        out = tmp_path / "model.safetensors"
        res = cli("quantize", src, "-o", out, "-q", "--report", ro / "r.json")
        cli_one_line_error(res, "cannot write to the output directory")
        assert not out.exists()
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_a_temp_path_that_cannot_be_created_is_one_line(tmp_path, monkeypatch):
    """Where ``os.access`` cannot tell (ACLs, a read-only mount it misjudges), creating the
    temporary path fails: still a one-line error, nothing written."""
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    _readonly(monkeypatch, tmp_path)
    monkeypatch.setattr(os, "access", lambda *a, **k: True)
    with pytest.raises(UsageError, match="cannot write .*Permission denied"):
        atomic_write(str(tmp_path / "f"), lambda tmp: None)
    with pytest.raises(UsageError, match="cannot write .*Permission denied"):
        atomic_folder(str(tmp_path / "d"), lambda tmp: None, overwrite=False)
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- modes, leftovers


def test_outputs_honour_the_umask(tmp_path, small_file):
    """A folder output is 0777 minus the umask like ``mkdir`` (never ``mkdtemp``'s 0700), its
    files 0666 minus the umask."""
    src, sd = small_file
    folder_src = tmp_path / "shards"
    write_folder(folder_src, sd, n_shards=2)
    old = os.umask(0o022)
    try:
        Engine().quantize_checkpoint(str(folder_src), str(tmp_path / "out"), progress=False)
        Engine().quantize_checkpoint(str(src), str(tmp_path / "o.safetensors"), progress=False)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "o.safetensors").stat().st_mode) == 0o644
    for name in os.listdir(tmp_path / "out"):
        if name.endswith((".safetensors", ".json")):
            assert stat.S_IMODE((tmp_path / "out" / name).stat().st_mode) == 0o644, name
    assert current_umask() == old


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftovers_of_killed_runs_are_removed_and_said_once(tmp_path, capsys):
    dead, host = _dead_pid(), atomic.host_tag()
    stale = [
        f".out.safetensors.monoquant-tmp-{dead}-{host}-0a1b2c3d",
        f".monoquant-tmp-{dead}-{host}-0a1b2c3d.spool4",
    ]
    keep = [
        f".out.safetensors.monoquant-tmp-{os.getpid()}-{host}-0a1b2c3d",  # this (live) process
        f".out.safetensors.monoquant-tmp-{dead}-0000beef-0a1b2c3d",  # another host's
        ".out.safetensors.abc123.tmp",  # not ours
        "data.bin",
    ]
    for name in stale + keep:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / f".out.monoquant-tmp-{dead}-{host}-0a1b2c3d").mkdir()  # a killed folder build
    (tmp_path / f".out.monoquant-tmp-{dead}-{host}-0a1b2c3d" / "shard").write_bytes(b"x")
    atomic_write(str(tmp_path / "out.safetensors"), lambda tmp: None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "removed 3 temporary path(s)" in err and str(dead) in err
    assert sorted(os.listdir(tmp_path)) == sorted([*keep, "out.safetensors"])
    atomic_write(str(tmp_path / "out.safetensors"), lambda tmp: None)
    assert capsys.readouterr().err == ""
