"""``kill -9`` during ``monoquant quantize``: no output appears, the input is untouched, and the
temporary paths the killed run could not remove are removed (and said) by the next run.

Each run is a real ``python -m monoquant_core quantize`` process, killed with SIGKILL at points
chosen by what it has written so far (its temporary output exists; a spool file is being
filled; a first shard is complete), not by wall time: the points are reached on a fast machine
as on a slow one. (``tests/core/test_atomic.py`` checks the clean-up rule itself in-process.)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from monoquant_core.atomic import is_temp_name
from tests.helpers import write_file, write_folder

pytestmark = pytest.mark.slow  # each point is a fresh process (~1.5 s of start-up and work)

#: int4-group with the histogram observer: slow enough per tensor that each point is reached
ARGS = ["--scheme", "int4-group", "--observer", "histogram", "-q"]


def _state(n: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(512, 1024, generator=g) * 0.02
        for i in range(n)
    }


def _digest(root) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _start(src, dst) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("MONOQUANT_DISABLE_PLUGINS", None)
    return subprocess.Popen(
        [sys.executable, "-m", "monoquant_core", "quantize", str(src), "-o", str(dst), *ARGS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def _temps(folder) -> list[str]:
    try:
        return [n for n in os.listdir(folder) if is_temp_name(n)]
    except FileNotFoundError:  # the temporary folder was renamed meanwhile
        return []


def _kill_when(proc: subprocess.Popen, ready, what: str) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(
                f"the run ended (exit {proc.returncode}) before {what}: "
                f"{proc.stderr.read().decode()[-500:]}"
            )
        if time.monotonic() - t0 > 120:
            proc.kill()
            raise AssertionError(f"{what} was never reached")
        time.sleep(0.001)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def _spools(folder) -> list[str]:
    return [n for n in _temps(folder) if n.endswith(tuple(f".spool{k}" for k in (1, 2, 4, 8)))]


def _points(kind: str, outdir):
    """``(description, ready)`` kill points, in the order a run reaches them."""

    def inner() -> str | None:
        t = [n for n in _temps(outdir) if os.path.isdir(os.path.join(outdir, n))]
        return os.path.join(outdir, t[0]) if t else None

    def spool_bytes(folder) -> int:
        total = 0
        for n in _spools(folder):
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(os.path.join(folder, n))
        return total

    if kind == "folder":
        return [
            ("the temporary folder exists", lambda: inner() is not None),
            ("a spool is being filled", lambda: inner() is not None and bool(_spools(inner()))),
            (
                "the first shard is complete",
                lambda: (
                    inner() is not None
                    and any(n.endswith(".safetensors") for n in os.listdir(inner()))
                ),
            ),
        ]
    return [
        ("the temporary file exists", lambda: bool(_temps(outdir))),
        ("a spool is being filled", lambda: bool(_spools(outdir))),
        ("the spool holds several tensors", lambda: spool_bytes(outdir) > 3 * 2**20),
    ]


@pytest.mark.parametrize("kind", ["folder", "file"])
def test_kill_9_leaves_no_output_and_the_next_run_cleans_up(tmp_path, kind):
    sd = _state()
    if kind == "folder":
        src = tmp_path / "in" / "model"
        write_folder(src, sd, n_shards=3)
    else:
        src = tmp_path / "in" / "model.safetensors"
        src.parent.mkdir()
        write_file(src, sd, {"format": "pt"})
    before = _digest(tmp_path / "in")
    outdir = tmp_path / "out"
    outdir.mkdir()
    dst = outdir / ("model" if kind == "folder" else "model.safetensors")
    left = 0
    for what, ready in _points(kind, outdir):
        _kill_when(_start(src, dst), ready, what)
        assert not dst.exists(), f"killed when {what}: an output appeared"
        assert _digest(tmp_path / "in") == before, f"killed when {what}: the input changed"
        left = max(left, len(_temps(outdir)))
    assert left, "no kill left a temporary path: the test did not exercise the clean-up"
    done = _start(src, dst)
    _, err = done.communicate(timeout=300)
    err = err.decode()
    assert done.returncode == 0, err
    assert "removed" in err and "temporary path(s)" in err and "killed" in err, err
    assert os.listdir(outdir) == [dst.name], os.listdir(outdir)
    assert _digest(tmp_path / "in") == before
