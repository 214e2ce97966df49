"""monoquant-example, installed: discovered, used from the CLI and Python, saved and loaded."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from monoquant_example.nf4 import LEVELS

import monoquant_core as mq
from monoquant_core import Engine, FormatError
from monoquant_core.testing import mlp


def test_monoquant_plugins_lists_the_distribution():
    script = Path(sys.executable).with_name("monoquant")  # the installed console script
    if script.exists():
        cmd = [str(script), "plugins"]
    else:
        cmd = [sys.executable, "-c", "from monoquant_core.cli import main; main()", "plugins"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    want = ["example", "monoquant-example", "0.1.0", "scheme:", "nf4;", "options:", "example"]
    assert want in rows, proc.stdout


def test_quantize_nf4_from_the_cli(cli_runner, tmp_path):
    out = tmp_path / "demo-nf4.safetensors"
    res = cli_runner.invoke(
        "quantize", "--demo", "--scheme", "nf4", "--example-verbose", "-o", str(out)
    )
    assert res.exit_code == 0, res.output
    assert "bundled demo TinyTransformer: nf4 / minmax" in res.stdout
    assert "example: lm_head.weight: nf4 " in res.stderr
    info = json.loads(cli_runner.invoke("inspect", str(out), "--json").stdout)
    assert info["producers"]["example"] == {"distribution": "monoquant-example", "version": "0.1.0"}
    assert {t["scheme"] for t in info["tensors"] if t["quantized"]} == {"nf4"}


def test_scheme_options_from_the_cli(cli_runner):
    res = cli_runner.invoke(
        "quantize", "--demo", "--scheme", "nf4", "--scheme-opt", "group_size=128", "--json"
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["config"]["scheme_config"]["group_size"] == 128
    assert "example" not in report["extra"]  # --example not given
    res = cli_runner.invoke("plan", "--demo", "--scheme", "nf4", "--scheme-opt", "group_size=48")
    assert res.exit_code == 1
    assert "does not support group size 48 (supported: 32, 64, 128, 256)" in res.stderr


def test_options_from_python_and_the_generated_flags(cli_runner, capsys):
    _, report = Engine().quantize(mlp(), scheme="nf4", plugin_options={"example": {}})
    assert report.extra["example"] == {"nf4_layers": 3}
    assert "example: 0.weight: nf4 " in capsys.readouterr().err
    _, report = Engine().quantize(
        mlp(), scheme="nf4", plugin_options={"example": {"verbose": False}}
    )
    assert "example" not in report.extra
    res = cli_runner.invoke("quantize", "--demo", "--scheme", "nf4", "--example", "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["extra"]["example"]["nf4_layers"] > 0
    res = cli_runner.invoke("plan", "--demo", "--example-opt", "loud=1")
    assert res.exit_code == 1
    assert "unknown option 'loud' for plugin 'example' (valid keys: enable, verbose)" in res.stderr


def test_python_api_save_and_load(tmp_path, tiny_models, assert_roundtrip_exact):
    tm = tiny_models["transformer"]
    qmodel = mq.quantize(tm.build(), scheme="nf4", scheme_options={"group_size": 32})
    path = str(tmp_path / "block.safetensors")
    mq.save(qmodel, path)
    loaded = mq.load(path, tm.build())
    with torch.no_grad():
        assert torch.equal(loaded(tm.inputs), qmodel(tm.inputs))
    assert_roundtrip_exact(qmodel, tm.build, tm.inputs)


def test_loading_without_the_plugin_names_the_package(tmp_path):
    path = str(tmp_path / "mlp.safetensors")
    mq.save(mq.quantize(mlp(), scheme="nf4"), path)
    without = Engine(disable=["monoquant-example"])
    with pytest.raises(FormatError, match="pip install monoquant-example"):
        mq.load(path, mlp(), engine=without)
    # nf4 is a codebook layout, not affine: without the plugin it cannot even be dequantized
    with pytest.raises(FormatError, match="pip install monoquant-example"):
        mq.load(path, dequantize=True, engine=without)


def test_codebook_values_are_exact_and_packed_low_nibble_first(mq_engine):
    levels = torch.tensor(LEVELS)
    w = torch.stack([levels * 0.5, levels.flip(0) * 2.0, torch.zeros(16)]).repeat(1, 2)  # [3, 32]
    config = mq_engine.scheme_config("nf4", {"group_size": 32})
    qt = mq_engine.quantize_weight(w, "nf4", "minmax", scheme_config=config)
    assert qt.meta["layout"] == "custom" and qt.bits_per_weight == 4.5
    assert torch.equal(mq_engine.schemes.get("nf4").dequantize(qt), w)
    assert qt.qdata[0, 0].item() == 0 | (1 << 4)  # codes 0 and 1, low nibble first
    # absmax per group; an all-zero group gets minmax's scale 1, i.e. absmax 1 * qmax = 7
    assert torch.equal(qt.scale, torch.tensor([[0.5], [2.0], [7.0]], dtype=torch.float16))
