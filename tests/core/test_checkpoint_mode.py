"""Checkpoint mode's journal in use: resume after a kill, after changed options or inputs,
after a damaged part; every output byte-identical to an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from monoquant_plugins.int8 import Int8Scheme
from monoquant_plugins.safetensors_format import write_safetensors

import monoquant_core as mq
from monoquant_core import Engine, UsageError
from monoquant_core.journal import work_folder
from tests.helpers import one_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PacedInt8(Int8Scheme):
    """``int8`` that takes ``MONOQUANT_TEST_PACE_S`` seconds per tensor (a run slow enough to
    be killed in the middle)."""

    name = "paced-int8"

    def quantize(self, weight, qparams, spec, config):
        time.sleep(float(os.environ.get("MONOQUANT_TEST_PACE_S", "0")))
        qt = super().quantize(weight, qparams, spec, config)
        qt.scheme = self.name
        return qt


class PacedPlugin:
    monoquant_plugin_name = "paced"

    @mq.hookimpl
    def monoquant_register_schemes(self, register):
        register(PacedInt8())


def checkpoint(path, n=12, seed=0, rows=64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"layers.{i:02d}.weight": torch.randn(rows, 128, generator=g) for i in range(n)}
    sd["norm.weight"] = torch.ones(128)
    write_safetensors(str(path), sd, {})
    return sd


def quantize(src, out, **kw) -> mq.QuantReport:
    return Engine(plugins=[PacedPlugin()]).quantize_checkpoint(
        str(src), str(out), scheme="paced-int8", progress=False, **kw
    )


def lines(dst) -> int:
    try:
        with open(os.path.join(work_folder(str(dst)), "journal-0.jsonl")) as f:
            return sum(1 for line in f if line.endswith("\n"))
    except FileNotFoundError:
        return 0


def test_a_killed_run_resumes_to_the_same_bytes_recomputing_only_what_was_unfinished(tmp_path):
    src = tmp_path / "m.safetensors"
    checkpoint(src)
    ref = tmp_path / "ref.safetensors"
    quantize(src, ref)
    out = tmp_path / "out.safetensors"
    code = (
        "from tests.core.test_checkpoint_mode import quantize; "
        f"quantize({str(src)!r}, {str(out)!r})"
    )
    env = {**os.environ, "MONOQUANT_TEST_PACE_S": "0.25", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env)
    try:
        deadline = time.monotonic() + 60
        while lines(out) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not out.exists()
    finished = lines(out)
    assert 4 <= finished < 12
    report = quantize(src, out, resume=True)
    assert report.extra["journal"] == [
        f"resumed: {finished} tensor(s) reused from the unfinished run, {12 - finished} computed"
    ]
    assert out.read_bytes() == ref.read_bytes()
    assert not os.path.exists(work_folder(str(out)))  # removed once the output is committed
    assert [layer.name for layer in report.layers] == [f"layers.{i:02d}.weight" for i in range(12)]


def interrupt_at(src, out, sd, name) -> str:
    """A run of ``sd`` that stops at ``name`` (a NaN in it), then ``src`` fixed again; the
    run's one-line error."""
    bad = dict(sd)
    bad[name] = sd[name].clone()
    bad[name][0, 0] = float("nan")
    write_safetensors(str(src), bad, {})
    with pytest.raises(UsageError) as e:
        quantize(src, out)
    write_safetensors(str(src), sd, {})
    return one_line(e.value)


def test_resume_recomputes_tensors_whose_settings_or_input_changed(tmp_path):
    src = tmp_path / "m.safetensors"
    sd = checkpoint(src)
    out = tmp_path / "out.safetensors"
    # interrupted: layer 07 holds a NaN, so the run stops after finishing layers 00-06; then
    # the checkpoint is fixed and resumed with other rules
    msg = interrupt_at(src, out, sd, "layers.07.weight")
    assert "add --resume to reuse them" in msg
    assert lines(out) == 7
    sd["layers.02.weight"] = sd["layers.02.weight"] * 2  # edited in between
    write_safetensors(str(src), sd, {})
    rules = ["layers.05=int8"]  # another scheme for one finished tensor
    report = quantize(src, out, resume=True, rules=rules)
    assert report.extra["journal"] == [
        "resumed: 5 tensor(s) reused from the unfinished run, 7 computed (1 whose settings "
        "changed, 1 whose input changed)"
    ]
    ref = tmp_path / "ref.safetensors"
    quantize(src, ref, rules=rules)
    assert out.read_bytes() == ref.read_bytes()


def test_resume_recomputes_a_damaged_part_and_ignores_a_cut_journal_line(tmp_path):
    src = tmp_path / "m.safetensors"
    sd = checkpoint(src)
    out = tmp_path / "out.safetensors"
    interrupt_at(src, out, sd, "layers.06.weight")
    folder = work_folder(str(out))
    parts = sorted(os.listdir(os.path.join(folder, "parts")))
    assert len(parts) == 6
    with open(os.path.join(folder, "parts", parts[0]), "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02\x03")
    with open(os.path.join(folder, "journal-0.jsonl"), "a") as f:
        f.write('{"name": "layers.06.weight", "inp')  # a line cut by a power cut
    report = quantize(src, out, resume=True)
    assert report.extra["journal"] == [
        "resumed: 5 tensor(s) reused from the unfinished run, 7 computed (1 whose finished "
        "part was missing or damaged)"
    ]
    ref = tmp_path / "ref.safetensors"
    quantize(src, ref)
    assert out.read_bytes() == ref.read_bytes()


def test_a_run_without_resume_starts_over_and_says_so(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    sd = checkpoint(src, n=4)
    sd["layers.03.weight"][0, 0] = float("nan")
    write_safetensors(str(src), sd, {})
    out = tmp_path / "out.safetensors"
    with pytest.raises(UsageError):
        quantize(src, out)
    assert lines(out) == 3
    with pytest.raises(UsageError):
        Engine(plugins=[PacedPlugin()]).quantize_checkpoint(
            str(src), str(out), scheme="paced-int8", progress=True
        )
    err = capsys.readouterr().err
    assert f"removed the unfinished run's work in {work_folder(str(out))}" in err
    assert lines(out) == 3  # computed again from scratch


def test_a_failure_before_any_tensor_is_finished_leaves_nothing(tmp_path):
    src = tmp_path / "m.safetensors"
    sd = checkpoint(src, n=3)
    sd["layers.00.weight"][0, 0] = float("nan")
    write_safetensors(str(src), sd, {})
    out = tmp_path / "out.safetensors"
    with pytest.raises(UsageError) as e:
        quantize(src, out)
    assert "--resume" not in one_line(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
