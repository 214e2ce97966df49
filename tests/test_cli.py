"""The command line: the main job on the bundled model, errors as one line with exit code 1."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from monoquant_plugins.safetensors_format import write_safetensors

import monoquant_core as mq
from monoquant_core import Engine
from monoquant_core.cli import build_cli
from monoquant_core.demo import demo_inputs, demo_model


@pytest.fixture
def run(engine):
    cli = build_cli(engine)

    def invoke(*args):
        return CliRunner().invoke(cli, list(args))

    return invoke


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


def test_quantize_writes_report_json(run, tmp_path):
    rep = tmp_path / "r.json"
    res = run("quantize", "--demo", "--skip", "lm_head", "--report", str(rep), "-q")
    assert res.exit_code == 0, res.output
    assert res.output == ""
    data = json.loads(rep.read_text())
    assert len(data["layers"]) == 24
    assert {"name": "lm_head", "reason": "matched skip pattern 'lm_head'"} in data["skipped"]
    assert data["extra"]["output_sqnr_db"] > 25
    assert data["min_sqnr_db"] > 35


def test_quantize_json_output_and_scheme_opts(run):
    res = run("quantize", "--demo", "--scheme-opt", "granularity=per-tensor", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["config"]["scheme_config"]["granularity"] == "per-tensor"


def test_plan_json(run):
    res = run("plan", "--demo", "--only", "blocks.0.*", "--json")
    assert res.exit_code == 0, res.output
    entries = json.loads(res.output)["entries"]
    assert sum(e["action"] == "quantize" for e in entries) == 6


def test_plugins_lists_builtins(run):
    res = run("plugins")
    assert res.exit_code == 0 and "safetensors" in res.output and "monoquant" in res.output
    data = json.loads(run("plugins", "--json").output)
    assert {p["name"] for p in data["plugins"]} >= {"int8", "minmax", "linear", "reference"}


def test_version(run):
    res = run("--version")
    assert res.exit_code == 0 and mq.__version__ in res.output


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
def test_errors_are_one_line_with_exit_code_1(run, args, needle):
    res = run(*args)
    assert res.exit_code == 1, res.output
    assert res.output.startswith("monoquant: problem: ")
    assert needle in res.output and "fix: " in res.output
    assert res.output.count("\n") == 1 and "Traceback" not in res.output


def test_existing_output_needs_overwrite(run, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    res = run("quantize", "--demo", "-o", str(out))
    assert res.exit_code == 1 and "already exists" in res.output
    assert out.read_bytes() == b"keep me"
    assert run("quantize", "--demo", "-o", str(out), "--overwrite", "-q").exit_code == 0
    assert out.read_bytes() != b"keep me"


def test_model_factory_and_weights(run, tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(
        textwrap.dedent(
            """
        import torch
        def build():
            nn = torch.nn
            return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
        """
        )
    )
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(4)
    trained = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    write_safetensors(str(tmp_path / "w.safetensors"), trained.state_dict(), {})
    torch.save(trained.state_dict(), tmp_path / "w.pt")
    for weights in ("w.safetensors", "w.pt"):
        out = tmp_path / f"q-{weights}.safetensors"
        res = run("quantize", "--model", "mymodels:build", "--weights", weights, "-o", str(out))
        assert res.exit_code == 0, res.output
        import mymodels

        q = mq.load(str(out), mymodels.build())
        x = torch.randn(3, 8)
        assert mq.sqnr_db(trained(x), q(x)) > 30
    torch.save(trained, tmp_path / "pickled.pt")
    res = run("quantize", "--model", "mymodels:build", "--weights", "pickled.pt")
    assert res.exit_code == 1 and "weights_only=True" in res.output
    bad = torch.nn.Linear(3, 3)
    write_safetensors(str(tmp_path / "bad.safetensors"), bad.state_dict(), {})
    res = run("quantize", "--model", "mymodels:build", "--weights", "bad.safetensors")
    assert res.exit_code == 1 and "does not fit the model" in res.output


def test_plugin_cli_option_names_are_checked():
    from monoquant_core.cli import PluginOptionGroup
    from monoquant_core.errors import PluginLoadError

    group = PluginOptionGroup("my-plugin", keys=("enable", "level"))
    group.add_option("--my-plugin-level", type=int)  # parameter my_plugin_level -> key "level"
    group.add_option("--my-plugin-on", "my_plugin_enable", is_flag=True, default=None)
    assert [o.name for o in group.options] == ["my_plugin_level", "my_plugin_enable"]
    with pytest.raises(PluginLoadError, match="does not start with '--my-plugin-'"):
        group.add_option("--level", type=int)
    with pytest.raises(PluginLoadError, match="does not start with '--my-plugin-'"):
        group.add_option("--my-plugin", is_flag=True)  # generated by the core
    with pytest.raises(PluginLoadError, match="for key 'colour', which its options do not have"):
        group.add_option("--my-plugin-colour")
    with pytest.raises(PluginLoadError, match="registers no options"):
        PluginOptionGroup("other").add_option("--other-level", type=int)
