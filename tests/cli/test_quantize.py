"""cli/quantize.py: ``monoquant quantize`` in module mode (``--demo`` / ``--model``, optionally
with calibration data) and checkpoint mode (a file or folder SOURCE): the report as a table or
JSON, what is written, and every bad input as one line that writes nothing."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors
from safetensors import safe_open

import monoquant_core as mq
from tests.helpers import (
    INDEX,
    SMALL_SELECTED,
    STATIC_ARGS,
    act_scale,
    assert_quantized_copy,
    cli_ok,
    cli_one_line_error,
    evil_pickle,
    raw_safetensors,
    small_state,
    tree,
    write_file,
    write_folder,
)

#: the modules of the demo model quantized by default (``lm_head`` included)
DEMO_LAYERS = [
    f"blocks.{i}.{m}"
    for i in range(4)
    for m in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.fc1", "mlp.fc2")
]

# --------------------------------------------------------------------------- module mode


def test_quantize_writes_report_json(cli, tmp_path):
    rep = tmp_path / "r.json"
    res = cli("quantize", "--demo", "--skip", "lm_head", "--report", rep, "-q")
    assert res.exit_code == 0, res.output
    assert res.output == ""
    data = json.loads(rep.read_text())
    assert [layer["name"] for layer in data["layers"]] == [f"{n}.weight" for n in DEMO_LAYERS]
    assert {"name": "lm_head", "reason": "matched skip pattern 'lm_head'"} in data["skipped"]
    assert data["extra"]["output_sqnr_db"] > 25
    assert data["min_sqnr_db"] > 35


def test_quantize_json_output_and_scheme_opts(cli):
    res = cli("quantize", "--demo", "--scheme-opt", "granularity=per-tensor", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["config"]["scheme_config"]["granularity"] == "per-tensor"


def test_existing_output_needs_overwrite(cli, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    res = cli("quantize", "--demo", "-o", out)
    assert res.exit_code == 1 and "already exists" in res.output
    assert out.read_bytes() == b"keep me"
    assert cli("quantize", "--demo", "-o", out, "--overwrite", "-q").exit_code == 0
    assert out.read_bytes() != b"keep me"


def test_sequential_flag(cli, engine, tmp_path, model_args):
    pt = tmp_path / "calib.pt"
    torch.save(torch.randn(48, 32), pt)
    out = tmp_path / "q.safetensors"
    res = cli("quantize", *model_args, *STATIC_ARGS, "--calibration", pt, "--sequential", "-o", out)
    assert res.exit_code == 0, res.output
    assert float(act_scale(engine, out)) > 0


#: a --model factory that leaves a file ``built`` in the working folder when it is called
RECORDING_FACTORY = """
import pathlib
from monoquant_core.testing import mlp

def build():
    pathlib.Path("built").write_text("called")
    return mlp()
"""


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--calibration", "missing.pt"], "--calibration file 'missing.pt' does not exist"),
        (["--calibration", "junk.pt"], "is not loadable with torch.load"),
        (["--calibration", "empty.pt"], "calibration data is empty"),
        (["--sequential"], "--sequential needs --calibration"),
        (["--weights", "missing.pt"], "--weights file 'missing.pt' does not exist"),
        (["--weights", "junk.pt"], "--weights 'junk.pt' is not a plain state_dict"),
        (["--weights", "list.pt"], "holds a list, not a state_dict"),
        (["-o", "no-such-dir/q.safetensors"], "does not exist"),
        (["--report", "no-such-dir/r.json"], "does not exist"),
        (["--scheme", "int4-grup"], "did you mean 'int4-group'?"),
        (["--scheme-opt", "group_sise=32", "--scheme", "int4-group"], "did you mean"),
        (["--rule", "0=int3"], "unknown scheme 'int3'"),
        (["--outlier-opt", "treshold=3"], "did you mean 'threshold'?"),
    ],
)
def test_module_mode_checks_every_argument_before_building_the_model(
    cli, tmp_path, monkeypatch, extra, needle
):
    """Building a real model takes seconds: nothing that can be checked without it waits."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "recording_models", raising=False)
    (tmp_path / "recording_models.py").write_text(RECORDING_FACTORY)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    torch.save([], tmp_path / "empty.pt")
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    torch.save([torch.randn(40, 32)], tmp_path / "calib.pt")
    res = cli("quantize", "--model", "recording_models:build", *extra)
    cli_one_line_error(res, needle)
    assert not (tmp_path / "built").exists(), f"the model was built before: {res.output}"
    cli_ok(cli("quantize", "--model", "recording_models:build", "--calibration", "calib.pt", "-q"))
    assert (tmp_path / "built").exists()  # the factory does record a build


def test_weights_are_for_model_not_demo(cli, tmp_path):
    torch.save({}, tmp_path / "w.pt")
    cli_one_line_error(
        cli("quantize", "--demo", "--weights", tmp_path / "w.pt"), "--weights is for --model"
    )


def test_a_factory_that_raises_is_one_line(cli, tmp_path, monkeypatch):
    (tmp_path / "raising_models.py").write_text("def build():\n    raise OSError('no GPU')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "raising_models", raising=False)
    cli_one_line_error(
        cli("quantize", "--model", "raising_models:build"),
        "--model 'raising_models:build' raised OSError: no GPU",
    )


def test_table_output_names_the_model_the_components_and_where_it_went(cli, tmp_path):
    text = cli_ok(cli("quantize", "--demo", "--only", "blocks.0.mlp.*"))
    lines = text.splitlines()
    assert lines[0] == "bundled demo TinyTransformer: int8 / minmax"
    assert "blocks.0.mlp.fc1.weight" in text and "blocks.0.attn.q_proj.weight" not in text
    assert "model output vs float32 on sample inputs: SQNR" in text
    assert lines[-1] == "not saved (pass -o FILE.safetensors to save)"


# --------------------------------------------------------------------------- checkpoint mode


def test_quantize_file(cli, tmp_path, small_file):
    src, sd = small_file
    out = tmp_path / "q.safetensors"
    text = cli_ok(cli("quantize", src, "-o", out))
    assert f"saved to {out}" in text and "int8 / minmax" in text
    assert f"kept in float ({len(sd) - len(SMALL_SELECTED)}):" in text
    for name in SMALL_SELECTED:
        assert name in text
    assert_quantized_copy(out, sd, SMALL_SELECTED)


def test_quantize_folder(cli, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    write_folder(src, small_state())
    text = cli_ok(
        cli("quantize", src, "-o", out, "--scheme", "int4-group", "--scheme-opt", "group_size=32")
    )
    assert "int4-group" in text
    assert tree(out) == tree(src) - {"pytorch_model.bin"}
    # a transformers config.json: copied with Mono Quant's quantization_config added
    config = json.loads((out / "config.json").read_text())
    assert config.pop("quantization_config")["quant_method"] == "monoquant"
    assert config == json.loads((src / "config.json").read_text())
    index = json.loads((out / INDEX).read_text())
    stored = {}
    for f in sorted(os.listdir(out)):
        if f.endswith(".safetensors"):
            with safe_open(str(out / f), "pt") as h:
                stored.update(dict.fromkeys(h.keys(), f))
    assert index["weight_map"] == stored
    assert {f"{n}.zero_point" for n in SMALL_SELECTED} <= set(stored)


def test_report_json_and_quiet(cli, tmp_path, small_file):
    src, sd = small_file
    rep = tmp_path / "report.json"
    res = cli("quantize", src, "-o", tmp_path / "q.safetensors", "--report", rep, "--quiet")
    assert cli_ok(res) == "" and res.stderr == ""
    data = json.loads(rep.read_text())
    assert {layer["name"] for layer in data["layers"]} == SMALL_SELECTED
    reasons = {s["name"]: s["reason"] for s in data["skipped"]}
    assert set(reasons) == set(sd) - SMALL_SELECTED
    assert "output head" in reasons["lm_head.weight"]
    assert data["model_bytes_before"] == sum(t.numel() * 4 for t in sd.values())
    print(f"compression {data['compression_ratio']:.2f}x, min SQNR {data['min_sqnr_db']:.2f} dB")
    assert data["compression_ratio"] > 1.3 and data["min_sqnr_db"] > 35
    js = json.loads(cli_ok(cli("quantize", src, "-o", tmp_path / "q2.safetensors", "--json")))
    assert {layer["name"] for layer in js["layers"]} == SMALL_SELECTED


def test_allow_nonfinite_then_verify(cli, tmp_path):
    w = torch.randn(16, 16)
    w[0, 1] = float("nan")
    src = tmp_path / "nan.safetensors"
    write_safetensors(str(src), {"bad.weight": w, "good.weight": torch.randn(16, 16)}, {})
    text = cli_ok(cli("quantize", src, "-o", tmp_path / "q.safetensors", "--allow-nonfinite"))
    assert "bad.weight: contains 1 NaN/Inf value(s): kept in float" in text
    # the NaN tensor is kept bit for bit, so the quality gate must pass
    res = cli("verify", src, tmp_path / "q.safetensors", "--min-sqnr", "10")
    print(res.output)
    assert res.exit_code == 0 and "altered" not in res.output


def test_trust_pickle_flag(cli, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 16))
    torch.save(model, tmp_path / "full.pt")
    res = cli("quantize", tmp_path / "full.pt", "-o", tmp_path / "full.safetensors")
    assert res.exit_code == 1 and "--trust-pickle" in res.output
    cli_ok(
        cli("quantize", tmp_path / "full.pt", "-o", tmp_path / "full.safetensors", "--trust-pickle")
    )
    with safe_open(str(tmp_path / "full.safetensors"), "pt") as f:
        assert "0.weight.qdata" in f.keys()  # noqa: SIM118 - a safe_open handle, not a dict


def test_checkpoint_mode_refuses_calibration(cli, tmp_path):
    src = tmp_path / "w.safetensors"
    write_safetensors(str(src), {"fc.weight": torch.randn(8, 16)}, {"format": "pt"})
    pt = tmp_path / "c.pt"
    torch.save(torch.randn(4, 16), pt)
    res = cli("quantize", src, "-o", tmp_path / "o.safetensors", "--calibration", pt)
    assert res.exit_code == 1 and "checkpoint mode" in res.output and "weight-only" in res.output


# --------------------------------------------------------------------------- bad input


def _lying_header(tmp_path):
    path = tmp_path / "lie.safetensors"
    header = {"a.weight": {"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}}
    raw_safetensors(path, header, bytes(64))
    return path


def _folder_with(tmp_path, edit_index=None, truncate=None):
    src = tmp_path / "src"
    write_folder(src, small_state())
    if edit_index is not None:
        doc = json.loads((src / INDEX).read_text())
        (src / INDEX).write_text(edit_index(doc))
    if truncate:
        shard = src / truncate
        shard.write_bytes(shard.read_bytes()[:-5])
    return src


def _nan(tmp_path):
    w = torch.randn(8, 8)
    w[2, 2] = float("inf")
    path = tmp_path / "nan.safetensors"
    write_safetensors(str(path), {"layer.weight": w}, {})
    return path


def _evil_pt(tmp_path):
    return evil_pickle(tmp_path / "evil.pt", tmp_path.parent / f"{tmp_path.name}-pwned")


def _garbage_pt(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a pickle \x00\x01\x02" * 4)
    return path


def _two_shards_same_name(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_safetensors(str(src / "a.safetensors"), {"x.weight": torch.randn(8, 8)}, {})
    write_safetensors(str(src / "b.safetensors"), {"x.weight": torch.randn(8, 8)}, {})
    return src


def _already_quantized(tmp_path):
    path = write_file(tmp_path / "m.safetensors", {"fc.weight": torch.randn(8, 8)})
    mq.Engine().quantize_checkpoint(str(path), str(tmp_path / "q.safetensors"), progress=False)
    return tmp_path / "q.safetensors"


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "config.json").write_text("{}")
    return d


def _wm_wrong_shard(doc):
    wm = dict(doc["weight_map"])
    wm["lm_head.weight"] = next(v for k, v in wm.items() if v != wm["lm_head.weight"])
    return json.dumps({"weight_map": wm})


# (id, build the source -> path, extra args, needle, output is a folder)
BAD = [
    ("missing-file", lambda t: t / "nope.safetensors", [], "does not exist", False),
    ("no-safetensors", _empty_dir, [], "no .safetensors files", True),
    (
        "index-invalid-json",
        lambda t: _folder_with(t, lambda d: "{oops"),
        [],
        "not valid JSON",
        True,
    ),
    (
        "index-missing-shard",
        lambda t: _folder_with(t, lambda d: json.dumps({"weight_map": {"x": "gone.safetensors"}})),
        [],
        "gone.safetensors",
        True,
    ),
    ("index-wrong-shard", lambda t: _folder_with(t, _wm_wrong_shard), [], "'lm_head.weight'", True),
    (
        "index-metadata-not-object",
        lambda t: _folder_with(t, lambda d: json.dumps({**d, "metadata": "x"})),
        [],
        INDEX,
        True,
    ),
    (
        "truncated-shard",
        lambda t: _folder_with(t, truncate="model-00002-of-00003.safetensors"),
        [],
        "model-00002-of-00003.safetensors",
        True,
    ),
    ("same-name-in-two-shards", _two_shards_same_name, [], "x.weight", True),
    ("header-lies", _lying_header, [], "needs 80 bytes", False),
    ("nan-weight", _nan, [], "--allow-nonfinite", False),
    (
        "1d-by-rule",
        lambda t: write_file(
            t / "m.safetensors", {"fc.weight": torch.randn(8, 8), "fc.bias": torch.randn(8)}
        ),
        ["--rule", "fc.bias=int8"],
        "cannot be quantized",
        False,
    ),
    (
        "empty-by-only",
        lambda t: write_file(
            t / "m.safetensors", {"fc.weight": torch.randn(8, 8), "e.weight": torch.zeros(0, 8)}
        ),
        ["--only", "e"],
        "cannot be quantized",
        False,
    ),
    ("malicious-pickle", _evil_pt, [], "--trust-pickle", False),
    ("garbage-pt-trusted", _garbage_pt, ["--trust-pickle"], "garbage.pt", False),
    ("already-quantized", _already_quantized, [], "already quantized", False),
]


@pytest.mark.parametrize(
    "build, args, needle, folder", [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_input_is_one_line_and_writes_nothing(cli, tmp_path, build, args, needle, folder):
    work = tmp_path / "work"
    work.mkdir()
    src = build(work)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    dst = out_dir / ("q" if folder else "q.safetensors")
    before = tree(tmp_path)
    res = cli("quantize", src, "-o", dst, *args)
    print(res.output)
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.output.startswith("monoquant: problem: ") and res.output.count("\n") == 1
    assert needle in res.output and " fix: " in res.output and "Traceback" not in res.output
    assert res.stdout == ""
    assert tree(tmp_path) == before and os.listdir(out_dir) == []
    assert not (tmp_path / f"{work.name}-pwned").exists()


def test_output_paths(cli, tmp_path, small_file):
    src, sd = small_file
    before = src.read_bytes()
    res = cli("quantize", src, "-o", src, "--overwrite")
    assert res.exit_code == 1 and "is the input" in res.output and res.output.count("\n") == 1
    assert src.read_bytes() == before
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep")
    res = cli("quantize", src, "-o", out)
    assert res.exit_code == 1 and "--overwrite" in res.output and out.read_bytes() == b"keep"
    cli_ok(cli("quantize", src, "-o", out, "--overwrite", "-q"))
    assert set(mq.load(str(out), dequantize=True)) == set(sd)
    folder = tmp_path / "folder"
    write_folder(folder, small_state())
    listing = tree(folder)
    res = cli("quantize", folder, "-o", folder / "inside")
    assert res.exit_code == 1 and "contain one another" in res.output
    assert tree(folder) == listing
    res = cli("quantize", src)
    assert res.exit_code == 1 and "needs an output" in res.output
    res = cli("quantize", src, "--demo", "-o", tmp_path / "x.safetensors")
    assert res.exit_code == 1 and "exclusive" in res.output
    for cmd in (
        ["inspect", tmp_path / "nope"],
        ["plan", tmp_path / "nope"],
        ["verify", src, tmp_path / "nope"],
        ["dequantize", src, tmp_path / "d"],
    ):
        res = cli(*cmd)
        assert res.exit_code == 1 and res.output.startswith("monoquant: problem: "), res.output
        assert res.output.count("\n") == 1 and isinstance(res.exception, SystemExit)


def test_html_report_holds_the_json_report(cli, tmp_path):
    from tests.core.test_evaluation import _html_values

    page, js = tmp_path / "r.html", tmp_path / "r.json"
    res = cli("quantize", "--demo", "--scheme", "int4-group", "--html", page, "--report", js, "-q")
    assert res.exit_code == 0, res.output
    report = json.loads(js.read_text())
    found = _html_values(page.read_text())
    bars = [(d["data-label"], float(d["data-value"])) for d in found["rect"]]
    want = [(la["name"], la["bits_per_weight"]) for la in report["layers"]]
    want += [(la["name"], la["sqnr_db"]) for la in report["layers"]]
    assert bars == want
    assert "<script" not in page.read_text()
