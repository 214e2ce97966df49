"""cli/files.py: ``monoquant inspect``, ``verify`` (a CI quality gate) and ``dequantize``."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import monoquant_core as mq
from tests.helpers import (
    INDEX,
    SMALL_SELECTED,
    cli_ok,
    cli_one_line_error,
    returns_within,
    small_state,
    tree,
    write_file,
    write_folder,
)


@pytest.fixture
def quantized(cli, tmp_path, small_file):
    """The int8 checkpoint-mode output of ``small_file``."""
    src, _ = small_file
    out = tmp_path / "q.safetensors"
    cli_ok(cli("quantize", src, "-o", out, "-q"))
    return out


def test_inspect_text_and_json(cli, quantized, small_file):
    text = cli_ok(cli("inspect", quantized))
    print(text)
    assert "monoquant, format version 1" in text
    assert "producers: core (monoquant" in text and "int8 (monoquant" in text
    assert "bits per quantized weight" in text and "bits/w" in text
    info = json.loads(cli_ok(cli("inspect", quantized, "--json")))
    assert info["format"] == "monoquant" and info["format_version"] == 1
    assert set(info["producers"]) == {"core", "int8"}
    by = {t["name"]: t for t in info["tensors"]}
    q = by["model.layers.0.mlp.up_proj.weight"]
    # 64x32 int8: 8 bits per code + one float32 scale per row of 32 = 9 bits per weight
    print(f"bits per weight {q['bits_per_weight']}")
    assert q["quantized"] and q["scheme"] == "int8" and q["bits_per_weight"] == 9.0
    assert by["lm_head.weight"]["bits_per_weight"] == 32.0
    assert info["totals"]["quantized"] == len(SMALL_SELECTED)
    plain = json.loads(cli_ok(cli("inspect", small_file[0], "--json")))
    assert plain["format"] == "safetensors (plain)" and plain["format_version"] is None


def test_verify_gate(cli, quantized, small_file):
    src, _ = small_file
    text = cli_ok(cli("verify", src, quantized, "--min-sqnr", "10"))
    assert "threshold 10.00 dB" in text and "FAIL" not in text
    res = cli("verify", src, quantized, "--min-sqnr", "99")
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    err = res.stderr.splitlines()
    print(res.stderr)
    assert len(err) == 1 and err[0].startswith("monoquant: problem: verification failed: min SQNR")
    assert "threshold 99.00 dB" in err[0] and "fix: " in err[0]
    assert "FAIL" in res.stdout and "Traceback" not in res.output
    data = json.loads(cli_ok(cli("verify", src, quantized, "--json")))
    print(f"min SQNR {data['min_sqnr_db']:.2f} dB, ratio {data['compression_ratio']:.2f}")
    assert 35 < data["min_sqnr_db"] < 99 and data["compression_ratio"] > 1.5
    assert data["missing"] == [] and data["mismatched_copies"] == []


def test_dequantize_file_and_folder(cli, tmp_path, quantized, small_file):
    out = tmp_path / "plain.safetensors"
    text = cli_ok(cli("dequantize", quantized, out))
    assert f"wrote {out}" in text
    expected = mq.load(str(quantized), dequantize=True)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert set(got) == set(expected) == set(small_file[1])
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], expected[k]) for k in got)
    # a folder
    src, q, dq = tmp_path / "src", tmp_path / "q", tmp_path / "dq"
    write_folder(src, small_state(1))
    cli_ok(
        cli(
            "quantize",
            src,
            "-o",
            q,
            "-q",
            "--scheme",
            "int4-group",
            "--scheme-opt",
            "group_size=32",
        )
    )
    assert cli_ok(cli("dequantize", q, dq, "-q")) == ""
    assert tree(dq) == tree(src) - {"pytorch_model.bin"}
    index = json.loads((dq / INDEX).read_text())
    assert index["weight_map"] == json.loads((src / INDEX).read_text())["weight_map"]
    for shard in sorted(set(index["weight_map"].values())):
        ref = mq.load(str(q / shard), dequantize=True)
        with safe_open(str(dq / shard), "pt") as f:
            assert {k: f.get_tensor(k) for k in f.keys()}.keys() == ref.keys()  # noqa: SIM118
            assert all(torch.equal(f.get_tensor(k), ref[k]) for k in ref)


def test_verify_gate_fails_on_nan_and_says_why(cli, tmp_path, quantized, small_file):
    """``--min-sqnr 20`` exited 0 when the minimum SQNR was NaN."""
    _, sd = small_file
    broken = dict(sd)
    name = sorted(SMALL_SELECTED)[0]
    broken[name] = sd[name].clone()
    broken[name][0, 0] = float("nan")
    nan_src = write_file(tmp_path / "nan.safetensors", broken)
    res = cli("verify", nan_src, quantized, "--min-sqnr", "20")
    line = cli_one_line_error(res, "verification failed", "NaN/Inf in 1 tensor(s)", name)
    assert "finer scheme" not in line and "FAIL" in res.stdout


def test_verify_of_files_that_do_not_correspond(cli, tmp_path, quantized, small_file):
    _, sd = small_file
    name0 = "model.norm.weight"
    other = write_file(tmp_path / "other.safetensors", {"x.weight": torch.ones(4, 4)})
    line = cli_one_line_error(cli("verify", other, quantized, "--min-sqnr", "20"))
    assert "does not correspond to" in line and "finer scheme" not in line
    # partly related: an extra tensor in QUANTIZED (ignored before) and a missing one
    fewer = write_file(tmp_path / "fewer.safetensors", {k: v for k, v in sd.items() if k != name0})
    res = cli("verify", fewer, quantized, "--min-sqnr", "20")
    line = cli_one_line_error(res, "1 tensor(s) not in the original", "do not correspond")
    assert "finer scheme" not in line and f"not in the original: {name0}" in res.stdout


def test_inspect_of_a_fifo_is_one_line_not_a_hang(cli, tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with returns_within(10):
        res = cli("inspect", fifo)
    cli_one_line_error(res, "is a FIFO, not a regular file")
