"""The command line with calibration data: --calibration FILE | PKG.MODULE:FN, --sequential."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from monoquant_plugins.safetensors_format import write_safetensors

from monoquant_core.cli import build_cli
from monoquant_core.testing import mlp


@pytest.fixture
def run(engine):
    cli = build_cli(engine)
    return lambda *args: CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def model_args(tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(mlp().state_dict(), weights)
    return ["--model", "monoquant_core.testing.models:mlp", "--weights", weights]


STATIC = ["--scheme-opt", "activations=static"]


def _act_scale(engine, path):
    return engine.load(str(path), mlp())[0].qtensor().extra["act_scale"]


def test_pt_and_safetensors_and_callable_calibration_give_the_same_model(
    run, engine, tmp_path, model_args, monkeypatch
):
    batches = [torch.randn(16, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    pt = tmp_path / "calib.pt"
    torch.save(batches, pt)
    st = tmp_path / "calib.safetensors"
    # names sort numerically: batch 10 would come after batch 2
    write_safetensors(str(st), {str(i): b for i, b in enumerate(batches)}, {"format": "pt"})
    pkg = tmp_path / "calibpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text(
        textwrap.dedent(
            """
            import torch

            def batches():
                for i in range(3):
                    yield torch.randn(16, 32, generator=torch.Generator().manual_seed(i))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "calibpkg", raising=False)
    scales = []
    for i, source in enumerate([pt, st, "calibpkg.data:batches"]):
        out = tmp_path / f"q{i}.safetensors"
        res = run("quantize", *model_args, *STATIC, "--calibration", source, "-o", out)
        assert res.exit_code == 0, res.output
        scales.append(_act_scale(engine, out))
    assert torch.equal(scales[0], scales[1]) and torch.equal(scales[0], scales[2])


def test_sequential_flag(run, engine, tmp_path, model_args):
    pt = tmp_path / "calib.pt"
    torch.save(torch.randn(48, 32), pt)
    out = tmp_path / "q.safetensors"
    res = run("quantize", *model_args, *STATIC, "--calibration", pt, "--sequential", "-o", out)
    assert res.exit_code == 0, res.output
    assert float(_act_scale(engine, out)) > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        ([*STATIC], "activations='static' needs calibration data"),
        (["--sequential"], "sequential=True needs calibration data"),
        (["--calibration", "missing.pt"], "--calibration file 'missing.pt' does not exist"),
        (["--calibration", "nopkg_xyz.mod:fn"], "--calibration: cannot import 'nopkg_xyz.mod'"),
        (["--calibration", "BAD"], "does not exist"),
    ],
)
def test_calibration_errors_are_one_line(run, model_args, extra, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = run("quantize", *model_args, *extra)
    assert res.exit_code == 1
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "fix:" in lines[0], res.output


def test_wrong_shapes_in_a_calibration_file(run, model_args, tmp_path):
    pt = tmp_path / "calib.pt"
    torch.save([torch.randn(8, 31)], pt)
    res = run("quantize", *model_args, *STATIC, "--calibration", pt)
    assert res.exit_code == 1
    assert "calibration batch 0 (inputs 8x31) failed in the model" in res.output


def test_checkpoint_mode_refuses_calibration(run, tmp_path):
    src = tmp_path / "w.safetensors"
    write_safetensors(str(src), {"fc.weight": torch.randn(8, 16)}, {"format": "pt"})
    pt = tmp_path / "c.pt"
    torch.save(torch.randn(4, 16), pt)
    res = run("quantize", src, "-o", tmp_path / "o.safetensors", "--calibration", pt)
    assert res.exit_code == 1 and "checkpoint mode" in res.output and "weight-only" in res.output
