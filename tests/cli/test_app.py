"""cli/app.py: the ``monoquant`` command group (version, the console script) and every user
error as one ``monoquant: problem: ... fix: ...`` line with exit code 1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import monoquant_core as mq
from monoquant_core import Engine
from monoquant_core.demo import demo_inputs, demo_model


def test_console_script_demo_end_to_end(tmp_path):
    out = tmp_path / "demo.safetensors"
    exe = os.path.join(os.path.dirname(sys.executable), "monoquant")
    proc = subprocess.run(
        [exe, "quantize", "--demo", "-o", str(out)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert "SQNR" in proc.stdout and "smaller" in proc.stdout and out.exists()
    restored = mq.load(str(out), demo_model())
    expected, _ = Engine().quantize(demo_model())
    x = demo_inputs()
    with torch.no_grad():
        assert torch.equal(restored(x), expected(x))


def test_version(cli):
    res = cli("--version")
    assert res.exit_code == 0 and mq.__version__ in res.output


def test_main_reports_a_usage_error_as_one_line(capsys):
    from monoquant_core.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "--demo", "--scheme", "int3"])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("monoquant: problem: unknown scheme 'int3'") and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (["quantize", "--demo", "--scheme", "int3"], "unknown scheme 'int3' (available: "),
        (["quantize", "--demo", "--observer", "x"], "unknown observer 'x'"),
        (["quantize", "--demo", "--only", "ln_f"], "no installed replacer supports LayerNorm"),
        (["quantize", "--demo", "-o", "/nonexistent-dir/x.safetensors"], "does not exist"),
        (["quantize", "--demo", "--scheme-opt", "bits=4"], "unknown option 'bits'"),
        (["quantize", "--demo", "--scheme-opt", "oops"], "not KEY=VALUE"),
        (["quantize"], "no model given"),
        (["quantize", "--model", "no_such_pkg_xyz:build"], "cannot import 'no_such_pkg_xyz'"),
        (["quantize", "--model", "json"], "not 'package.module:factory'"),
        (["quantize", "--model", "json:nope"], "has no attribute 'nope'"),
        (["plan", "--demo", "--backend", "tpu"], "unknown backend 'tpu'"),
    ],
)
def test_errors_are_one_line_with_exit_code_1(cli, args, needle):
    res = cli(*args)
    assert res.exit_code == 1, res.output
    assert res.output.startswith("monoquant: problem: ")
    assert needle in res.output and "fix: " in res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output
